package guest

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"maps"
	"slices"
	"strconv"
	"strings"
	"unicode/utf8"
)

// Store is the key-value application both guests run: the synthetic Guest
// behind its own frame parser, and the real Linux guest's /init
// (cmd/ftgw-init) behind the kernel's UDP socket. Sharing it is what makes
// the two answer the same requests with the same bytes and report the same
// Digest.
//
// Like the Guest, a Store depends only on the requests it was given, in
// order. The zero value is an empty store; it is not safe for concurrent
// use.
type Store struct {
	kv   map[string]string
	puts uint64
}

// NewStore returns an empty store.
func NewStore() *Store { return &Store{kv: make(map[string]string)} }

// Apply executes one request (the payload of one datagram, a trailing
// newline allowed) and returns the reply text:
//
//	PUT <key> <value>  →  OK <puts> <key>, puts the count of PUTs applied,
//	                      this one included
//	GET <key>          →  VALUE <key> <value> or NOTFOUND <key>
//	anything else      →  ERR <reason>, and the store is unchanged
//
// Replies name their key because UDP (and a failover: the new primary's
// VM may send again what the old one sent) can deliver a reply late or
// twice; a client matches each reply to its request by it.
func (s *Store) Apply(req string) string {
	req = strings.TrimSuffix(req, "\n")
	req = strings.TrimSuffix(req, "\r")
	if req == "" {
		return "ERR empty request"
	}
	// State is reported as JSON, which cannot carry arbitrary bytes.
	if !utf8.ValidString(req) {
		return "ERR request is not UTF-8"
	}
	cmd, rest, _ := strings.Cut(req, " ")
	switch cmd {
	case "PUT":
		key, value, ok := strings.Cut(rest, " ")
		if !ok || key == "" {
			return "ERR usage: PUT <key> <value>"
		}
		if s.kv == nil {
			s.kv = make(map[string]string)
		}
		s.kv[key] = value
		s.puts++
		return "OK " + strconv.FormatUint(s.puts, 10) + " " + key
	case "GET":
		if rest == "" || strings.Contains(rest, " ") {
			return "ERR usage: GET <key>"
		}
		if v, ok := s.kv[rest]; ok {
			return "VALUE " + rest + " " + v
		}
		return "NOTFOUND " + rest
	default:
		return "ERR unknown command"
	}
}

// Puts is the number of PUTs applied.
func (s *Store) Puts() uint64 { return s.puts }

// Keys returns a copy of the key-value pairs.
func (s *Store) Keys() map[string]string { return maps.Clone(s.kv) }

// Digest is the sha256 (hex) of Puts and the key/value pairs: the whole
// application state in one string that two executions can compare.
func (s *Store) Digest() string { return digest(s.puts, s.kv) }

// digest hashes puts and the key/value pairs in key order, each string
// length-prefixed so that no two stores share an encoding.
func digest(puts uint64, kv map[string]string) string {
	h := sha256.New()
	var b [8]byte
	writeUint := func(n uint64) {
		binary.BigEndian.PutUint64(b[:], n)
		h.Write(b[:])
	}
	writeUint(puts)
	for _, k := range slices.Sorted(maps.Keys(kv)) {
		writeUint(uint64(len(k)))
		h.Write([]byte(k))
		writeUint(uint64(len(kv[k])))
		h.Write([]byte(kv[k]))
	}
	return hex.EncodeToString(h.Sum(nil))
}
