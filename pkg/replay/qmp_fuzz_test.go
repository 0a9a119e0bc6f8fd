package replay

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// QMP comes from a QEMU that may be broken, half dead or not QEMU at all.
// Whatever it sends between a command and its reply, Run must come back,
// within the monitor's timeout, and never panic; events nobody reads must
// not hold up the reply.

// fuzzQMPTimeout is the monitor's timeout. The fake below never lets Run
// wait for it (it hangs up when its chatter leaves the client's decoder
// mid-value), so it only bounds a hang and can be generous.
const fuzzQMPTimeout = 5 * time.Second

// fuzzQMPReturn is what the fake's real reply returns.
const fuzzQMPReturn = `{"status":"running","running":true}`

// decoderEnd says how a client's JSON decoder ends on sent, which begins
// at a value boundary: io.EOF if every value is whole, io.ErrUnexpectedEOF
// if the last one is left open (the client would wait for the rest),
// another error if the bytes are not JSON. replies says whether one of the
// values is an object with a "return" or "error" member, which a client
// may take as the answer to its command.
func decoderEnd(sent []byte) (end error, replies bool) {
	dec := json.NewDecoder(bytes.NewReader(sent))
	for {
		var msg json.RawMessage
		if err := dec.Decode(&msg); err != nil {
			return err, replies
		}
		var obj map[string]json.RawMessage
		if json.Unmarshal(msg, &obj) == nil && (obj["return"] != nil || obj["error"] != nil) {
			replies = true
		}
	}
}

// chattyQEMU is a fake QEMU that answers like QEMU up to the first command
// after the capabilities, then sends chatter before that command's reply.
type chattyQEMU struct {
	chatter []byte
	hangUp  chan struct{} // closed by the test once Run has returned
}

// serve serves one client on ln. If chatter leaves the client's decoder
// mid-value it hangs up at once, as a QEMU that died there would;
// otherwise it waits for hangUp.
func (q *chattyQEMU) serve(ln net.Listener) error {
	c, err := ln.Accept()
	if err != nil {
		return err
	}
	defer c.Close()
	if _, err := io.WriteString(c, `{"QMP":{"version":{"qemu":{"major":7,"minor":2,"micro":0}},"capabilities":["oob"]}}`+"\n"); err != nil {
		return err
	}
	dec := json.NewDecoder(c)
	readID := func() (string, error) {
		var cmd struct {
			ID json.RawMessage `json:"id"`
		}
		if err := dec.Decode(&cmd); err != nil {
			return "", fmt.Errorf("read command: %w", err)
		}
		return string(cmd.ID), nil
	}
	id, err := readID()
	if err != nil {
		return err
	}
	if _, err := io.WriteString(c, `{"return":{},"id":`+id+"}\n"); err != nil {
		return err
	}
	if id, err = readID(); err != nil {
		return err
	}
	sent := fmt.Appendf(bytes.Clone(q.chatter), "\n{\"return\":%s,\"id\":%s}\n", fuzzQMPReturn, id)
	// A client that finds the chatter is not JSON hangs up in the middle
	// of it: the write may fail.
	c.Write(sent)
	if end, _ := decoderEnd(sent); !errors.Is(end, io.ErrUnexpectedEOF) {
		<-q.hangUp
	}
	return nil
}

func FuzzSocketMonitor(f *testing.F) {
	event := func(name string, seq int) string {
		return fmt.Sprintf(`{"event":%q,"data":{"seq":%d},"timestamp":{"seconds":1700000000,"microseconds":%d}}`, name, seq, seq)
	}
	var flood strings.Builder // more events than a subscriber's buffer holds
	for i := range 2*EventBuffer + 1 {
		flood.WriteString(event("STOP", i) + "\n")
	}
	for _, chatter := range []string{
		"",
		event("STOP", 1) + "\n" + event("RESUME", 2),
		flood.String(),
		`{"return":{},"id":"ftgw-1"}`,                    // a late reply to an earlier command
		`{"error":{"class":"GenericError","desc":"no"}}`, // a reply without id
		`{"error":"not an object"}`,
		`[1,2,3] "a string" 42 null {"event":17} {"event":"X","data":[]}`,
		`{"event":"BLOCK_IO_ERROR","data":{"device":"`, // QEMU died mid-event
		"\x00\xff}{",
		`{"return":` + strings.Repeat("[", 100) + strings.Repeat("]", 100) + `}`,
	} {
		f.Add([]byte(chatter))
	}
	f.Fuzz(func(t *testing.T, chatter []byte) {
		ln, err := net.Listen("unix", filepath.Join(t.TempDir(), "qmp.sock"))
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		qemu := &chattyQEMU{chatter: chatter, hangUp: make(chan struct{})}
		served := make(chan error, 1)
		go func() { served <- qemu.serve(ln) }()

		m, err := NewSocketMonitor("unix", ln.Addr().String(), fuzzQMPTimeout)
		if err != nil {
			t.Fatal(err)
		}
		if err := m.Connect(); err != nil {
			t.Fatalf("connect: %v", err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		if _, err := m.Events(ctx); err != nil { // never read
			t.Fatal(err)
		}

		type result struct {
			out []byte
			err error
		}
		ran := make(chan result, 1)
		go func() {
			out, err := m.Run([]byte(`{"execute":"query-status"}`))
			ran <- result{out, err}
		}()
		var r result
		select {
		case r = <-ran:
		case <-time.After(fuzzQMPTimeout + 5*time.Second):
			t.Fatalf("Run still waiting %v after the chatter, with a timeout of %v", fuzzQMPTimeout+5*time.Second, fuzzQMPTimeout)
		}
		m.Disconnect()
		close(qemu.hangUp)
		if err := <-served; err != nil {
			t.Fatalf("fake QEMU: %v", err)
		}

		// Whole values that are not replies (events, and anything else a
		// client skips) must leave Run the real reply.
		if end, replies := decoderEnd(chatter); end == io.EOF && !replies && (r.err != nil || string(r.out) != fuzzQMPReturn) {
			t.Fatalf("Run after chatter %q: %s, %v; want %s", chatter, r.out, r.err, fuzzQMPReturn)
		}
		if errors.Is(r.err, ErrTimeout) {
			t.Fatalf("Run timed out on chatter %q though the fake answered", chatter)
		}
	})
}
