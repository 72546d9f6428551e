package main

import "testing"

func TestParseExpose(t *testing.T) {
	got, err := parseExpose([]string{"pg=127.0.0.1:5432", "web=http://127.0.0.1:8080", "site=http://intranet.local/", "v6=http://[::1]"})
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"pg": "127.0.0.1:5432", "web": "127.0.0.1:8080", "site": "intranet.local:80", "v6": "[::1]:80"}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %q, want %q", k, got[k], v)
		}
	}
	for _, bad := range []string{"web", "=127.0.0.1:1", "web=https://127.0.0.1:8443", "web=http://127.0.0.1:8080/app", "web=http://", "web=ftp://x:21"} {
		if _, err := parseExpose([]string{bad}); err == nil {
			t.Errorf("parseExpose(%q) accepted", bad)
		}
	}
	if _, err := parseExpose([]string{"a=127.0.0.1:1", "a=127.0.0.1:2"}); err == nil {
		t.Error("the same name with two addresses was accepted")
	}
}
