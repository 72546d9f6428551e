package ca

import (
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/smallstep/certificates/authority/provisioner"
	stepdb "github.com/smallstep/certificates/db"
	"github.com/smallstep/nosql"
	"github.com/smallstep/nosql/database"
	"go.step.sm/crypto/jose"
)

// issuedTable indexes certificates by identity: key serial, value issuedRecord.
var issuedTable = []byte("wicket_issued")

type issuedRecord struct {
	Identity  string    `json:"id"`
	NotBefore time.Time `json:"nb"`
	NotAfter  time.Time `json:"na"`
}

// authDB wraps step-ca's database. It is what we hand to authority.WithDatabase, so
// every path through step-ca (HTTP /sign, /renew, /revoke, ACME, our own calls) goes
// through it:
//
//   - UseToken does not record a token that is refused anyway (bad signature,
//     outside its validity window): step-ca records the token ID *before* verifying
//     the signature and times, so a forged copy of a token would otherwise burn the
//     real one, and an expired one would be recorded (and, within step-ca's leeway,
//     accepted).
//   - StoreCertificateChain / StoreRenewedCertificate also index serial -> identity, for
//     Issued and RevokeIdentity.
//   - Revoke updates the in-memory revocation set and fires OnRevoke.
//   - IsRevoked answers from memory: it runs on every handshake and every renewal.
type authDB struct {
	*stepdb.DB
	closeFn func() error

	// provKeys maps JWK provisioner name -> public key, to pre-verify tokens.
	provKeys map[string]*ecdsa.PublicKey

	// verified holds tokens whose signature and validity window the HTTP guard has
	// just checked, so that UseToken does not verify them a second time.
	verified sync.Map
	// now is the CA's clock (Config.Now).
	now func() time.Time

	mu       sync.RWMutex
	revoked  map[string]struct{}
	onRevoke func(serial string)

	// onRevokedAgentACME deactivates the ACME accounts of the agent whose
	// certificate was just revoked.
	onRevokedAgentACME func(serial string) error
	// onAgentACMEIssued is called after an agents-ACME certificate is stored.
	onAgentACMEIssued func(leaf *x509.Certificate)
	// onACMERevoked is called after a certificate of the "acme" provisioner was revoked by
	// its ACME account (RFC 8555 revokeCert).
	onACMERevoked func(serial string)
	// onACMEIssued is called after a certificate of the public ACME provisioner is stored.
	onACMEIssued func(leaf *x509.Certificate)
}

// openDB opens bbolt in dataDir or PostgreSQL at dsn.
func openDB(dataDir, dsn string) (*authDB, error) {
	if dsn == "" {
		path := filepath.Join(dataDir, bboltFile)
		if f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600); err == nil {
			f.Close()
		}
		adb, err := stepdb.New(&stepdb.Config{Type: nosql.BBoltDriver, DataSource: path})
		if err != nil {
			// bbolt holds an exclusive lock; step's driver gives up after 5s.
			return nil, fmt.Errorf("open CA database %s (is another gateway using this data dir?): %w", path, err)
		}
		d := adb.(*stepdb.DB)
		return &authDB{DB: d, closeFn: d.Shutdown, revoked: map[string]struct{}{}}, nil
	}
	// step-ca's PostgreSQL driver creates the database named in the DSN when missing,
	// and its tables.
	adb, err := stepdb.New(&stepdb.Config{Type: nosql.PostgreSQLDriver, DataSource: dsn})
	if err != nil {
		return nil, fmt.Errorf("cannot reach the CA database %s (%w): check --db and that the database server is running and reachable", redactDSN(dsn), err)
	}
	inner := adb.(*stepdb.DB)
	pcfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		inner.Shutdown()
		return nil, fmt.Errorf("parse PostgreSQL DSN %s: %w", redactDSN(dsn), err)
	}
	sqlDB := stdlib.OpenDB(*pcfg)
	if err := sqlDB.Ping(); err != nil {
		sqlDB.Close()
		inner.Shutdown()
		return nil, fmt.Errorf("connect to PostgreSQL %s: %w", redactDSN(dsn), err)
	}
	wrapped := &pgAtomic{DB: inner.DB, sql: sqlDB}
	d := &stepdb.DB{DB: wrapped}
	return &authDB{DB: d, revoked: map[string]struct{}{}, closeFn: func() error {
		err1 := sqlDB.Close()
		err2 := inner.Shutdown()
		return errors.Join(err1, err2)
	}}, nil
}

// syncRevoked adds serials revoked in the database but unknown here, and returns them.
func (d *authDB) syncRevoked() ([]string, error) {
	list, err := d.GetRevokedCertificates()
	if err != nil {
		if database.IsErrNotFound(err) {
			return nil, nil
		}
		return nil, err
	}
	var added []string
	d.mu.Lock()
	for _, r := range *list {
		if _, ok := d.revoked[r.Serial]; !ok {
			d.revoked[r.Serial] = struct{}{}
			added = append(added, r.Serial)
		}
	}
	d.mu.Unlock()
	return added, nil
}

func (d *authDB) init() error {
	if err := d.CreateTable(issuedTable); err != nil {
		return fmt.Errorf("create table %s: %w", issuedTable, err)
	}
	for _, t := range [][]byte{agentEABTableName, agentAccountTableName, acmeEABAccountTableName} {
		if err := d.CreateTable(t); err != nil {
			return fmt.Errorf("create table %s: %w", t, err)
		}
	}
	list, err := d.GetRevokedCertificates()
	if err != nil && !database.IsErrNotFound(err) {
		return fmt.Errorf("load revoked certificates: %w", err)
	}
	if list != nil {
		for _, r := range *list {
			d.revoked[r.Serial] = struct{}{}
		}
	}
	return nil
}

// Shutdown closes the database (and our own PostgreSQL connection pool).
func (d *authDB) Shutdown() error { return d.closeFn() }

// IsRevoked answers from the in-memory set, which Revoke keeps current and init loads.
func (d *authDB) IsRevoked(sn string) (bool, error) {
	d.mu.RLock()
	_, ok := d.revoked[sn]
	d.mu.RUnlock()
	return ok, nil
}

// Revoke records the revocation (step-ca's table), then the memory set, then OnRevoke.
func (d *authDB) Revoke(rci *stepdb.RevokedCertificateInfo) error {
	err := d.DB.Revoke(rci)
	if err != nil && !errors.Is(err, stepdb.ErrAlreadyExists) {
		return err
	}
	d.mu.Lock()
	d.revoked[rci.Serial] = struct{}{}
	d.mu.Unlock()
	if err == nil && d.onRevokedAgentACME != nil {
		if err := d.onRevokedAgentACME(rci.Serial); err != nil {
			return fmt.Errorf("revoked %s, but could not deactivate the agent's ACME accounts: %w", rci.Serial, err)
		}
	}
	if err == nil && d.onRevoke != nil {
		d.onRevoke(rci.Serial)
	}
	if err == nil && rci.ACME && rci.ProvisionerID != agentACMEProvisionerName && d.onACMERevoked != nil {
		d.onACMERevoked(rci.Serial)
	}
	return err
}

// UseToken records the token ID, unless the token is refused anyway:
//
//   - its signature does not verify under the key of the provisioner it names:
//     step-ca refuses it right after, with the reason, and a forged copy of a token
//     must not burn the real one, so it is let through unrecorded;
//   - it is an agent or user token outside its validity window by our rule
//     (checkTokenTimes, by the CA's clock): step-ca's minute of leeway would still
//     take it, so it is refused here, unrecorded (step-ca then says "token already
//     used"; on /1.0/sign the guard has refused it before, with the reason). This
//     covers every other route to step-ca's token check, such as /1.0/revoke.
//
// Tokens the guard has just checked skip both.
func (d *authDB) UseToken(id, tok string) (bool, error) {
	if _, ok := d.verified.Load(tok); !ok {
		switch d.classifyToken(tok) {
		case tokenForged:
			return true, nil
		case tokenOutsideWindow:
			return false, nil
		}
	}
	return d.DB.UseToken(id, tok)
}

type tokenClass int

const (
	tokenOther         tokenClass = iota // left to step-ca
	tokenForged                          // signature does not verify under the issuer's key
	tokenOutsideWindow                   // ours, genuine, but outside its validity window
)

// classifyToken says whether step-ca's JWK provisioner will refuse tok for its
// signature (tokenForged), or whether we refuse it for its times. It must never say
// tokenForged for a token step-ca would accept, or that token would be usable
// twice; hence the exact same verification code (go.step.sm/crypto/jose). The
// gateway's own tokens never leave the process and are minted by the system clock
// for step-ca, so their times are left to step-ca.
func (d *authDB) classifyToken(tok string) tokenClass {
	jwt, err := jose.ParseSigned(tok)
	if err != nil {
		return tokenOther // step-ca fails earlier on a token it cannot parse
	}
	var c jose.Claims
	if err := jwt.UnsafeClaimsWithoutVerification(&c); err != nil {
		return tokenOther
	}
	pub, ok := d.provKeys[c.Issuer]
	if !ok {
		return tokenOther
	}
	if err := jwt.Claims(pub, &c); err != nil {
		return tokenForged
	}
	if r := roleOfProvisioner(c.Issuer); (r == RoleAgent || r == RoleUser) && checkTokenTimes(c, d.now()) != nil {
		return tokenOutsideWindow
	}
	return tokenOther
}

// step-ca's certificate tables; we write the same rows in the same format as
// step-ca's StoreCertificateChain, plus our index row, in ONE transaction: one fsync
// per issuance instead of two, and no certificate without its index entry.
var (
	certsTable     = []byte("x509_certs")
	certsDataTable = []byte("x509_certs_data")
)

// StoreCertificateChain stores the leaf, its provisioner data and its identity index
// entry in one transaction. Leaves without a Wicket identity (ACME) go to step-ca.
func (d *authDB) StoreCertificateChain(p provisioner.Interface, chain ...*x509.Certificate) error {
	leaf := chain[0]
	idx, ok := indexRecord(leaf)
	if !ok {
		if err := d.DB.StoreCertificateChain(p, chain...); err != nil {
			return err
		}
		if p != nil && p.GetName() == acmeProvisionerName && d.onACMEIssued != nil {
			d.onACMEIssued(leaf)
		}
		return nil
	}
	data := &stepdb.CertificateData{}
	if p != nil {
		data.Provisioner = &stepdb.ProvisionerData{ID: p.GetID(), Name: p.GetName(), Type: p.GetType().String()}
		if rap, ok := p.(interface{ RAInfo() *provisioner.RAInfo }); ok {
			data.RaInfo = rap.RAInfo()
		}
	}
	b, err := json.Marshal(data)
	if err != nil {
		return err
	}
	if err := d.storeLeaf(leaf, b, idx); err != nil {
		return err
	}
	if p != nil && p.GetName() == agentACMEProvisionerName && d.onAgentACMEIssued != nil {
		d.onAgentACMEIssued(leaf)
	}
	return nil
}

// StoreRenewedCertificate is StoreCertificateChain for a renewal: the provisioner data
// is copied from the old certificate.
func (d *authDB) StoreRenewedCertificate(old *x509.Certificate, chain ...*x509.Certificate) error {
	leaf := chain[0]
	idx, ok := indexRecord(leaf)
	if !ok {
		return d.DB.StoreRenewedCertificate(old, chain...)
	}
	var b []byte
	if data, err := d.GetCertificateData(old.SerialNumber.String()); err == nil {
		b, _ = json.Marshal(data)
	}
	return d.storeLeaf(leaf, b, idx)
}

func (d *authDB) storeLeaf(leaf *x509.Certificate, data, idx []byte) error {
	serial := []byte(leaf.SerialNumber.String())
	tx := new(database.Tx)
	tx.Set(certsTable, serial, leaf.Raw)
	if data != nil {
		tx.Set(certsDataTable, serial, data)
	}
	tx.Set(issuedTable, serial, idx)
	if err := d.Update(tx); err != nil {
		return fmt.Errorf("store certificate %s: %w", leaf.SerialNumber, err)
	}
	return nil
}

func indexRecord(leaf *x509.Certificate) ([]byte, bool) {
	id, err := ParseIdentity(leaf)
	if err != nil {
		return nil, false
	}
	b, err := json.Marshal(issuedRecord{Identity: id.String(), NotBefore: leaf.NotBefore, NotAfter: leaf.NotAfter})
	if err != nil {
		return nil, false
	}
	return b, true
}

// issued lists the certificates of id that are unexpired at now. Expired index
// entries are deleted on the way, which keeps the table at about the number of live
// certificates.
func (d *authDB) issued(id Identity, now time.Time) ([]IssuedCert, error) {
	entries, err := d.List(issuedTable)
	if err != nil {
		if database.IsErrNotFound(err) {
			return nil, nil
		}
		return nil, err
	}
	want := id.String()
	var out []IssuedCert
	prune := new(database.Tx)
	for _, e := range entries {
		var r issuedRecord
		if err := json.Unmarshal(e.Value, &r); err != nil {
			continue
		}
		// Keep expired entries an hour (clock skew between gateways), then prune.
		if now.After(r.NotAfter.Add(time.Hour)) {
			prune.Del(issuedTable, e.Key)
			continue
		}
		if !now.Before(r.NotAfter) {
			continue
		}
		if r.Identity != want {
			continue
		}
		serial := string(e.Key)
		rev, _ := d.IsRevoked(serial)
		out = append(out, IssuedCert{Serial: serial, NotBefore: r.NotBefore, NotAfter: r.NotAfter, Revoked: rev})
	}
	if len(prune.Operations) > 0 {
		// One transaction (one fsync) for all of them; best effort: a stale entry is
		// only filtered again next time.
		_ = d.Update(prune)
	}
	return out, nil
}

// pgAtomic fixes two races of step's PostgreSQL driver (smallstep/nosql v0.8):
//
//   - CmpAndSwap does SELECT ... FOR UPDATE, then INSERT ... ON CONFLICT DO UPDATE. When
//     the key does not exist yet, FOR UPDATE locks nothing, so two concurrent callers
//     both see "absent" and both "swap". That is exactly UseToken (one-time tokens),
//     Revoke and ACME account creation. We replace it by single statements that the
//     database serializes on the primary key: INSERT ... ON CONFLICT DO NOTHING when the
//     expected old value is absent, UPDATE ... WHERE nvalue = old otherwise, and
//     count the affected rows.
//   - Update with [Get k, Delete k] (ACME nonce consumption) lets two readers see the
//     nonce before either deletes it; we use DELETE ... RETURNING so only one wins.
type pgAtomic struct {
	database.DB
	sql *sql.DB
}

func pgTable(bucket []byte) string { return pgx.Identifier{string(bucket)}.Sanitize() }

// CmpAndSwap is atomic in PostgreSQL: one statement, decided by the primary key.
func (p *pgAtomic) CmpAndSwap(bucket, key, oldValue, newValue []byte) ([]byte, bool, error) {
	t := pgTable(bucket)
	var res sql.Result
	var err error
	if len(oldValue) == 0 {
		res, err = p.sql.Exec(`INSERT INTO `+t+` (nkey, nvalue) VALUES ($1, $2)
			ON CONFLICT (nkey) DO UPDATE SET nvalue = EXCLUDED.nvalue
			WHERE `+t+`.nvalue IS NULL OR octet_length(`+t+`.nvalue) = 0`, key, newValue)
	} else {
		res, err = p.sql.Exec(`UPDATE `+t+` SET nvalue = $3 WHERE nkey = $1 AND nvalue = $2`, key, oldValue, newValue)
	}
	if err != nil {
		return nil, false, fmt.Errorf("compare-and-swap %s: %w", bucket, err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return nil, false, err
	}
	if n == 1 {
		return newValue, true, nil
	}
	cur, err := p.DB.Get(bucket, key)
	if err != nil && !database.IsErrNotFound(err) {
		return nil, false, err
	}
	return cur, false, nil
}

// Update turns a [Get k, Delete k] transaction into one DELETE ... RETURNING.
func (p *pgAtomic) Update(tx *database.Tx) error {
	ops := tx.Operations
	if len(ops) == 2 && ops[0].Cmd == database.Get && ops[1].Cmd == database.Delete &&
		string(ops[0].Bucket) == string(ops[1].Bucket) && string(ops[0].Key) == string(ops[1].Key) {
		var v []byte
		err := p.sql.QueryRowContext(context.Background(),
			`DELETE FROM `+pgTable(ops[0].Bucket)+` WHERE nkey = $1 RETURNING nvalue`, ops[0].Key).Scan(&v)
		switch {
		case errors.Is(err, sql.ErrNoRows):
			return fmt.Errorf("%s/%s: %w", ops[0].Bucket, ops[0].Key, database.ErrNotFound)
		case err != nil:
			return fmt.Errorf("delete %s: %w", ops[0].Bucket, err)
		}
		ops[0].Result = v
		return nil
	}
	return p.DB.Update(tx)
}
