package lockstep

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"
)

// GenerateLabPKI writes a fresh CA and a certificate and key for each host
// into dir: ca.pem, primary.pem, primary-key.pem, secondary.pem and
// secondary-key.pem. Each host's certificate carries its host name (the
// config's name, which its peer pins) as a DNS SAN; the files are named
// after the host's role on the VM's first boot. Keys are ECDSA P-256,
// certificates valid 10 years. Both host certificates allow client and
// server use, because after a failover the secondary becomes the primary.
// It refuses to overwrite existing files: a half-replaced PKI would lock the
// hosts out of each other.
func GenerateLabPKI(dir, primaryName, secondaryName string) error {
	for _, name := range []string{primaryName, secondaryName} {
		if err := CheckHostName(name); err != nil {
			return fmt.Errorf("generate lab pki: %w", err)
		}
	}
	if strings.EqualFold(primaryName, secondaryName) {
		return fmt.Errorf("generate lab pki: both hosts are called %q: %w", primaryName, ErrSameName)
	}
	return generatePKI(dir, []certSpec{{"primary", []string{primaryName}}, {"secondary", []string{secondaryName}}})
}

// certSpec is one certificate of a PKI: file.pem and file-key.pem, for
// names.
type certSpec struct {
	file  string
	names []string
}

// generatePKI writes ca.pem and the certificates of certs, all new.
func generatePKI(dir string, certs []certSpec) error {
	paths := []string{"ca.pem"}
	for _, c := range certs {
		paths = append(paths, c.file+".pem", c.file+"-key.pem")
	}
	for _, name := range paths {
		path := filepath.Join(dir, name)
		if _, err := os.Lstat(path); err == nil {
			return fmt.Errorf("generate lab pki: %s exists; remove the old PKI first", path)
		}
	}
	files := map[string][]byte{}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("generate lab pki: %w", err)
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "ftgw lab CA"},
		NotBefore:             now.Add(-time.Hour), // tolerate clock skew between hosts
		NotAfter:              now.AddDate(10, 0, 0),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return fmt.Errorf("generate lab pki: create CA: %w", err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return fmt.Errorf("generate lab pki: %w", err)
	}
	files["ca.pem"] = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})

	for _, c := range certs {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return fmt.Errorf("generate lab pki: %w", err)
		}
		tmpl := &x509.Certificate{
			SerialNumber: serial(),
			Subject:      pkix.Name{CommonName: c.names[0]},
			DNSNames:     c.names,
			NotBefore:    caTmpl.NotBefore,
			NotAfter:     caTmpl.NotAfter,
			KeyUsage:     x509.KeyUsageDigitalSignature,
			ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			return fmt.Errorf("generate lab pki: create %s certificate: %w", c.file, err)
		}
		keyDER, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return fmt.Errorf("generate lab pki: %w", err)
		}
		files[c.file+".pem"] = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
		files[c.file+"-key.pem"] = pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	}

	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("generate lab pki: %w", err)
	}
	for name, data := range files {
		perm := os.FileMode(0o644)
		if strings.HasSuffix(name, "-key.pem") {
			perm = 0o600
		}
		if err := writeNew(filepath.Join(dir, name), data, perm); err != nil {
			return fmt.Errorf("generate lab pki: %w", err)
		}
	}
	return nil
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return n
}

// writeNew writes a file that must not exist yet.
func writeNew(path string, data []byte, perm os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// Identity is who the two ends of the log channel are: the host names their
// certificates carry (DNS SANs). Any certificate from the CA would otherwise
// do, so any host the CA signed for, a client of some other service or a
// third ftgw host, could feed a VM's log or take it.
type Identity struct {
	Self string // this host's name; its own certificate must carry it
	Peer string // the only host accepted at the other end
}

var (
	// ErrWrongPeer: the other end's certificate, though from the CA, does
	// not carry the peer's name.
	ErrWrongPeer = errors.New("certificate is not the peer's")
	// ErrSameName: the other end's certificate carries this host's own
	// name (two hosts configured with one name, or one certificate copied
	// to both), or a configuration names this host as its own peer. The
	// arbiter tells hosts apart by name, so two hosts with one name could
	// both be told they won the same epoch.
	ErrSameName = errors.New("peer has this host's name")
)

// ServerTLS is the secondary's config: TLS 1.3 only, and clients must
// present a certificate signed by the CA in caFile that carries id.Peer and
// not id.Self.
func ServerTLS(certFile, keyFile, caFile string, id Identity) (*tls.Config, error) {
	cert, pool, err := loadPKI(certFile, keyFile, caFile, id)
	if err != nil {
		return nil, fmt.Errorf("load server tls: %w", err)
	}
	return &tls.Config{
		MinVersion:       tls.VersionTLS13,
		Certificates:     []tls.Certificate{cert},
		ClientCAs:        pool,
		ClientAuth:       tls.RequireAndVerifyClientCert,
		VerifyConnection: id.verifyPeer,
	}, nil
}

// ClientTLS is the primary's config: TLS 1.3 only, presenting the
// certificate and trusting only the CA in caFile. The server's certificate
// must carry id.Peer (checked as the TLS server name, so the address dialed
// does not matter) and not id.Self.
func ClientTLS(certFile, keyFile, caFile string, id Identity) (*tls.Config, error) {
	cert, pool, err := loadPKI(certFile, keyFile, caFile, id)
	if err != nil {
		return nil, fmt.Errorf("load client tls: %w", err)
	}
	return &tls.Config{
		MinVersion:       tls.VersionTLS13,
		Certificates:     []tls.Certificate{cert},
		RootCAs:          pool,
		ServerName:       id.Peer,
		VerifyConnection: id.verifyPeer,
	}, nil
}

// verifyPeer runs after the chain to the CA is verified, on both ends. On
// the client the server name already checked id.Peer; checking it here too
// keeps one rule for both ends.
func (id Identity) verifyPeer(cs tls.ConnectionState) error {
	if len(cs.PeerCertificates) == 0 {
		return fmt.Errorf("verify peer %q: no certificate: %w", id.Peer, ErrWrongPeer)
	}
	leaf := cs.PeerCertificates[0]
	// Our own name first: a certificate that carries both names (a
	// wildcard, or one shared by both hosts) must not pass as the peer.
	if leaf.VerifyHostname(id.Self) == nil {
		return fmt.Errorf("verify peer %q: its certificate (%v) also carries this host's name %q: %w", id.Peer, leaf.DNSNames, id.Self, ErrSameName)
	}
	if leaf.VerifyHostname(id.Peer) != nil {
		return fmt.Errorf("verify peer %q: its certificate is for %v: %w", id.Peer, leaf.DNSNames, ErrWrongPeer)
	}
	return nil
}

func (id Identity) check() error {
	for _, name := range []string{id.Self, id.Peer} {
		if err := CheckHostName(name); err != nil {
			return err
		}
	}
	if strings.EqualFold(id.Self, id.Peer) {
		return fmt.Errorf("this host and its peer are both called %q: %w", id.Self, ErrSameName)
	}
	return nil
}

// CheckHostName refuses what cannot be a host's name on the log channel: a
// name its certificate carries as a DNS SAN. Not an address: those are
// matched against IP SANs instead.
func CheckHostName(name string) error {
	if !hostName.MatchString(name) {
		return fmt.Errorf("host name %q: want 1 to 253 letters, digits, '.', '_' or '-', starting and ending with a letter or digit", name)
	}
	if net.ParseIP(name) != nil {
		return fmt.Errorf("host name %q: want a name, not an address", name)
	}
	return nil
}

var hostName = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$`)

// loadPKI also checks that this host's own certificate carries id.Self: a
// wrong one would otherwise only show as connections the peer refuses.
func loadPKI(certFile, keyFile, caFile string, id Identity) (tls.Certificate, *x509.CertPool, error) {
	if err := id.check(); err != nil {
		return tls.Certificate{}, nil, err
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	if err := leaf.VerifyHostname(id.Self); err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("%s is for %v, not for this host, %q: %w", certFile, leaf.DNSNames, id.Self, err)
	}
	caPEM, err := os.ReadFile(caFile)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return tls.Certificate{}, nil, errors.New("no certificate in " + caFile)
	}
	return cert, pool, nil
}
