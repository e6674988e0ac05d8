package config

import (
	"os"
	"testing"
	"testing/fstest"
)

// FuzzParse parses arbitrary configuration text: no panic, no hang, and a
// configuration that parses dumps to text that parses again.
func FuzzParse(f *testing.F) {
	for _, name := range []string{"testdata/vpn.conf", "testdata/full.conf", "testdata/full.d/r0.res", "testdata/full.d/r1.res"} {
		src, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(src)
	}
	f.Add([]byte(`include "*.conf"; skip { } resource x { on a { volume 0 { disk /d; } } }`))
	f.Fuzz(func(t *testing.T, src []byte) {
		fsys := fstest.MapFS{"c.conf": {Data: src}, "d.conf": {Data: []byte("common { }")}}
		c, err := Parse(fsys, "c.conf", "")
		if err != nil {
			return
		}
		var out []byte
		for _, r := range c.Resources {
			w := &byteWriter{}
			Dump(w, r)
			out = append(out, w.b...)
		}
		if _, err := Parse(fstest.MapFS{"dump.conf": {Data: out}}, "dump.conf", ""); err != nil {
			t.Fatalf("dump of an accepted configuration does not parse: %v\n%s", err, out)
		}
	})
}

type byteWriter struct{ b []byte }

func (w *byteWriter) Write(p []byte) (int, error) { w.b = append(w.b, p...); return len(p), nil }
