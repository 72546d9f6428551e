package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/wicketgw/wicket/gateway"
	"github.com/wicketgw/wicket/gateway/audit"
)

// auditUsage is the usage line of `wicket audit`.
const auditUsage = "wicket audit verify FILE [--anchor SEQ:HASH]... | " +
	"wicket audit show SESSION [--file AUDIT_LOG | --data-dir DIR] [--json]"

func init() {
	register("audit", auditUsage, runAudit)
}

func runAudit(ctx context.Context, args []string) error {
	return runAuditTo(ctx, args, os.Stdout)
}

// runAuditTo is runAudit writing its report to w.
func runAuditTo(_ context.Context, args []string, w io.Writer) error {
	fs := newFlagSet("audit")
	var anchorArgs stringList
	fs.Var(&anchorArgs, "anchor", "verify: SEQ:HASH printed by an earlier verify or logged by the gateway (\"audit anchor\"); "+
		"the record must still be there, unchanged (repeatable)")
	file := fs.String("file", "", "show: the audit log to read (default DATA_DIR/"+gateway.AuditLogName+")")
	dataDir := dataDirFlag(fs)
	asJSON := fs.Bool("json", false, "show: print the full records as JSON")
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	switch {
	case len(pos) == 2 && pos[0] == "verify":
		if *file != "" || *asJSON {
			return errors.New("usage: wicket audit verify FILE [--anchor SEQ:HASH] (--file and --json are for show)")
		}
		return auditVerify(w, pos[1], anchorArgs)
	case len(pos) == 2 && pos[0] == "show":
		if len(anchorArgs) > 0 {
			return errors.New("usage: wicket audit show SESSION [--file AUDIT_LOG | --data-dir DIR] [--json] (--anchor is for verify)")
		}
		path := *file
		if path == "" {
			if *dataDir == "" {
				return errors.New("no audit log: pass --file AUDIT_LOG, or --data-dir DIR (the gateway's) or set WICKET_DATA_DIR")
			}
			path = filepath.Join(*dataDir, gateway.AuditLogName)
		}
		return auditShow(w, path, pos[1], *asJSON)
	}
	return errors.New("usage: " + auditUsage)
}

// auditVerify checks the main log's chain and anchors, then every statement log next to it.
func auditVerify(w io.Writer, path string, anchorArgs []string) error {
	var anchors []audit.Anchor
	for _, s := range anchorArgs {
		a, err := audit.ParseAnchor(s)
		if err != nil {
			return err
		}
		anchors = append(anchors, a)
	}
	res, err := audit.VerifyFileAnchored(path, anchors...)
	if err != nil {
		var ve *audit.VerifyError
		if !errors.As(err, &ve) {
			return fmt.Errorf("cannot verify audit log %s: %w", path, err)
		}
		if errors.Is(err, audit.ErrTruncated) || errors.Is(err, audit.ErrRewritten) {
			return fmt.Errorf("audit log %s does not match an anchor kept elsewhere: %s", path, ve.Detail)
		}
		return fmt.Errorf("audit log %s was edited or damaged: line %d: %s", path, ve.Line, ve.Detail)
	}
	fmt.Fprintf(w, "ok: %d records (last seq %d, head %s)\n", res.Records, res.LastSeq, res.Head)
	if len(anchors) > 0 {
		fmt.Fprintf(w, "ok: %d anchor(s) hold\n", len(anchors))
	}
	// The chain alone cannot show a cut-off tail or a log rewritten from scratch: keep this
	// anchor off the host and pass it to a later verify.
	fmt.Fprintf(w, "anchor: %s\n", audit.Anchor{Seq: res.LastSeq, Hash: res.Head})
	if len(res.Sealed) > 0 {
		fmt.Fprintf(w, "note: line(s) %v were torn by a crash and sealed by the gateway on restart (not tampering)\n", res.Sealed)
	}
	if res.TornTail {
		fmt.Fprintf(w, "note: the last %d bytes are a line torn by a crash, not yet sealed (not tampering)\n", res.TornBytes)
	}

	sres, err := audit.VerifyStatementLogs(path)
	var le *audit.StatementLogError
	if err != nil && !errors.As(err, &le) {
		return fmt.Errorf("cannot verify the statement logs next to %s: %w", path, err)
	}
	dir := filepath.Dir(path)
	if le != nil {
		for _, p := range sres.Problems[1:] {
			fmt.Fprintf(w, "damaged: %s\n", p.Error())
		}
		more := ""
		if n := len(sres.Problems) - 1; n > 0 {
			more = fmt.Sprintf(" (and %d more, listed above)", n)
		}
		return fmt.Errorf("statement log %s was edited or damaged%s: %s", statementLogWhere(dir, le), more, le.Detail)
	}
	fmt.Fprintf(w, "ok: %d statement logs, %d statements\n", sres.Logs, sres.Statements)
	if len(sres.Unsealed) > 0 {
		fmt.Fprintf(w, "note: %d statement log(s) not sealed yet, their session still open or the gateway stopped before it ended (chain checked, not tampering): %s\n",
			len(sres.Unsealed), strings.Join(sres.Unsealed, ", "))
	}
	if len(sres.Torn) > 0 {
		fmt.Fprintf(w, "note: statement log(s) %s end with a line torn by a crash, not yet sealed (not tampering)\n", strings.Join(sres.Torn, ", "))
	}
	if len(sres.Recovered) > 0 {
		fmt.Fprintf(w, "note: statement log(s) %s were closed by the gateway after a crash\n", strings.Join(sres.Recovered, ", "))
	}
	if len(sres.Unnamed) > 0 {
		fmt.Fprintf(w, "note: no session.started record names statement log(s) %s (sessions refused before they started)\n", strings.Join(sres.Unnamed, ", "))
	}
	return nil
}

// statementLogWhere names a damaged statement log by its path and line.
func statementLogWhere(dir string, e *audit.StatementLogError) string {
	where := filepath.Join(dir, filepath.FromSlash(e.File))
	if e.Line > 0 {
		where += fmt.Sprintf(" line %d", e.Line)
	}
	return where
}

// sessionRecords returns the records of the main log at path whose session id is id.
// Lines that do not mention the id are not decoded.
func sessionRecords(path, id string) ([]audit.Record, error) {
	var out []audit.Record
	err := audit.EachLine(path, []byte(`"session_id":"`+id+`"`), func(_ int, line []byte) error {
		var r audit.Record
		if json.Unmarshal(line, &r) == nil && r.SessionID == id {
			out = append(out, r)
		}
		return nil
	})
	return out, err
}

// auditShow prints a session's records from the main log and its statements, reading
// the statement log once, as a stream: a session of millions of statements is shown in
// constant memory.
func auditShow(w io.Writer, path, id string, asJSON bool) error {
	logPath, err := audit.StatementLogPath(filepath.Dir(path), id)
	if err != nil {
		return err
	}
	recs, err := sessionRecords(path, id)
	if err != nil {
		return err
	}
	var ended *audit.Record
	named := false
	for i := range recs {
		switch {
		case recs[i].Type == audit.TypeSessionEnded:
			ended = &recs[i]
		case recs[i].Extra[audit.ExtraStatementsLog] != "":
			named = true
		}
	}
	rd, rerr := audit.OpenStatementReader(logPath)
	noLog := errors.Is(rerr, os.ErrNotExist)
	var le *audit.StatementLogError
	switch {
	case noLog && len(recs) == 0:
		return fmt.Errorf("session %s is not in audit log %s and has no statement log: check the id (`wicket sessions list`, or grep the audit log)", id, path)
	case noLog && named:
		return fmt.Errorf("statement log %s of session %s is missing although its session.started record names it: it was deleted or moved; run `wicket audit verify %s`", logPath, id, path)
	case errors.As(rerr, &le):
		return fmt.Errorf("statement log %s was edited or damaged: %s", statementLogWhere(filepath.Dir(path), le), le.Detail)
	case rerr != nil && !noLog:
		return fmt.Errorf("cannot read the statement log of session %s: %w", id, rerr)
	}
	if rd != nil {
		defer rd.Close()
	}
	var show sessionPrinter = &sessionTable{w: w}
	if asJSON {
		show = &sessionJSON{w: w}
	}
	if err := show.header(id, recs, rd); err != nil {
		return err
	}
	for rd != nil && rd.Next() {
		if err := show.statement(rd.Statement()); err != nil {
			return err
		}
	}
	if err := show.end(); err != nil {
		return err
	}
	if rd == nil {
		return nil
	}
	if errors.As(rd.Err(), &le) {
		return fmt.Errorf("statement log %s was edited or damaged: %s (the statements before it are shown)", statementLogWhere(filepath.Dir(path), le), le.Detail)
	} else if rd.Err() != nil {
		return fmt.Errorf("cannot read the statement log of session %s: %w", id, rd.Err())
	}
	// The seal check: the log must end where session.ended says.
	if ended != nil {
		if seal, ok := audit.SealOf(*ended); ok {
			if info := rd.Info(); info.Seal() != seal || info.TornBytes > 0 {
				return fmt.Errorf("statement log %s does not end where session.ended sealed it (%d statements, head %.16s; the file has %d, head %.16s): it was cut, extended or edited; run `wicket audit verify %s`",
					logPath, seal.Count, seal.Head, info.Statements, info.Head, path)
			}
		}
	}
	return nil
}

// sessionPrinter prints a session for `wicket audit show`: its main-log records and
// the statement log's begin line (rd is nil when the session has none), then each
// statement as it is read.
type sessionPrinter interface {
	header(id string, recs []audit.Record, rd *audit.StatementReader) error
	statement(s audit.Statement) error
	end() error
}

// sessionTable is the human form: the records, then a table of statements.
type sessionTable struct {
	w    io.Writer
	tw   *tabwriter.Writer
	rows int
}

func (t *sessionTable) header(id string, recs []audit.Record, rd *audit.StatementReader) error {
	fmt.Fprintf(t.w, "session %s\n", id)
	tw := tabwriter.NewWriter(t.w, 0, 0, 2, ' ', 0)
	for _, r := range recs {
		var facts []string
		add := func(k, v string) {
			if v != "" {
				facts = append(facts, k+" "+v)
			}
		}
		add("user", r.User)
		add("identity", r.Identity)
		add("resource", r.Resource)
		add("agent", r.Agent)
		add("remote", r.Remote)
		add("outcome", r.Outcome)
		if r.DurationMS > 0 {
			add("duration", (time.Duration(r.DurationMS) * time.Millisecond).String())
		}
		if r.BytesUp > 0 || r.BytesDown > 0 {
			add("bytes", fmt.Sprintf("%s up, %s down", bytesHuman(r.BytesUp), bytesHuman(r.BytesDown)))
		}
		if seal, ok := audit.SealOf(r); ok {
			add("statements", fmt.Sprintf("%d (sealed, head %.16s)", seal.Count, seal.Head))
		}
		add("reason", r.Reason)
		fmt.Fprintf(tw, "  %s\t%s\tseq %d\t%s\n", r.Type, r.Time.UTC().Format(time.RFC3339Nano), r.Seq, strings.Join(facts, ", "))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if rd == nil {
		_, err := fmt.Fprintln(t.w, "no statement log (not a database session with statement audit)")
		return err
	}
	b := rd.Begin()
	text := "hashes only"
	if b.RecordsText {
		text = "text recorded"
	}
	fmt.Fprintf(t.w, "database %s as %s (%s)\n", dash(b.Database), dash(b.DBUser), text)
	t.tw = tabwriter.NewWriter(t.w, 0, 0, 2, ' ', 0)
	_, err := fmt.Fprintln(t.tw, "SEQ\tTIME\tKIND\tSHA256\tTAG\tROWS\tDURATION\tSTATUS\tSQLSTATE\tTEXT")
	return err
}

// tableBlock is how many statement rows are aligned together: the table is flushed
// every so many, so memory stays bounded however long the session.
const tableBlock = 1000

func (t *sessionTable) statement(s audit.Statement) error {
	fmt.Fprintf(t.tw, "%d\t%s\t%s\t%.16s\t%s\t%d\t%s\t%s\t%s\t%s\n", s.Seq, s.Time.UTC().Format("2006-01-02T15:04:05.000000Z"),
		s.Kind, s.SHA256, dash(s.Tag), s.Rows, s.Duration, s.Status, dash(s.SQLState), dash(oneLineText(s.Text, 60)))
	if t.rows++; t.rows%tableBlock == 0 {
		return t.tw.Flush()
	}
	return nil
}

func (t *sessionTable) end() error {
	if t.tw == nil {
		return nil
	}
	if err := t.tw.Flush(); err != nil {
		return err
	}
	_, err := fmt.Fprintf(t.w, "%d statements\n", t.rows)
	return err
}

// sessionJSON is the --json form: one JSON document, written as the statements are read.
type sessionJSON struct {
	w     io.Writer
	first bool
}

func (j *sessionJSON) header(id string, recs []audit.Record, rd *audit.StatementReader) error {
	if recs == nil {
		recs = []audit.Record{}
	}
	head := struct {
		Session       string                `json:"session_id"`
		Records       []audit.Record        `json:"records"`
		StatementsLog string                `json:"statements_log,omitempty"`
		Begin         *audit.StatementBegin `json:"begin,omitempty"`
	}{Session: id, Records: recs}
	if rd != nil {
		b := rd.Begin()
		head.StatementsLog, head.Begin = audit.StatementLogName(id), &b
	}
	out, err := json.MarshalIndent(head, "", "  ")
	if err != nil {
		return err
	}
	// Reopen the object to append the statements array.
	out = append(bytes.TrimSuffix(out, []byte("\n}")), []byte(",\n  \"statements\": [")...)
	j.first = true
	_, err = j.w.Write(out)
	return err
}

func (j *sessionJSON) statement(s audit.Statement) error {
	b, err := json.Marshal(s)
	if err != nil {
		return err
	}
	sep := ",\n    "
	if j.first {
		sep, j.first = "\n    ", false
	}
	_, err = j.w.Write(append([]byte(sep), b...))
	return err
}

func (j *sessionJSON) end() error {
	closing := "\n  ]\n}\n"
	if j.first {
		closing = "]\n}\n"
	}
	_, err := io.WriteString(j.w, closing)
	return err
}

// oneLineText folds whitespace and cuts to about n characters, for a table cell.
func oneLineText(s string, n int) string {
	s = strings.Join(strings.Fields(s), " ")
	if r := []rune(s); len(r) > n {
		return string(r[:n-1]) + "…"
	}
	return s
}
