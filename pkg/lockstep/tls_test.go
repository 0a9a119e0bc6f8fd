package lockstep

import (
	"crypto/tls"
	"errors"
	"net"
	"path/filepath"
	"testing"
	"time"
)

// namesPKI is the test pair's PKI plus certificates from the same CA that
// must not pass as either host: another host's, and one carrying both the
// pair's names (a certificate copied to both hosts, or a wildcard).
type namesPKI struct {
	testPKI
	certs map[string]tls.Certificate // by file: primary, secondary, intruder, twin
}

func newNamesPKI(t *testing.T) namesPKI {
	t.Helper()
	dir := t.TempDir()
	err := generatePKI(dir, []certSpec{
		{"primary", []string{primaryHost}},
		{"secondary", []string{secondaryHost}},
		{"intruder", []string{"host-c"}},
		{"twin", []string{primaryHost, secondaryHost}},
	})
	if err != nil {
		t.Fatal(err)
	}
	f := func(name string) string { return filepath.Join(dir, name) }
	p := namesPKI{testPKI: loadTestPKI(t, dir), certs: map[string]tls.Certificate{}}
	for _, name := range []string{"primary", "secondary", "intruder", "twin"} {
		if p.certs[name], err = tls.LoadX509KeyPair(f(name+".pem"), f(name+"-key.pem")); err != nil {
			t.Fatal(err)
		}
	}
	return p
}

// presenting is cfg presenting the certificate in file instead of its own.
func (p namesPKI) presenting(cfg *tls.Config, file string) *tls.Config {
	cfg = cfg.Clone()
	cfg.Certificates = []tls.Certificate{p.certs[file]}
	return cfg
}

// handshake runs one TLS handshake over loopback and returns each end's
// error. With TLS 1.3 the client finishes first: a client certificate the
// server refuses only shows in serverErr.
func handshake(t *testing.T, server, client *tls.Config) (serverErr, clientErr error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	done := make(chan error, 1)
	go func() {
		raw, err := ln.Accept()
		if err != nil {
			done <- err
			return
		}
		defer raw.Close()
		raw.SetDeadline(time.Now().Add(10 * time.Second))
		done <- tls.Server(raw, server).Handshake()
	}()
	raw, err := net.DialTimeout("tcp", ln.Addr().String(), 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	raw.SetDeadline(time.Now().Add(10 * time.Second))
	clientErr = tls.Client(raw, client).Handshake()
	if clientErr != nil {
		raw.Close() // the server may still wait for the client's Finished
	}
	return <-done, clientErr
}

func TestTLSPinsThePeersName(t *testing.T) {
	pki := newNamesPKI(t)
	t.Run("secondary", func(t *testing.T) {
		for _, tc := range []struct {
			file string
			want error
		}{
			{"primary", nil},
			{"intruder", ErrWrongPeer},
			{"secondary", ErrSameName}, // a client with the secondary's own name
			{"twin", ErrSameName},
		} {
			serverErr, _ := handshake(t, pki.server, pki.presenting(pki.client, tc.file))
			if (tc.want == nil) != (serverErr == nil) || (tc.want != nil && !errors.Is(serverErr, tc.want)) {
				t.Errorf("client presenting %s.pem: secondary's handshake error %v, want %v", tc.file, serverErr, tc.want)
			}
		}
	})
	t.Run("primary", func(t *testing.T) {
		for _, tc := range []struct {
			file    string
			refused bool
			want    error // beyond refused: crypto/tls's own server name check catches the others first
		}{
			{"secondary", false, nil},
			{"intruder", true, nil},
			{"primary", true, nil}, // a server with the primary's own name
			{"twin", true, ErrSameName},
		} {
			_, clientErr := handshake(t, pki.presenting(pki.server, tc.file), pki.client)
			if (clientErr != nil) != tc.refused || (tc.want != nil && !errors.Is(clientErr, tc.want)) {
				t.Errorf("secondary presenting %s.pem: primary's handshake error %v, want refused %v (%v)", tc.file, clientErr, tc.refused, tc.want)
			}
		}
	})
}

// TestSecondaryAdmitsOnlyItsPrimary: a primary whose certificate is from the
// CA but carries another host's name, or the secondary's own, is refused as
// auth and never connects; the pinned one streams.
func TestSecondaryAdmitsOnlyItsPrimary(t *testing.T) {
	pki := newNamesPKI(t)
	var frames frameLog
	s := startSecondary(t, pki.testPKI, SecondaryConfig{OnFrame: frames.onFrame})
	for _, file := range []string{"intruder", "secondary", "twin"} {
		t.Run(file, func(t *testing.T) {
			before := s.Stats().Errors[ReasonAuth]
			p := newTestPrimary(t, pki.testPKI, s.Addr().String(), PrimaryConfig{TLS: pki.presenting(pki.client, file)})
			appendFrames(t, p, 1, 1)
			run(t, p.Run)
			waitFor(t, "auth counted", func() bool { return s.Stats().Errors[ReasonAuth] > before })
			if s.Connected() || p.Connected() || s.Received() != 0 {
				t.Errorf("a primary presenting %s.pem got in: connected %v %v, received %d", file, s.Connected(), p.Connected(), s.Received())
			}
		})
	}
	var acks ackLog
	p := newTestPrimary(t, pki.testPKI, s.Addr().String(), PrimaryConfig{OnAck: acks.onAck})
	appendFrames(t, p, 1, 10)
	run(t, p.Run)
	waitFor(t, "acks from the pinned primary", func() bool { return p.Acked() == 10 })
	frames.check(t, 10)
}

// TestPrimaryDialsOnlyItsSecondary: whoever answers at the secondary's
// address must be the secondary, not another host from the CA nor one with
// the primary's own name.
func TestPrimaryDialsOnlyItsSecondary(t *testing.T) {
	pki := newNamesPKI(t)
	for _, file := range []string{"intruder", "primary", "twin"} {
		t.Run(file, func(t *testing.T) {
			ln := handshakeOnly(t, pki.presenting(pki.server, file))
			p := newTestPrimary(t, pki.testPKI, ln.Addr().String(), PrimaryConfig{})
			run(t, p.Run)
			waitFor(t, "auth counted", func() bool { return p.Stats().Errors[ReasonAuth] >= 1 })
			if p.Connected() {
				t.Errorf("connected to a secondary presenting %s.pem", file)
			}
		})
	}
}

func TestTLSConfigNames(t *testing.T) {
	pki := newNamesPKI(t)
	f := func(name string) string { return filepath.Join(pki.dir, name) }
	for _, tc := range []struct {
		name string
		id   Identity
		want error
	}{
		{"peer is self", Identity{Self: secondaryHost, Peer: secondaryHost}, ErrSameName},
		{"peer is self in other case", Identity{Self: secondaryHost, Peer: "HOST-B"}, ErrSameName},
		{"no peer", Identity{Self: secondaryHost}, nil},
		{"not a host name", Identity{Self: secondaryHost, Peer: "*.lab"}, nil},
		{"an address", Identity{Self: secondaryHost, Peer: "198.18.0.1"}, nil},
		{"own certificate for another host", primaryID, nil},
	} {
		_, serverErr := ServerTLS(f("secondary.pem"), f("secondary-key.pem"), f("ca.pem"), tc.id)
		_, clientErr := ClientTLS(f("secondary.pem"), f("secondary-key.pem"), f("ca.pem"), tc.id)
		for _, err := range []error{serverErr, clientErr} {
			if err == nil || (tc.want != nil && !errors.Is(err, tc.want)) {
				t.Errorf("%s: %v, want an error (%v)", tc.name, err, tc.want)
			}
		}
	}

	unpinned := pki.server.Clone()
	unpinned.VerifyConnection = nil
	if _, err := NewSecondary(SecondaryConfig{Listen: "127.0.0.1:0", TLS: unpinned, VM: testVM}); err == nil {
		t.Error("secondary accepted a TLS config that does not pin the primary's name")
	}
	unpinned = pki.client.Clone()
	unpinned.ServerName = ""
	if _, err := NewPrimary(PrimaryConfig{Addr: "127.0.0.1:1", TLS: unpinned, VM: testVM}); err == nil {
		t.Error("primary accepted a TLS config that does not pin the secondary's name")
	}
	if err := GenerateLabPKI(t.TempDir(), "host-a", "Host-A"); !errors.Is(err, ErrSameName) {
		t.Errorf("GenerateLabPKI with one name for both hosts: %v", err)
	}
}
