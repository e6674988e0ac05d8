package config

import (
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"
)

// Units of drbd.conf values. A bare number is in the option's default
// unit; a suffix K, M, G or T (powers of 1024, either case) or s (512-byte
// sectors) gives bytes instead, as drbdsetup reads them.
const (
	unitByte   = 1
	unitSector = 512
	unitKiB    = 1024
)

var suffixes = []struct {
	s string
	m int64
}{{"t", 1 << 40}, {"g", 1 << 30}, {"m", 1 << 20}, {"k", 1 << 10}, {"s", 512}}

// parseSize reads a size or rate in bytes. defUnit is the unit of a bare
// number; lo and hi bound the result in bytes.
func parseSize(t token, key string, defUnit, lo, hi int64) (int64, error) {
	text := strings.ToLower(t.text)
	mult := defUnit
	for _, s := range suffixes {
		if num, ok := strings.CutSuffix(text, s.s); ok {
			text, mult = num, s.m
			break
		}
	}
	n, err := strconv.ParseInt(text, 10, 64)
	if err != nil || n < 0 {
		return 0, errAt(t.pos, "%s %q: expected a whole number, optionally with a unit (K, M, G, T or s), e.g. %s",
			key, t.text, example(defUnit))
	}
	if n > math.MaxInt64/mult {
		return 0, errAt(t.pos, "%s %q is too large", key, t.text)
	}
	v := n * mult
	if v < lo || v > hi {
		return 0, errAt(t.pos, "%s %s is out of range: it must lie between %s and %s", key, t.text,
			formatSize(lo, defUnit), formatSize(hi, defUnit))
	}
	return v, nil
}

func example(defUnit int64) string {
	if defUnit == unitKiB {
		return "10M (a bare number means KiB)"
	}
	if defUnit == unitSector {
		return "1M (a bare number means 512-byte sectors)"
	}
	return "10M"
}

// formatSize writes bytes back in a form parseSize reads to the same value.
func formatSize(v, defUnit int64) string {
	if v == 0 {
		return "0"
	}
	for _, s := range suffixes[:4] {
		if v%s.m == 0 {
			return strconv.FormatInt(v/s.m, 10) + strings.ToUpper(s.s)
		}
	}
	if v%defUnit == 0 {
		return strconv.FormatInt(v/defUnit, 10)
	}
	return strconv.FormatInt(v/unitSector, 10) + "s"
}

// parseInt reads a plain integer in [lo, hi].
func parseInt(t token, key string, lo, hi int64) (int64, error) {
	n, err := strconv.ParseInt(t.text, 10, 64)
	if err != nil {
		return 0, errAt(t.pos, "%s %q: expected a whole number", key, t.text)
	}
	if n < lo || n > hi {
		return 0, errAt(t.pos, "%s %d is out of range: it must lie between %d and %d", key, n, lo, hi)
	}
	return n, nil
}

// parseTime reads an integer count of unit (drbd.conf uses tenths of a
// second for timeouts, seconds for intervals) in [lo, hi] units.
func parseTime(t token, key string, unit time.Duration, lo, hi int64) (time.Duration, error) {
	n, err := strconv.ParseInt(t.text, 10, 64)
	if err != nil {
		return 0, errAt(t.pos, "%s %q: expected a whole number of %s", key, t.text, unitName(unit))
	}
	if n < lo || n > hi {
		return 0, errAt(t.pos, "%s %d is out of range: it must lie between %d and %d (%s)", key, n, lo, hi, unitName(unit))
	}
	return time.Duration(n) * unit, nil
}

func unitName(u time.Duration) string {
	if u == time.Second {
		return "seconds"
	}
	return "tenths of a second"
}

// formatTime writes a duration in unit, with the value in plain words.
func formatTime(d, unit time.Duration) string {
	return fmt.Sprintf("%d", d/unit)
}

// parseBool reads yes/no (and the spellings drbd.conf accepts).
func parseBool(t token, key string) (bool, error) {
	switch strings.ToLower(t.text) {
	case "yes", "true", "on":
		return true, nil
	case "no", "false", "off":
		return false, nil
	}
	return false, errAt(t.pos, "%s %q: expected yes or no", key, t.text)
}

// oneOf checks an enumerated value.
func oneOf(t token, key string, allowed ...string) (string, error) {
	for _, a := range allowed {
		if t.text == a {
			return a, nil
		}
	}
	return "", errAt(t.pos, "%s %q: expected one of %s", key, t.text, strings.Join(allowed, ", "))
}
