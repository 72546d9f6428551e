package tunnel_test

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/wicketgw/wicket/tunnel"
	"github.com/wicketgw/wicket/tunnel/tunnelbench"
)

// The benchmarks compare the tunnel path with the raw TLS relay pair IN THE
// SAME RUN (see tunnel/tunnelbench): run them together and compare the
// tunnel/ and raw-tls/ lines of each benchmark.
//
//	go test -run '^$' -bench . ./tunnel/

func newRig(b *testing.B) *tunnelbench.Rig {
	b.Helper()
	r, err := tunnelbench.NewRig(tunnel.DefaultConfig())
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(r.Close)
	return r
}

func BenchmarkThroughput(b *testing.B) {
	r := newRig(b)
	for _, streams := range []int{1, 8} {
		for _, p := range []tunnelbench.Path{tunnelbench.Raw, tunnelbench.Tunnel} {
			name := p.String() + "/" + map[int]string{1: "1-stream", 8: "8-streams"}[streams]
			b.Run(name, func(b *testing.B) {
				const perStream = 16 << 20
				b.SetBytes(perStream * int64(streams))
				for b.Loop() {
					if _, err := r.Throughput(p, streams, perStream); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

func BenchmarkEcho64(b *testing.B) {
	r := newRig(b)
	for _, p := range []tunnelbench.Path{tunnelbench.Raw, tunnelbench.Tunnel} {
		b.Run(p.String(), func(b *testing.B) {
			var all []time.Duration
			for b.Loop() {
				d, err := r.EchoRTT(p, 100)
				if err != nil {
					b.Fatal(err)
				}
				all = append(all, d...)
			}
			b.ReportMetric(float64(pct(all, 50).Microseconds()), "p50-us")
			b.ReportMetric(float64(pct(all, 99).Microseconds()), "p99-us")
		})
	}
}

func BenchmarkStreamOpen(b *testing.B) {
	r := newRig(b)
	b.Run("tunnel-stream", func(b *testing.B) {
		var all []time.Duration
		for b.Loop() {
			d, err := r.OpenLatency(1)
			if err != nil {
				b.Fatal(err)
			}
			all = append(all, d...)
		}
		b.ReportMetric(float64(pct(all, 50).Microseconds()), "p50-us")
	})
	b.Run("raw-tls-connection", func(b *testing.B) {
		var all []time.Duration
		for b.Loop() {
			d, err := r.RawOpenLatency(1)
			if err != nil {
				b.Fatal(err)
			}
			all = append(all, d...)
		}
		b.ReportMetric(float64(pct(all, 50).Microseconds()), "p50-us")
	})
}

func pct(d []time.Duration, p int) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	return s[min(len(s)-1, len(s)*p/100)]
}

// BenchmarkWindowAtRTT shows what MaxStreamWindowSize does to one stream on
// a 20 ms round trip (a delay proxy with no bandwidth limit): throughput is
// about window / RTT until the CPU becomes the limit.
func BenchmarkWindowAtRTT(b *testing.B) {
	for _, w := range []uint32{256 << 10, 1 << 20, 4 << 20, 16 << 20} {
		b.Run(fmt.Sprintf("window-%dKiB", w>>10), func(b *testing.B) {
			cfg := tunnel.DefaultConfig()
			cfg.MaxStreamWindowSize = w
			n := int64(w) * 8 // enough round trips to reach steady state
			b.SetBytes(n)
			for b.Loop() {
				if _, err := tunnelbench.WindowThroughput(cfg, 20*time.Millisecond, n); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
