//go:build !race

package metadisk

const raceEnabled = false
