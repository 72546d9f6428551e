package audit

import (
	"path/filepath"
	"testing"
)

// BenchmarkWrite compares the production setting (fsync per record) with
// NoSync in the same run, so the cost of durability is read off directly.
func BenchmarkWrite(b *testing.B) {
	for _, bc := range []struct {
		name   string
		noSync bool
	}{{"fsync", false}, {"nosync", true}} {
		b.Run(bc.name, func(b *testing.B) {
			l, err := OpenWithOptions(filepath.Join(b.TempDir(), "audit.log"), Options{NoSync: bc.noSync})
			if err != nil {
				b.Fatal(err)
			}
			defer l.Close()
			r := sampleRecord(1)
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				if err := l.Write(r); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkVerify measures verification speed over a 10,000-record log.
func BenchmarkVerify(b *testing.B) {
	path := filepath.Join(b.TempDir(), "audit.log")
	l, err := OpenWithOptions(path, Options{NoSync: true})
	if err != nil {
		b.Fatal(err)
	}
	for i := range 10000 {
		if err := l.Write(sampleRecord(i)); err != nil {
			b.Fatal(err)
		}
	}
	l.Close()
	b.ResetTimer()
	for b.Loop() {
		if _, err := VerifyFile(path); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkWriteParallel is BenchmarkWrite with 16 concurrent writers (8 per
// CPU), the shape of a busy gateway where many streams open and close at
// once; ns/op is per record across all writers.
func BenchmarkWriteParallel(b *testing.B) {
	for _, bc := range []struct {
		name   string
		noSync bool
	}{{"fsync", false}, {"nosync", true}} {
		b.Run(bc.name, func(b *testing.B) {
			l, err := OpenWithOptions(filepath.Join(b.TempDir(), "audit.log"), Options{NoSync: bc.noSync})
			if err != nil {
				b.Fatal(err)
			}
			defer l.Close()
			b.SetParallelism(8)
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				r := sampleRecord(1)
				for pb.Next() {
					if err := l.Write(r); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}
