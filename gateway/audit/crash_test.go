package audit

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

const helperEnv = "WICKET_AUDIT_KILL_HELPER"

// TestKillHelper is the child process of TestKilledWriterResumes: it writes
// records (with fsync, as in production) until it is killed. Run directly it
// does nothing.
func TestKillHelper(t *testing.T) {
	path := os.Getenv(helperEnv)
	if path == "" {
		return
	}
	l, err := Open(path, nil)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	for i := 0; ; i++ {
		if err := l.Write(sampleRecord(i)); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(3)
		}
	}
}

// A gateway killed in the middle of writing (SIGKILL) leaves a log that a new
// Open resumes and that still verifies end to end.
func TestKilledWriterResumes(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	cmd := exec.Command(os.Args[0], "-test.run=^TestKillHelper$", "-test.count=1")
	cmd.Env = append(os.Environ(), helperEnv+"="+path)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	const want = 200
	deadline := time.Now().Add(20 * time.Second)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		b, _ := os.ReadFile(path)
		if bytes.Count(b, []byte{'\n'}) >= want {
			break
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("helper wrote fewer than %d records in 20s; stderr: %s", want, stderr.String())
		}
		<-tick.C
	}
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()

	l, err := Open(path, nil)
	if err != nil {
		t.Fatalf("Open after the writer was killed: %v", err)
	}
	if err := l.Write(Record{Type: TypeGatewayStarted}); err != nil {
		t.Fatal(err)
	}
	seq, head := l.Head()
	l.Close()
	res, err := VerifyFile(path)
	if err != nil {
		t.Fatalf("log does not verify after a kill and a resume: %v", err)
	}
	if res.LastSeq != seq || res.Head != head || res.Records < want+1 || res.TornTail {
		t.Fatalf("VerifyFile = %+v, writer head seq %d %s", res, seq, head)
	}
}
