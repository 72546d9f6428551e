package track

import "testing"

func closed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

func TestTracker(t *testing.T) {
	var tr Tracker
	if !closed(tr.Idle()) {
		t.Fatal("a new tracker is not idle")
	}
	tr.Add()
	if !tr.TryAdd() {
		t.Fatal("TryAdd failed before Seal")
	}
	idle := tr.Idle()
	if closed(idle) || tr.Active() != 2 {
		t.Fatal("idle with two streams")
	}
	tr.Seal()
	if tr.TryAdd() {
		t.Fatal("TryAdd succeeded after Seal")
	}
	tr.Done()
	if closed(idle) {
		t.Fatal("idle with one stream left")
	}
	tr.Done()
	if !closed(idle) || tr.Active() != 0 {
		t.Fatal("not idle after the last stream")
	}
	tr.Add() // a late Add does not reopen a channel already handed out
	if !closed(idle) || closed(tr.Idle()) {
		t.Fatal("Idle semantics broken by a later Add")
	}
}
