// Package pgtest gives a test its own PostgreSQL database on the server the project's tests
// use (127.0.0.1:5432, user postgres, trust authentication; .ci/run starts it) and drops the
// database when the test ends. A test that needs PostgreSQL fails, never skips, when the
// server is down.
package pgtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// AdminDSN is the maintenance database on the test server.
const AdminDSN = "postgresql://postgres@127.0.0.1:5432/postgres?sslmode=disable"

// Database creates a uniquely named database (prefix + random suffix) for one test and drops
// it, with its connections, after the test. It returns the database's DSN.
func Database(t testing.TB, prefix string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, AdminDSN)
	if err != nil {
		t.Fatalf("PostgreSQL at 127.0.0.1:5432 is unreachable (start it: .ci/run does, see DEVELOPERS.md): %v", err)
	}
	defer conn.Close(context.Background())
	var b [6]byte
	_, _ = rand.Read(b[:])
	name := prefix + "_" + hex.EncodeToString(b[:])
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		t.Fatalf("create test database: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c, err := pgx.Connect(ctx, AdminDSN)
		if err != nil {
			t.Errorf("drop test database: %v", err)
			return
		}
		defer c.Close(context.Background())
		if _, err := c.Exec(ctx, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)"); err != nil {
			t.Errorf("drop test database %s: %v", name, err)
		}
	})
	return "postgresql://postgres@127.0.0.1:5432/" + name + "?sslmode=disable"
}
