package transport

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"testing"
	"time"
)

// testCA is a certificate authority for TLS tests.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
}

func newCA(t testing.TB, name string) *testCA {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &testCA{cert, key, pool}
}

// issue makes a certificate for a node name, usable by clients and servers.
func (ca *testCA) issue(t testing.TB, node string) tls.Certificate {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: node},
		DNSNames: []string{node}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

func TestTLS(t *testing.T) {
	ca, other := newCA(t, "site CA"), newCA(t, "someone else's CA")
	tests := []struct {
		name   string
		aTLS   *TLSConfig
		bTLS   *TLSConfig
		wantUp bool
		logged string // in beta's log
	}{
		{"both verified", &TLSConfig{ca.issue(t, "alpha"), ca.pool}, &TLSConfig{ca.issue(t, "beta"), ca.pool}, true, ""},
		{"client certificate from another CA", &TLSConfig{other.issue(t, "alpha"), ca.pool}, &TLSConfig{ca.issue(t, "beta"), ca.pool},
			false, "certificate signed by unknown authority"},
		{"client certificate for another node", &TLSConfig{ca.issue(t, "mallory"), ca.pool}, &TLSConfig{ca.issue(t, "beta"), ca.pool},
			false, "not valid for node alpha"},
		{"plaintext client", nil, &TLSConfig{ca.issue(t, "beta"), ca.pool}, false, "peer authentication failed"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a, b := configs("k")
			a.TLS, b.TLS = tc.aTLS, tc.bTLS
			addr := listen(t)
			b.ListenAddr, a.PeerAddr = addr, addr
			var lb logBuffer
			b.Logger = lb.logger()
			tb := start(t, b)
			ta := start(t, a)
			if tc.wantUp {
				sa, sb := sessions(t, ta, tb)
				exchange(t, sa, sb)
				if st := tb.Stats(); !st.TLS || !st.Encrypted {
					t.Errorf("stats %+v", st)
				}
				return
			}
			lb.waitLog(t, tc.logged)
			if tb.Current() != nil || ta.Current() != nil {
				t.Fatal("a session came up")
			}
		})
	}
}

// TestTLS_PlaintextPeerNamed: when only one node has TLS configured, both
// say so in their logs instead of reporting a garbled record or an
// oversized frame, whichever side dials.
func TestTLS_PlaintextPeerNamed(t *testing.T) {
	ca := newCA(t, "site CA")
	const speaksTLS, noTLS = "the peer speaks TLS", "the peer does not speak TLS"
	tests := []struct {
		name                   string
		listenerTLS            bool
		wantListener, wantDial string
	}{
		{"plaintext node dials a TLS node", true, noTLS, ""},
		{"TLS node dials a plaintext node", false, speaksTLS, noTLS},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dialer, listener := configs("k")
			tlsCfg := &TLSConfig{ca.issue(t, listener.Local[0]), ca.pool}
			if !tc.listenerTLS {
				tlsCfg = &TLSConfig{ca.issue(t, dialer.Local[0]), ca.pool}
				dialer.TLS = tlsCfg
			} else {
				listener.TLS = tlsCfg
			}
			addr := listen(t)
			listener.ListenAddr, dialer.PeerAddr = addr, addr
			var ll, dl logBuffer
			listener.Logger, dialer.Logger = ll.logger(), dl.logger()
			tl := start(t, listener)
			td := start(t, dialer)
			ll.waitLog(t, tc.wantListener)
			if tc.wantDial != "" {
				dl.waitLog(t, tc.wantDial)
			}
			if tl.Current() != nil || td.Current() != nil {
				t.Fatal("a session came up")
			}
		})
	}
}
