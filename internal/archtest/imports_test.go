package archtest

import (
	"encoding/json"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

const module = "github.com/nbdmirror/nbdmirror"

// allowed lists, for each package of the module, the packages of the module
// it may import (directly or not). DESIGN.md §3: cmd → replicator →
// {metadisk, bitmap, transport}, cmd → nbd; nbd, transport, bitmap and
// metadisk import nothing of the module except metadisk → bitmap. blockdev
// (the local disk) is a leaf used by cmd and replicator. metrics reads
// replicator's snapshots for cmd (and satisfies nbd.Observer without
// importing nbd).
var allowed = map[string][]string{
	"nbd":                 {},
	"blockdev":            {},
	"bitmap":              {},
	"transport":           {},
	"metadisk":            {"bitmap"},
	"replicator/config":   {},
	"replicator/wire":     {"transport"},
	"replicator":          {"replicator/config", "replicator/wire", "metadisk", "bitmap", "transport", "blockdev"},
	"metrics":             {"replicator", "replicator/config", "replicator/wire", "metadisk", "bitmap", "transport", "blockdev"},
	"cmd/nbdmirror":       {"*"},
	"internal/archtest":   {},
	"internal/benchserve": {"nbd", "blockdev"},
	"internal/pagecache":  {},
	"integration":         {"*"},
}

type pkg struct {
	ImportPath string
	Deps       []string
}

func TestImportDirections(t *testing.T) {
	out, err := exec.Command("go", "list", "-json", "-tags", "integration", module+"/...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	dec := json.NewDecoder(strings.NewReader(string(out)))
	seen := 0
	for dec.More() {
		var p pkg
		if err := dec.Decode(&p); err != nil {
			t.Fatal(err)
		}
		seen++
		name := strings.TrimPrefix(strings.TrimPrefix(p.ImportPath, module), "/")
		rules, ok := allowed[name]
		if !ok {
			t.Errorf("package %s has no import rule: add it to allowed (and to DESIGN.md §3's picture)", name)
			continue
		}
		if len(rules) == 1 && rules[0] == "*" {
			continue
		}
		for _, d := range p.Deps {
			dep, ok := strings.CutPrefix(d, module+"/")
			if !ok {
				continue
			}
			if !slices.Contains(rules, dep) {
				t.Errorf("%s imports %s, against DESIGN.md §3", name, dep)
			}
		}
	}
	if seen < 3 {
		t.Fatalf("go list found only %d packages", seen)
	}
}
