package guest

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"
)

// The bulk protocol measures how fast a VM sends a TCP stream: the real
// guest (cmd/ftgw-init) serves it on BulkPort. A client connects and sends
// one line,
//
//	BULK <bytes>\n
//
// and the guest sends exactly that many bytes of BulkPattern, then closes
// the connection; or, for a bad request, one line "ERR <reason>\n" and
// closes. The pattern is a function of the byte's offset in the stream
// only, so the guest's output depends on nothing but its input, as record
// and replay need, and the client can check every byte it receives: a
// stream that lost, repeated or reordered data (an Output Rule broken for
// TCP) fails the check instead of passing for a fast transfer.

// BulkPort is the TCP port of the bulk protocol.
const BulkPort = 7001

// MaxBulkBytes bounds one transfer, so that a typo cannot have a guest
// send for hours.
const MaxBulkBytes = 1 << 30

// bulkLineMax bounds the request line the guest reads.
const bulkLineMax = 64

// bulkChunk is how much the guest writes at a time.
const bulkChunk = 64 << 10

// bulkMix spreads the word index over all 64 bits (odd, so the
// multiplication is a bijection: every 8-byte word of a stream shorter than
// 2^67 bytes is different).
const bulkMix = 0x9e3779b97f4a7c15

// BulkRequest is the request line for n bytes.
func BulkRequest(n int64) string { return "BULK " + strconv.FormatInt(n, 10) + "\n" }

// ParseBulkRequest reads the byte count from a request line (with or
// without its newline).
func ParseBulkRequest(line string) (int64, error) {
	line = strings.TrimSuffix(strings.TrimSuffix(line, "\n"), "\r")
	arg, ok := strings.CutPrefix(line, "BULK ")
	if !ok {
		return 0, errors.New("usage: BULK <bytes>")
	}
	n, err := strconv.ParseInt(arg, 10, 64)
	if err != nil || n < 0 || arg != strconv.FormatInt(n, 10) {
		return 0, fmt.Errorf("bytes %q: want a decimal count", arg)
	}
	if n > MaxBulkBytes {
		return 0, fmt.Errorf("bytes %d: at most %d", n, MaxBulkBytes)
	}
	return n, nil
}

// bulkByte is the pattern's byte at offset off: byte off%8, big-endian, of
// the word (off/8)*bulkMix.
func bulkByte(off int64) byte {
	return byte(uint64(off/8) * bulkMix >> (56 - 8*(off%8)))
}

// BulkPattern fills p with the stream's bytes from offset off.
func BulkPattern(p []byte, off int64) {
	i := 0
	// Up to a word boundary byte by byte, then whole words: the guest
	// computes every byte it sends, under TCG, where a loop per byte costs.
	for ; i < len(p) && (off+int64(i))%8 != 0; i++ {
		p[i] = bulkByte(off + int64(i))
	}
	for ; i+8 <= len(p); i += 8 {
		binary.BigEndian.PutUint64(p[i:], uint64((off+int64(i))/8)*bulkMix)
	}
	for ; i < len(p); i++ {
		p[i] = bulkByte(off + int64(i))
	}
}

// CheckBulk reports the index in p of the first byte that is not the
// stream's at offset off+index, or -1 if all are.
func CheckBulk(p []byte, off int64) int {
	for i, b := range p {
		if b != bulkByte(off+int64(i)) {
			return i
		}
	}
	return -1
}

// ServeBulk answers one bulk request on rw: it reads the request line and
// sends the bytes asked for, or an ERR line. It returns how many pattern
// bytes it sent. The caller closes the connection, which ends the stream.
func ServeBulk(rw io.ReadWriter) (sent int64, err error) {
	line, err := bufio.NewReaderSize(rw, bulkLineMax).ReadSlice('\n')
	if err != nil {
		if errors.Is(err, bufio.ErrBufferFull) {
			err = fmt.Errorf("request line longer than %d bytes", bulkLineMax)
			fmt.Fprintf(rw, "ERR %v\n", err)
		}
		return 0, fmt.Errorf("read bulk request: %w", err)
	}
	n, err := ParseBulkRequest(string(line))
	if err != nil {
		fmt.Fprintf(rw, "ERR %v\n", err)
		return 0, fmt.Errorf("bulk request: %w", err)
	}
	buf := make([]byte, min(n, bulkChunk))
	for sent < n {
		chunk := buf[:min(n-sent, int64(len(buf)))]
		BulkPattern(chunk, sent)
		w, err := rw.Write(chunk)
		sent += int64(w)
		if err != nil {
			return sent, fmt.Errorf("send bulk: %w", err)
		}
	}
	return sent, nil
}

// BulkResult is one transfer as the client saw it.
type BulkResult struct {
	Requested int64
	// Received counts the bytes that arrived, checked or not.
	Received int64
	// Elapsed runs from the request's send to the end of the stream (or
	// the failure).
	Elapsed time.Duration
	// Err says why the transfer failed: a connection error, the deadline,
	// a short or long stream, or a byte that is not the pattern's.
	Err error
}

// OK reports whether the whole stream arrived, intact, and ended.
func (r BulkResult) OK() bool { return r.Err == nil && r.Received == r.Requested }

// ReceiveBulk asks the guest on conn for n bytes and reads them until the
// guest closes the stream, checking each byte, until ctx ends. It closes
// conn.
func ReceiveBulk(ctx context.Context, conn net.Conn, n int64) (res BulkResult) {
	defer conn.Close()
	res.Requested = n
	if d, ok := ctx.Deadline(); ok {
		conn.SetDeadline(d)
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	start := time.Now()
	defer func() { res.Elapsed = time.Since(start) }()
	if _, err := io.WriteString(conn, BulkRequest(n)); err != nil {
		res.Err = fmt.Errorf("send bulk request: %w", err)
		return res
	}
	buf := make([]byte, 256<<10)
	for {
		k, err := conn.Read(buf)
		if k > 0 {
			if bad := CheckBulk(buf[:k], res.Received); bad >= 0 {
				res.Err = fmt.Errorf("byte %d is not the pattern's", res.Received+int64(bad))
				if res.Received == 0 && strings.HasPrefix(string(buf[:k]), "ERR ") {
					line, _, _ := strings.Cut(string(buf[:k]), "\n")
					res.Err = fmt.Errorf("guest: %s", line)
				}
				res.Received += int64(k)
				return res
			}
			res.Received += int64(k)
			if res.Received > n {
				res.Err = fmt.Errorf("the guest sent more than the %d bytes asked", n)
				return res
			}
		}
		if errors.Is(err, io.EOF) {
			if res.Received < n {
				res.Err = fmt.Errorf("stream ended after %d of %d bytes", res.Received, n)
			}
			return res
		}
		if err != nil {
			if ctx.Err() != nil {
				err = ctx.Err()
			}
			res.Err = fmt.Errorf("receive bulk after %d of %d bytes: %w", res.Received, n, err)
			return res
		}
	}
}
