package guest

import (
	"bytes"
	"context"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

func TestParseBulkRequest(t *testing.T) {
	for _, tc := range []struct {
		line string
		want int64
		err  string
	}{
		{"BULK 0\n", 0, ""},
		{"BULK 4194304\n", 4 << 20, ""},
		{"BULK 12\r\n", 12, ""},
		{"BULK 12", 12, ""},
		{BulkRequest(MaxBulkBytes), MaxBulkBytes, ""},
		{BulkRequest(MaxBulkBytes + 1), 0, "at most"},
		{"BULK -1\n", 0, "decimal"},
		{"BULK +5\n", 0, "decimal"},
		{"BULK 05\n", 0, "decimal"},
		{"BULK 1e6\n", 0, "decimal"},
		{"BULK \n", 0, "decimal"},
		{"BULK  5\n", 0, "decimal"},
		{"bulk 5\n", 0, "usage"},
		{"GET a\n", 0, "usage"},
		{"", 0, "usage"},
	} {
		n, err := ParseBulkRequest(tc.line)
		if tc.err == "" {
			if err != nil || n != tc.want {
				t.Errorf("ParseBulkRequest(%q) = %d, %v; want %d", tc.line, n, err, tc.want)
			}
		} else if err == nil || !strings.Contains(err.Error(), tc.err) {
			t.Errorf("ParseBulkRequest(%q) = %d, %v; want an error with %q", tc.line, n, err, tc.err)
		}
	}
}

// The pattern is a function of the offset alone: any slice of the stream,
// from any offset, fills and checks alike, and every 8-byte word differs
// from its neighbours, so a repeated, lost or moved chunk is caught.
func TestBulkPattern(t *testing.T) {
	whole := make([]byte, 4096)
	BulkPattern(whole, 0)
	if !bytes.Equal(whole[:8], make([]byte, 8)) || bytes.Equal(whole[8:16], whole[16:24]) {
		t.Fatalf("first words %x", whole[:24])
	}
	for i := range whole {
		if whole[i] != bulkByte(int64(i)) {
			t.Fatalf("byte %d = %#x, bulkByte says %#x", i, whole[i], bulkByte(int64(i)))
		}
	}
	for _, off := range []int{0, 1, 7, 8, 13, 4000} {
		for _, n := range []int{0, 1, 5, 8, 9, 17, 96} {
			if off+n > len(whole) {
				continue
			}
			p := make([]byte, n)
			BulkPattern(p, int64(off))
			if !bytes.Equal(p, whole[off:off+n]) {
				t.Errorf("BulkPattern(%d bytes at %d) = %x, want %x", n, off, p, whole[off:off+n])
			}
			if bad := CheckBulk(whole[off:off+n], int64(off)); bad != -1 {
				t.Errorf("CheckBulk(%d bytes at %d) = %d, want -1", n, off, bad)
			}
		}
	}
	if bad := CheckBulk(whole[64:128], 72); bad != 0 {
		t.Errorf("a chunk checked at the wrong offset: first bad byte %d, want 0", bad)
	}
	corrupt := bytes.Clone(whole[:100])
	corrupt[77] ^= 1
	if bad := CheckBulk(corrupt, 0); bad != 77 {
		t.Errorf("CheckBulk of a flipped bit at 77 = %d", bad)
	}
}

// serveOnce serves one bulk connection on a loopback listener, as
// cmd/ftgw-init does, and returns its address and what ServeBulk returned.
func serveOnce(t *testing.T) (string, <-chan error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	done := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- err
			return
		}
		_, err = ServeBulk(c)
		c.Close()
		done <- err
	}()
	return ln.Addr().String(), done
}

func TestBulkOverTCP(t *testing.T) {
	for _, n := range []int64{0, 1, 100, bulkChunk, 3*bulkChunk + 5} {
		addr, served := serveOnce(t)
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		res := ReceiveBulk(ctx, c, n)
		cancel()
		if !res.OK() || res.Received != n || res.Requested != n {
			t.Errorf("%d bytes: %+v", n, res)
		}
		if err := <-served; err != nil {
			t.Errorf("%d bytes: ServeBulk: %v", n, err)
		}
	}
}

func TestServeBulkRefusesBadRequests(t *testing.T) {
	for _, req := range []string{"BULK x\n", "HELLO\n", strings.Repeat("B", 100) + "\n"} {
		var out bytes.Buffer
		sent, err := ServeBulk(struct {
			io.Reader
			io.Writer
		}{strings.NewReader(req), &out})
		if err == nil || sent != 0 || !strings.HasPrefix(out.String(), "ERR ") {
			t.Errorf("ServeBulk(%.20q): sent %d, err %v, wrote %q", req, sent, err, out.String())
		}
	}
}

// A client never takes a short, long, corrupt or refused stream for a
// transfer, whatever its speed.
func TestReceiveBulkFailures(t *testing.T) {
	pattern := func(n int) []byte { p := make([]byte, n); BulkPattern(p, 0); return p }
	corrupt := pattern(1000)
	corrupt[500] ^= 0xff
	for _, tc := range []struct {
		name    string
		ask     int64
		send    []byte
		stall   bool // keep the stream open
		wantErr string
	}{
		{"short", 1000, pattern(999), false, "ended after 999 of 1000"},
		{"long", 1000, pattern(1001), false, "more than"},
		{"corrupt", 1000, corrupt, false, "byte 500"},
		{"refused", 1000, []byte("ERR bytes 5000000000: at most 1073741824\n"), false, "guest: ERR bytes"},
		{"stalled", 1000, pattern(10), true, "after 10 of 1000"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			client, server := net.Pipe()
			go func() {
				io.ReadFull(server, make([]byte, len(BulkRequest(tc.ask))))
				server.Write(tc.send)
				if tc.stall {
					io.Copy(io.Discard, server) // until the client gives up
				}
				server.Close()
			}()
			ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
			defer cancel()
			res := ReceiveBulk(ctx, client, tc.ask)
			if res.OK() || res.Err == nil || !strings.Contains(res.Err.Error(), tc.wantErr) {
				t.Errorf("%+v, want an error with %q", res, tc.wantErr)
			}
		})
	}
}
