package public

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// PostgresStorage is certmagic storage in PostgreSQL: the public listener's ACME account,
// certificates, keys and challenge tokens, and the locks that keep two gateways from
// obtaining the same certificate at once. Gateways that share a database (--db) then share
// their public certificates: one obtains, the others load it, and an http-01 or tls-alpn-01
// challenge can be answered by whichever gateway the ACME CA reaches. With file storage each
// gateway would obtain its own (rate limits) and fail challenges that land on another.
//
// The database then holds the public certificates' private keys: protect it like the data
// dir. Keys are certmagic's slash-separated paths; "directories" are their prefixes.
type PostgresStorage struct {
	pool   *pgxpool.Pool
	holder string // identifies this process's locks

	lockTTL, refresh, poll time.Duration

	mu   sync.Mutex
	held map[string]*keeper // locks this storage holds, by name
}

// keeper refreshes one held lock until stopped.
type keeper struct {
	cancel context.CancelFunc
	done   chan struct{}
}

// stop ends the refreshes and waits until none is in flight.
func (k *keeper) stop() {
	k.cancel()
	<-k.done
}

var _ certmagic.Storage = (*PostgresStorage)(nil)
var _ certmagic.TryLocker = (*PostgresStorage)(nil)

// Lock timing: a lock is refreshed every pgLockRefresh while held and considered abandoned
// (its holder crashed) pgLockTTL after its last refresh; a waiter checks every pgLockPoll.
const (
	pgLockTTL     = 30 * time.Second
	pgLockRefresh = 10 * time.Second
	pgLockPoll    = time.Second
)

// NewPostgresStorage connects to dsn (a postgresql:// URL) and creates its two tables if
// they do not exist: wicket_certmagic_data and wicket_certmagic_locks.
func NewPostgresStorage(ctx context.Context, dsn string) (*PostgresStorage, error) {
	pool, err := pgxpool.New(ctx, dsn)
	if err != nil {
		return nil, fmt.Errorf("public certificate storage in PostgreSQL: %w", err)
	}
	_, err = pool.Exec(ctx, `
CREATE TABLE IF NOT EXISTS wicket_certmagic_data (
	key      text PRIMARY KEY,
	value    bytea NOT NULL,
	modified timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS wicket_certmagic_locks (
	name    text PRIMARY KEY,
	holder  text NOT NULL,
	expires timestamptz NOT NULL
)`)
	if err != nil {
		pool.Close()
		return nil, fmt.Errorf("public certificate storage in PostgreSQL: create tables: %w", err)
	}
	var b [8]byte
	_, _ = rand.Read(b[:])
	return &PostgresStorage{pool: pool, holder: hex.EncodeToString(b[:]),
		lockTTL: pgLockTTL, refresh: pgLockRefresh, poll: pgLockPoll,
		held: map[string]*keeper{}}, nil
}

// Close releases the locks this storage still holds and closes its connections.
func (s *PostgresStorage) Close() {
	s.mu.Lock()
	names := make([]string, 0, len(s.held))
	for n := range s.held {
		names = append(names, n)
	}
	s.mu.Unlock()
	for _, n := range names {
		_ = s.Unlock(context.Background(), n)
	}
	s.pool.Close()
}

// Store puts value at key, replacing any value there.
func (s *PostgresStorage) Store(ctx context.Context, key string, value []byte) error {
	_, err := s.pool.Exec(ctx, `INSERT INTO wicket_certmagic_data (key, value, modified) VALUES ($1, $2, now())
ON CONFLICT (key) DO UPDATE SET value = excluded.value, modified = excluded.modified`, key, value)
	if err != nil {
		return fmt.Errorf("store %s: %w", key, err)
	}
	return nil
}

// Load returns the value at key, or an error wrapping fs.ErrNotExist.
func (s *PostgresStorage) Load(ctx context.Context, key string) ([]byte, error) {
	var v []byte
	err := s.pool.QueryRow(ctx, `SELECT value FROM wicket_certmagic_data WHERE key = $1`, key).Scan(&v)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fmt.Errorf("load %s: %w", key, fs.ErrNotExist)
	}
	if err != nil {
		return nil, fmt.Errorf("load %s: %w", key, err)
	}
	return v, nil
}

// Delete removes key and, if it is a directory, every key under it. A missing key is not an
// error.
func (s *PostgresStorage) Delete(ctx context.Context, key string) error {
	_, err := s.pool.Exec(ctx, `DELETE FROM wicket_certmagic_data WHERE key = $1 OR left(key, length($2)) = $2`,
		key, dirPrefix(key))
	if err != nil {
		return fmt.Errorf("delete %s: %w", key, err)
	}
	return nil
}

// Exists says whether key is a stored value or a directory of some.
func (s *PostgresStorage) Exists(ctx context.Context, key string) bool {
	_, err := s.Stat(ctx, key)
	return err == nil
}

// Stat describes key: a stored value (terminal) or a directory; fs.ErrNotExist otherwise.
func (s *PostgresStorage) Stat(ctx context.Context, key string) (certmagic.KeyInfo, error) {
	var size int64
	var modified time.Time
	err := s.pool.QueryRow(ctx, `SELECT length(value), modified FROM wicket_certmagic_data WHERE key = $1`, key).Scan(&size, &modified)
	if err == nil {
		return certmagic.KeyInfo{Key: key, Modified: modified, Size: size, IsTerminal: true}, nil
	}
	if !errors.Is(err, pgx.ErrNoRows) {
		return certmagic.KeyInfo{}, fmt.Errorf("stat %s: %w", key, err)
	}
	var newest *time.Time
	err = s.pool.QueryRow(ctx, `SELECT max(modified) FROM wicket_certmagic_data WHERE left(key, length($1)) = $1`,
		dirPrefix(key)).Scan(&newest)
	if err != nil {
		return certmagic.KeyInfo{}, fmt.Errorf("stat %s: %w", key, err)
	}
	if newest == nil {
		return certmagic.KeyInfo{}, fmt.Errorf("stat %s: %w", key, fs.ErrNotExist)
	}
	return certmagic.KeyInfo{Key: key, Modified: *newest, IsTerminal: false}, nil
}

// List returns the keys under dir, as certmagic's file storage does: its direct children
// (values and directories), or with recursive every value and directory below it.
func (s *PostgresStorage) List(ctx context.Context, dir string, recursive bool) ([]string, error) {
	rows, err := s.pool.Query(ctx, `SELECT key FROM wicket_certmagic_data WHERE left(key, length($1)) = $1`, dirPrefix(dir))
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", dir, err)
	}
	keys, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", dir, err)
	}
	if len(keys) == 0 {
		return nil, fmt.Errorf("list %s: %w", dir, fs.ErrNotExist)
	}
	seen := map[string]bool{}
	prefix := dirPrefix(dir)
	for _, k := range keys {
		parts := strings.Split(strings.TrimPrefix(k, prefix), "/")
		if !recursive {
			parts = parts[:1]
		}
		for i := range parts {
			seen[path.Join(dir, path.Join(parts[:i+1]...))] = true
		}
	}
	out := make([]string, 0, len(seen))
	for k := range seen {
		out = append(out, k)
	}
	slices.Sort(out)
	return out, nil
}

// dirPrefix is key as a directory prefix ("a/b" -> "a/b/"; "" -> "").
func dirPrefix(key string) string {
	key = strings.TrimSuffix(key, "/")
	if key == "" {
		return ""
	}
	return key + "/"
}

// TryLock takes the lock name if it is free or abandoned, without waiting.
func (s *PostgresStorage) TryLock(ctx context.Context, name string) (bool, error) {
	tag, err := s.pool.Exec(ctx, `INSERT INTO wicket_certmagic_locks (name, holder, expires)
VALUES ($1, $2, now() + make_interval(secs => $3))
ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires = excluded.expires
WHERE wicket_certmagic_locks.expires < now()`, name, s.holder, s.lockTTL.Seconds())
	if err != nil {
		return false, fmt.Errorf("lock %s: %w", name, err)
	}
	if tag.RowsAffected() != 1 {
		return false, nil
	}
	s.keepFresh(name)
	return true, nil
}

// Lock waits until it holds the lock name (or ctx ends). A lock whose holder stopped
// refreshing it for pgLockTTL is taken over.
func (s *PostgresStorage) Lock(ctx context.Context, name string) error {
	for {
		ok, err := s.TryLock(ctx, name)
		if err != nil || ok {
			return err
		}
		t := time.NewTimer(s.poll)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("lock %s: %w", name, ctx.Err())
		case <-t.C:
		}
	}
}

// keepFresh refreshes the lock's expiry while it is held, so a long ACME order does not lose
// it, and a crashed holder's lock still expires.
func (s *PostgresStorage) keepFresh(name string) {
	ctx, cancel := context.WithCancel(context.Background())
	k := &keeper{cancel: cancel, done: make(chan struct{})}
	s.mu.Lock()
	s.held[name] = k
	s.mu.Unlock()
	go func() {
		defer close(k.done)
		t := time.NewTicker(s.refresh)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			_, _ = s.pool.Exec(ctx, `UPDATE wicket_certmagic_locks SET expires = now() + make_interval(secs => $3)
WHERE name = $1 AND holder = $2`, name, s.holder, s.lockTTL.Seconds())
		}
	}()
}

// Unlock releases the lock name if this storage holds it.
func (s *PostgresStorage) Unlock(ctx context.Context, name string) error {
	s.mu.Lock()
	k := s.held[name]
	delete(s.held, name)
	s.mu.Unlock()
	if k != nil {
		k.stop()
	}
	if _, err := s.pool.Exec(ctx, `DELETE FROM wicket_certmagic_locks WHERE name = $1 AND holder = $2`, name, s.holder); err != nil {
		return fmt.Errorf("unlock %s: %w", name, err)
	}
	return nil
}
