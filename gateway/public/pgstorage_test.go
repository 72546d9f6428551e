package public

import (
	"context"
	"errors"
	"io/fs"
	"slices"
	"testing"
	"time"

	"github.com/wicketgw/wicket/ca/pgtest"
)

func newPGStorage(t *testing.T, dsn string) *PostgresStorage {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := NewPostgresStorage(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	s.refresh, s.poll = 50*time.Millisecond, 20*time.Millisecond
	t.Cleanup(s.Close)
	return s
}

// The storage behaves as certmagic's file storage does: values by key, directories as key
// prefixes, fs.ErrNotExist for what is not there.
func TestPostgresStorage(t *testing.T) {
	checkLeaks(t)
	s := newPGStorage(t, pgtest.Database(t, "wicket_public_test"))
	ctx := context.Background()
	for k, v := range map[string]string{
		"certificates/acme/a.example/a.example.crt": "crt",
		"certificates/acme/a.example/a.example.key": "key",
		"certificates/acme/b.example/b.example.crt": "crt b",
		"acme/account.json":                         "{}",
	} {
		if err := s.Store(ctx, k, []byte(v)); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Store(ctx, "acme/account.json", []byte(`{"v":2}`)); err != nil {
		t.Fatal(err)
	}
	if v, err := s.Load(ctx, "acme/account.json"); err != nil || string(v) != `{"v":2}` {
		t.Fatalf("Load after overwrite = %q, %v", v, err)
	}
	if _, err := s.Load(ctx, "nope"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Load of a missing key: %v, want fs.ErrNotExist", err)
	}
	if ki, err := s.Stat(ctx, "certificates/acme/a.example/a.example.key"); err != nil || !ki.IsTerminal || ki.Size != 3 || ki.Modified.IsZero() {
		t.Fatalf("Stat of a value = %+v, %v", ki, err)
	}
	if ki, err := s.Stat(ctx, "certificates/acme"); err != nil || ki.IsTerminal {
		t.Fatalf("Stat of a directory = %+v, %v", ki, err)
	}
	if _, err := s.Stat(ctx, "certificates/acm"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Stat of a partial name: %v, want fs.ErrNotExist", err)
	}
	if !s.Exists(ctx, "certificates") || s.Exists(ctx, "certificates/x") {
		t.Fatal("Exists")
	}
	got, err := s.List(ctx, "certificates/acme", false)
	if want := []string{"certificates/acme/a.example", "certificates/acme/b.example"}; err != nil || !slices.Equal(got, want) {
		t.Fatalf("List = %v, %v; want %v", got, err, want)
	}
	got, err = s.List(ctx, "certificates", true)
	if want := []string{"certificates/acme", "certificates/acme/a.example", "certificates/acme/a.example/a.example.crt",
		"certificates/acme/a.example/a.example.key", "certificates/acme/b.example", "certificates/acme/b.example/b.example.crt"}; err != nil || !slices.Equal(got, want) {
		t.Fatalf("recursive List = %v, %v; want %v", got, err, want)
	}
	if _, err := s.List(ctx, "nothing", false); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("List of a missing directory: %v", err)
	}
	if err := s.Delete(ctx, "certificates/acme/a.example"); err != nil {
		t.Fatal(err)
	}
	if s.Exists(ctx, "certificates/acme/a.example/a.example.crt") || !s.Exists(ctx, "certificates/acme/b.example/b.example.crt") {
		t.Fatal("Delete of a directory removed the wrong keys")
	}
	if err := s.Delete(ctx, "never-stored"); err != nil {
		t.Fatalf("Delete of a missing key: %v", err)
	}
}

// Two gateways sharing the database exclude each other; a lock whose holder stopped
// refreshing it (a crashed gateway) is taken over once it has expired.
func TestPostgresStorageLocks(t *testing.T) {
	checkLeaks(t)
	dsn := pgtest.Database(t, "wicket_public_test")
	a, b := newPGStorage(t, dsn), newPGStorage(t, dsn)
	a.lockTTL = 200 * time.Millisecond // refreshed every 50 ms: held as long as a lives
	ctx := context.Background()
	if err := a.Lock(ctx, "issue_cert_a.example"); err != nil {
		t.Fatal(err)
	}
	if ok, err := b.TryLock(ctx, "issue_cert_a.example"); err != nil || ok {
		t.Fatalf("second holder got the lock: %v %v", ok, err)
	}
	time.Sleep(3 * a.lockTTL) // well past the TTL: only the holder's refreshes keep the lock
	if ok, _ := b.TryLock(ctx, "issue_cert_a.example"); ok {
		t.Fatal("the lock moved while its holder was refreshing it")
	}
	got := make(chan error, 1)
	go func() { got <- b.Lock(ctx, "issue_cert_a.example") }()
	select {
	case err := <-got:
		t.Fatalf("Lock returned while the lock was held: %v", err)
	case <-time.After(100 * time.Millisecond):
	}
	if err := a.Unlock(ctx, "issue_cert_a.example"); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-got:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the waiter did not get the lock after it was released")
	}
	// A Lock whose context ends gives up with the context's error.
	cctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	if err := a.Lock(cctx, "issue_cert_a.example"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Lock with an ending context: %v", err)
	}
	// b "crashes": its refreshes stop and its lock lapses after the TTL.
	b.mu.Lock()
	k := b.held["issue_cert_a.example"]
	delete(b.held, "issue_cert_a.example")
	b.mu.Unlock()
	k.stop()
	if _, err := a.pool.Exec(ctx, `UPDATE wicket_certmagic_locks SET expires = now() + interval '300 milliseconds'`); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := a.Lock(ctx, "issue_cert_a.example"); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < 200*time.Millisecond {
		t.Fatalf("the abandoned lock was taken after %v, before it expired", d)
	}
	if err := a.Unlock(ctx, "issue_cert_a.example"); err != nil {
		t.Fatal(err)
	}
}

// Two gateways sharing the database share the public certificate: the first obtains it from
// the ACME CA, the second, started on other listeners, serves the very same certificate
// from the database instead of ordering its own.
func TestPostgresStorageSharedBetweenGateways(t *testing.T) {
	checkLeaks(t)
	dsn := pgtest.Database(t, "wicket_public_test")
	host := testHost("shared")
	hosts := map[string]Host{host: {Resource: "web", Access: AccessPublic}}
	e1 := startEnv(t, envOptions{hosts: hosts, store: newPGStorage(t, dsn)}, nil)
	first := e1.waitCert(host)
	if n := e1.srv.Stats().CertsObtained; n != 1 {
		t.Fatalf("first gateway obtained %d certificates, want 1", n)
	}
	e2 := startEnv(t, envOptions{hosts: hosts, store: newPGStorage(t, dsn), pebble: e1.pebble,
		ln: listen(t), httpLn: listen(t)}, nil)
	second := e2.waitCert(host)
	if second.SerialNumber.Cmp(first.SerialNumber) != 0 {
		t.Fatalf("the second gateway serves serial %s, want the shared %s", second.SerialNumber, first.SerialNumber)
	}
	if n := e2.srv.Stats().CertsObtained; n != 0 {
		t.Fatalf("the second gateway ordered %d certificates of its own", n)
	}
	status, _, _, leaf, err := get(e2.client(nil, false), e2.url(host, "/"), nil)
	if err != nil || status != 200 || leaf.SerialNumber.Cmp(first.SerialNumber) != 0 {
		t.Fatalf("request to the second gateway: %d %v", status, err)
	}
	e2.stop()
	e1.stop()
}
