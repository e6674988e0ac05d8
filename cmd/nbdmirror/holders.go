package main

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// deviceHolders describes who holds a block device: mounts of it, kernel
// holders (device-mapper, md, …) and processes other than this one with it
// open. It reads /proc and /sys; it opens nothing, so it never gets in the
// way of a mount or mkfs running at the same time.
func deviceHolders(path string) []string {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return nil
	}
	var out []string
	out = append(out, mountsOf(path, st.Rdev)...)
	if entries, err := os.ReadDir(filepath.Join("/sys/dev/block", fmt.Sprintf("%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev)), "holders")); err == nil {
		for _, e := range entries {
			out = append(out, fmt.Sprintf("%s held by %s", path, e.Name()))
		}
	}
	return append(out, openersOf(path, st.Rdev)...)
}

// mountsOf lists the mount points of the device (from mountinfo, whose
// third field is major:minor).
func mountsOf(path string, rdev uint64) []string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	want := fmt.Sprintf("%d:%d", unix.Major(rdev), unix.Minor(rdev))
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 4 && fields[2] == want {
			out = append(out, fmt.Sprintf("%s mounted on %s", path, fields[4]))
		}
	}
	return out
}

// openersOf lists the processes, other than this one, with the device
// open.
func openersOf(path string, rdev uint64) []string {
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	self := os.Getpid()
	var out []string
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil || pid == self {
			continue
		}
		fds, err := os.ReadDir(filepath.Join("/proc", p.Name(), "fd"))
		if err != nil {
			continue // gone, or not ours to see
		}
		for _, fd := range fds {
			var st unix.Stat_t
			if unix.Stat(filepath.Join("/proc", p.Name(), "fd", fd.Name()), &st) != nil {
				continue
			}
			if st.Mode&unix.S_IFMT == unix.S_IFBLK && st.Rdev == rdev {
				comm, _ := os.ReadFile(filepath.Join("/proc", p.Name(), "comm"))
				out = append(out, fmt.Sprintf("%s open by %s (pid %d)", path, strings.TrimSpace(string(comm)), pid))
				break
			}
		}
	}
	return out
}
