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
	"strings"
	"time"
)

// Names of the certificates the lab PKI holds, besides ca.pem. They are
// also the DNS SANs, so either name or an IP SAN works as ServerName.
const (
	PrimaryName   = "ftgw-primary"
	SecondaryName = "ftgw-secondary"
)

// GenerateLabPKI writes a fresh CA and a certificate and key for each host
// into dir: ca.pem, primary.pem, primary-key.pem, secondary.pem and
// secondary-key.pem. Keys are ECDSA P-256, certificates valid 10 years. Both
// host certificates allow client and server use, because after a failover
// the secondary becomes the primary. It refuses to overwrite existing files:
// a half-replaced PKI would lock the hosts out of each other.
func GenerateLabPKI(dir string, primaryIPs, secondaryIPs []net.IP) error {
	files := map[string][]byte{}
	for _, name := range []string{"ca.pem", "primary.pem", "primary-key.pem", "secondary.pem", "secondary-key.pem"} {
		path := filepath.Join(dir, name)
		if _, err := os.Lstat(path); err == nil {
			return fmt.Errorf("generate lab pki: %s exists; remove the old PKI first", path)
		}
	}

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

	for _, h := range []struct {
		file, name string
		ips        []net.IP
	}{{"primary", PrimaryName, primaryIPs}, {"secondary", SecondaryName, secondaryIPs}} {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return fmt.Errorf("generate lab pki: %w", err)
		}
		tmpl := &x509.Certificate{
			SerialNumber: serial(),
			Subject:      pkix.Name{CommonName: h.name},
			DNSNames:     []string{h.name},
			IPAddresses:  h.ips,
			NotBefore:    caTmpl.NotBefore,
			NotAfter:     caTmpl.NotAfter,
			KeyUsage:     x509.KeyUsageDigitalSignature,
			ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			return fmt.Errorf("generate lab pki: create %s certificate: %w", h.file, err)
		}
		keyDER, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return fmt.Errorf("generate lab pki: %w", err)
		}
		files[h.file+".pem"] = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
		files[h.file+"-key.pem"] = pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
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

// ServerTLS is the secondary's config: TLS 1.3 only, and clients must
// present a certificate signed by the CA in caFile.
func ServerTLS(certFile, keyFile, caFile string) (*tls.Config, error) {
	cert, pool, err := loadPKI(certFile, keyFile, caFile)
	if err != nil {
		return nil, fmt.Errorf("load server tls: %w", err)
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
	}, nil
}

// ClientTLS is the primary's config: TLS 1.3 only, presenting the
// certificate and trusting only the CA in caFile. An empty serverName makes
// NewPrimary use the host of its Addr.
func ClientTLS(certFile, keyFile, caFile, serverName string) (*tls.Config, error) {
	cert, pool, err := loadPKI(certFile, keyFile, caFile)
	if err != nil {
		return nil, fmt.Errorf("load client tls: %w", err)
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		RootCAs:      pool,
		ServerName:   serverName,
	}, nil
}

func loadPKI(certFile, keyFile, caFile string) (tls.Certificate, *x509.CertPool, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return tls.Certificate{}, nil, err
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
