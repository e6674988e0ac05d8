//go:build integration

package integration

import (
	"compress/gzip"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestInstall: make install puts the binary, the systemd units, the OCF
// resource agent, the man page and the bash completion under PREFIX; the
// agent runs the installed binary and its meta-data is valid against
// resource-agents' ra-api-1.dtd (as ocf-tester checks it); systemd-analyze verify finds
// nothing wrong with the units (the template as an instance), whose
// hardening keeps the exposure score of `systemd-analyze security` at OK
// or better; the man page documents every command; the completion
// completes verbs, a verb's flags and the configured resources.
func TestInstall(t *testing.T) {
	need(t, "/usr/bin/systemd-analyze", "/usr/bin/man", "/usr/bin/make", "/bin/bash", "xmllint")
	const dtdDir = "/usr/share/resource-agents" // ra-api-1.dtd, from resource-agents
	if _, err := os.Stat(filepath.Join(dtdDir, "ra-api-1.dtd")); err != nil {
		unavailable(t, "needs resource-agents' ra-api-1.dtd: %v", err)
	}
	prefix := filepath.Join(t.TempDir(), "usr")
	install := exec.Command("make", "-C", "..", "install", "PREFIX="+prefix)
	if out, err := install.CombinedOutput(); err != nil {
		t.Fatalf("make install: %v\n%s", err, out)
	}
	units := filepath.Join(prefix, "lib/systemd/system")
	files := map[string]os.FileMode{
		"sbin/nbdmirror": 0o755, "lib/systemd/system/nbdmirror.service": 0o644,
		"lib/systemd/system/nbdmirror@.service": 0o644, "share/man/man8/nbdmirror.8.gz": 0o644,
		"share/bash-completion/completions/nbdmirror": 0o644, "lib/ocf/resource.d/nbdmirror/nbdmirror": 0o755,
	}
	for f, mode := range files {
		fi, err := os.Stat(filepath.Join(prefix, f))
		if err != nil {
			t.Fatalf("make install left no %s: %v", f, err)
		}
		if fi.Mode().Perm()&0o111 != mode&0o111 || fi.Size() == 0 {
			t.Errorf("%s: mode %v, %d bytes; want %v and content", f, fi.Mode().Perm(), fi.Size(), mode)
		}
	}
	unit, err := os.ReadFile(filepath.Join(units, "nbdmirror.service"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"ExecStart=" + prefix + "/sbin/nbdmirror daemon", "Type=notify"} {
		if !strings.Contains(string(unit), want+"\n") {
			t.Errorf("nbdmirror.service lacks %q:\n%s", want, unit)
		}
	}
	if regexp.MustCompile(`(?m)^PrivateDevices=`).Match(unit) {
		t.Error("nbdmirror.service sets PrivateDevices=, which hides the disks")
	}

	// The OCF agent: a shim that runs the installed binary, with valid
	// meta-data.
	agent := filepath.Join(prefix, "lib/ocf/resource.d/nbdmirror/nbdmirror")
	shim, err := os.ReadFile(agent)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(string(shim), "#!/bin/sh\n") || !strings.Contains(string(shim), "\nnbdmirror='"+prefix+"/sbin/nbdmirror'\n") {
		t.Errorf("the OCF agent does not run %s/sbin/nbdmirror:\n%s", prefix, shim)
	}
	lint := exec.Command("/bin/sh", "-c", `"$1" meta-data | xmllint --noout --valid -`, "lint", agent)
	lint.Dir = dtdDir
	if out, err := lint.CombinedOutput(); err != nil || len(out) != 0 {
		t.Errorf("%s meta-data | xmllint --valid: %v\n%s", agent, err, out)
	}

	// The units as systemd would load them from the install: the search
	// path starts there (the trailing colon keeps the system's), and man
	// finds the page Documentation= names.
	env := append(os.Environ(), "SYSTEMD_UNIT_PATH="+units+":", "MANPATH="+filepath.Join(prefix, "share/man")+":")
	verify := exec.Command("systemd-analyze", "verify", "nbdmirror.service", "nbdmirror@r0.service")
	verify.Env = env
	if out, err := verify.CombinedOutput(); err != nil || strings.Contains(string(out), "nbdmirror") {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
	sec := exec.Command("systemd-analyze", "security", "--offline=yes", "nbdmirror.service")
	sec.Env = env
	out, err := sec.CombinedOutput()
	m := regexp.MustCompile(`Overall exposure level for nbdmirror\.service: ([0-9.]+) (\S+)`).FindStringSubmatch(string(out))
	if m == nil {
		t.Fatalf("systemd-analyze security: %v, no exposure level\n%s", err, out)
	}
	if score, _ := strconv.ParseFloat(m[1], 64); score >= 5 {
		t.Errorf("nbdmirror.service exposure %s %s, want below 5 (OK or better)\n%s", m[1], m[2], out)
	}

	// Every visible command is in the man page.
	f, err := os.Open(filepath.Join(prefix, "share/man/man8/nbdmirror.8.gz"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	page, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(string(page), ".nh\n.TH nbdmirror 8") {
		t.Errorf("man page does not start as a section 8 page:\n%.200s", page)
	}
	_, helpOut, _ := runCLI(t, time.Minute, []string{"help"})
	verbs := commandNames(helpOut)
	if len(verbs) < 20 {
		t.Fatalf("nbdmirror help lists %d commands:\n%s", len(verbs), helpOut)
	}
	for _, v := range verbs {
		if !regexp.MustCompile(`(?m)^\.SH ` + regexp.QuoteMeta(v) + `\b`).Match(page) {
			t.Errorf("the man page has no section for %s", v)
		}
	}

	// Completion, from the installed script, as bash calls it.
	dir := t.TempDir()
	conf := filepath.Join(dir, "nbdmirror.conf")
	if err := os.WriteFile(conf, []byte(
		"resource r0 { disk /dev/null; meta-disk internal; on alpha { address 127.0.0.1:7789; } on beta { address 127.0.0.2:7789; } }\n"+
			"resource web { disk /dev/null; meta-disk internal; on alpha { address 127.0.0.1:7790; } on beta { address 127.0.0.2:7790; } }\n"),
		0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "my disk.img"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	script := filepath.Join(prefix, "share/bash-completion/completions/nbdmirror")
	bin := filepath.Join(prefix, "sbin/nbdmirror")
	tests := []struct {
		line string // the command line up to the cursor (bash's COMP_LINE)
		want []string
	}{
		{"nbdmirror pri", []string{"primary"}},
		{"nbdmirror wait-", []string{"wait-connect", "wait-sync"}},
		{"nbdmirror --log-level w", []string{"warn"}},
		{"nbdmirror --log-level=w", []string{"warn"}},
		{"nbdmirror connect --d", []string{"--discard-my-data"}},
		{"nbdmirror --node alpha --config " + conf + " up ", []string{"all", "r0", "web"}},
		{"nbdmirror --config=" + conf + " --node=alpha primary w", []string{"web"}},
		{"nbdmirror ocf m", []string{"meta-data", "monitor"}},
		{"nbdmirror --config " + conf + " --node alpha daemon --metrics-listen ", nil},
		{"nbdmirror serve --file " + filepath.Join(dir, "my"), []string{filepath.Join(dir, "my disk.img")}},
		{"nbdmirror --config=" + filepath.Join(dir, "nbdm"), []string{conf}},
	}
	for _, tc := range tests {
		line := strings.Replace(tc.line, "nbdmirror", bin, 1)
		cmd := exec.Command("/bin/bash", "-c", `source "$1"; COMP_LINE=$2; COMP_POINT=${#COMP_LINE}; `+
			`_nbdmirror; printf '%s\n' "${COMPREPLY[@]}"`, "completion", script, line)
		out, err := cmd.CombinedOutput()
		var got []string
		for _, l := range strings.Split(strings.TrimRight(string(out), "\n"), "\n") {
			if l != "" {
				got = append(got, l)
			}
		}
		slices.Sort(got)
		if err != nil || !slices.Equal(got, tc.want) {
			t.Errorf("completing %q: %v %q, want %q", tc.line, err, got, tc.want)
		}
	}
}

// commandNames returns the commands `nbdmirror help` lists.
func commandNames(help string) []string {
	_, rest, _ := strings.Cut(help, "COMMANDS:\n")
	block, _, _ := strings.Cut(rest, "\n\n")
	var names []string
	for _, line := range strings.Split(block, "\n") {
		name, _, _ := strings.Cut(strings.TrimSpace(line), " ")
		name = strings.TrimSuffix(name, ",")
		if name != "" && name != "help" {
			names = append(names, name)
		}
	}
	return names
}

// TestDaemon_IOFlusher: the daemon make build produces (no cgo) marks every
// one of its threads an I/O flusher (PF_MEMALLOC_NOIO and
// PF_LOCAL_THROTTLE, as PR_SET_IO_FLUSHER sets them) where it may (with
// CAP_SYS_RESOURCE), and says so, or says that it may not and marks none;
// a build with cgo (the race detector's) marks none and says why.
func TestDaemon_IOFlusher(t *testing.T) {
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	capEff := regexp.MustCompile(`(?m)^CapEff:\s*([0-9a-f]+)$`).FindSubmatch(status)
	if capEff == nil {
		t.Fatalf("no CapEff in /proc/self/status:\n%s", status)
	}
	caps, _ := strconv.ParseUint(string(capEff[1]), 16, 64)
	const capSysResource = 24
	allowed := caps&(1<<capSysResource) != 0 // the daemon inherits the test's capabilities
	staticLog := "PR_SET_IO_FLUSHER not allowed: the daemon needs CAP_SYS_RESOURCE"
	if allowed {
		staticLog = "memory reclaim in the daemon's threads does not wait for I/O (PR_SET_IO_FLUSHER)"
	}
	t.Logf("CAP_SYS_RESOURCE: %v", allowed)
	static := filepath.Join(t.TempDir(), "nbdmirror")
	build := exec.Command("go", "build", "-o", static, "../cmd/nbdmirror")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build without cgo: %v\n%s", err, out)
	}
	const pfMemallocNoIO, pfLocalThrottle = 0x00080000, 0x00100000
	for _, tc := range []struct {
		name, bin string
		set       bool
		log       string
	}{
		{"without cgo", static, allowed, staticLog},
		{"with cgo", binary, false, "PR_SET_IO_FLUSHER not set: this build links C code (cgo)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := newNode(t, 16*mib, 7)
			p := startEnv(t, []string{"NOTIFY_SOCKET="}, tc.bin, "--config", n.conf, "--node", "alpha", "--run-dir", n.runDir,
				"daemon", "--up", "r0")
			waitUnix(t, p, filepath.Join(n.runDir, "control.sock"))
			n.must("status", "r0") // answered: the daemon serves r0
			tasks, err := os.ReadDir(filepath.Join("/proc", strconv.Itoa(p.cmd.Process.Pid), "task"))
			if err != nil || len(tasks) < 2 {
				t.Fatalf("threads of the daemon: %v (%d)", err, len(tasks))
			}
			for _, task := range tasks {
				stat, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(p.cmd.Process.Pid), "task", task.Name(), "stat"))
				if err != nil {
					t.Fatal(err)
				}
				// Fields after the command name (in parentheses): state,
				// ppid, pgrp, session, tty, tpgid, flags.
				_, rest, _ := strings.Cut(string(stat), ") ")
				fields := strings.Fields(rest)
				flags, err := strconv.ParseUint(fields[6], 10, 64)
				if err != nil {
					t.Fatalf("thread %s: flags %q: %v", task.Name(), fields[6], err)
				}
				if set := flags&pfMemallocNoIO != 0 && flags&pfLocalThrottle != 0; set != tc.set {
					t.Errorf("thread %s of %d: flags %#x, I/O flusher %v, want %v", task.Name(), len(tasks), flags, set, tc.set)
				}
			}
			if !strings.Contains(p.out.String(), tc.log) {
				t.Errorf("daemon log lacks %q:\n%s", tc.log, p.out)
			}
		})
	}
}
