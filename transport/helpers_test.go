package transport

import (
	"bytes"
	"encoding/binary"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"
)

// resumPlain recomputes the checksum of a session's plain frame a test
// changed.
func resumPlain(b []byte) []byte {
	n := len(b) - sumSize
	s := frameSealer{xxh3: true}
	binary.BigEndian.PutUint64(b[n:], s.checksum(b[:headerSize], b[headerSize:n], nil))
	return b
}

// logBuffer collects log output for assertions, and echoes it to the test.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

func (l *logBuffer) logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(l, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// waitLog waits until the log contains s.
func (l *logBuffer) waitLog(t testing.TB, s string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(l.String(), s) {
		if time.Now().After(deadline) {
			t.Fatalf("log never said %q:\n%s", s, l.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// configs returns the two sides of resource r0 between alpha and beta.
func configs(secret string) (Config, Config) {
	a := Config{Resource: "r0", Local: []string{"alpha"}, Peer: []string{"beta"}, Types: []Type{typeTest, typeTest + 1},
		PingInterval: 200 * time.Millisecond, PingTimeout: 2 * time.Second, Timeout: 5 * time.Second,
		ConnectInterval: time.Second, HandshakeTimeout: 2 * time.Second}
	b := a
	b.Local, b.Peer = a.Peer, a.Local
	if secret != "" {
		a.Secret, b.Secret = []byte(secret), []byte(secret)
	}
	return a, b
}

// newLink starts a Link between a and b, closed when the test ends.
func newLink(t testing.TB, a, b Config) *Link {
	t.Helper()
	l, err := NewLink(a, b)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(l.Close)
	return l
}
