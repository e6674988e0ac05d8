//go:build race

package metadisk

// raceEnabled: the race detector slows the crash test about fivefold, so it
// runs fewer crash points under -race; `make unit` runs the full count
// without it as well.
const raceEnabled = true
