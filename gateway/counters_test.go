package gateway

import (
	"fmt"
	"testing"
)

// TestResourceBytesLabelCap checks that the per-resource byte counters stop creating new
// names at maxResourceLabels and count the rest under OtherResource.
func TestResourceBytesLabelCap(t *testing.T) {
	var r resourceCounters
	for i := range maxResourceLabels + 10 {
		r.get(fmt.Sprintf("res-%d", i)).up.Add(1)
	}
	r.get("res-0").down.Add(5) // an existing name keeps its own counter
	s := r.snapshot()
	if len(s) != maxResourceLabels+1 {
		t.Fatalf("%d resource names kept, want %d and %q", len(s), maxResourceLabels, OtherResource)
	}
	if got := s[OtherResource].Up; got != 10 {
		t.Fatalf("other.up = %d, want the 10 resources beyond the cap", got)
	}
	if s["res-0"].Down != 5 {
		t.Fatalf("res-0.down = %d, want 5", s["res-0"].Down)
	}
}

// TestStreamOpenHistogramIsCumulative checks the bucket arithmetic.
func TestStreamOpenHistogramIsCumulative(t *testing.T) {
	var h histogram
	for _, v := range []float64{0.0001, 0.003, 0.003, 20} {
		h.observe(v)
	}
	s := h.snapshot()
	if s.Count != 4 || s.Buckets[0.0005] != 1 || s.Buckets[0.0025] != 1 || s.Buckets[0.005] != 3 || s.Buckets[10] != 3 {
		t.Fatalf("histogram = %+v", s)
	}
	if s.Sum < 20.006 || s.Sum > 20.0062 {
		t.Fatalf("sum = %v", s.Sum)
	}
}
