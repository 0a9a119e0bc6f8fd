package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"slices"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/ftgw/ftgw/internal/lab"
	"github.com/ftgw/ftgw/pkg/datapath"
	"github.com/ftgw/ftgw/pkg/guest"
)

// Where a real VM's request spends its time: `ftgw bench` timestamps each
// PUT on the client and joins it with the request trace (reqtrace.go) the
// VM's QEMU and daemon took meanwhile. All the clocks are one
// (CLOCK_MONOTONIC on one machine), so the segments of one request follow
// each other and add up to its round trip.

// timedRequest is one PUT as the client saw it, in MonotonicNs.
type timedRequest struct {
	sendNs, recvNs uint64
	ok             bool
}

// kvRunTimed is kvRun that also returns each request's send and receive
// times.
func kvRunTimed(ctx context.Context, c *guest.Client, n int, prefix string, budget time.Duration) (lat []time.Duration, failed int, reqs []timedRequest) {
	deadline := time.Now().Add(budget)
	for i := 0; i < n && ctx.Err() == nil && time.Now().Before(deadline); i++ {
		start, startNs := time.Now(), datapath.MonotonicNs()
		_, err := c.Put(fmt.Sprintf("%s%d", prefix, i%256), fmt.Sprintf("v%d", i))
		reqs = append(reqs, timedRequest{sendNs: startNs, recvNs: datapath.MonotonicNs(), ok: err == nil})
		if err != nil {
			failed++
			continue
		}
		lat = append(lat, time.Since(start))
	}
	return lat, failed, reqs
}

// fetchTrace reads the primary's request trace since sinceNs.
func fetchTrace(dir string, sinceNs uint64) (requestTrace, error) {
	var t requestTrace
	sock := controlPath(hostDir(dir, lab.NSPrimary))
	resp, err := controlClient(sock).Get("http://ftgw/trace?" + url.Values{"since": {fmt.Sprint(sinceNs)}}.Encode())
	if err != nil {
		return t, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(resp.Body)
		return t, fmt.Errorf("/trace: %s: %s", resp.Status, strings.TrimSpace(string(body)))
	}
	return t, json.NewDecoder(resp.Body).Decode(&t)
}

// The segments of a request, in the order it passes them.
const (
	segTotal   = iota // client send to client receive
	segIn             // client send to QEMU's read of the request from the tap
	segGuest          // that read to the flush before the reply's tap write: guest, QEMU, transmit timer
	segFlush          // the flush of the replay log (0 unprotected)
	segHeld           // reply on the tap to its release on the uplink (held replies)
	segLogRead        // flush end to the daemon's read of the chunk covering the reply's stamp
	segShip           // that read to the chunk's hand-over to the log channel
	segAck            // hand-over to the arrival of the ack covering it
	segRelease        // the later of ack and tap arrival, to the release
	segOut            // reply leaving (the tap, or the uplink if held) to the client's receive
	numSegs
)

var segNames = [numSegs]string{
	"round trip (client)",
	"client -> QEMU reads the request from the tap",
	"QEMU read -> flush before the reply's tap write (guest, QEMU, tx timer)",
	"flush of the replay log before the tap write",
	"held reply: tap -> wire (sum of the next four, overlapping)",
	"  flush end -> daemon reads the log chunk covering the stamp",
	"  daemon read -> chunk handed to the log channel",
	"  hand-over -> the secondary's ack arrives",
	"  later of ack and tap arrival -> release sendmmsg done",
	"reply leaves the host (tap, or uplink if held) -> client",
}

// breakdown collects the segments of one case's requests.
type breakdown struct {
	requests, matched, held int
	segs                    [numSegs][]time.Duration
	// rows are the joined requests' segments, in order; a segment a
	// request did not pass (not held) is -1.
	rows [][numSegs]time.Duration
	// byIdle are the segGuest times of the requests that followed
	// another of the same round, by how long the VM had been quiet
	// before QEMU read them: from the previous reply's tap write
	// (idleBuckets).
	byIdle    [len(idleBuckets) + 1][]time.Duration
	lastWrite uint64 // the previous joined request's reply, in this round
}

// idleBuckets bound the classes of byIdle; the last class is beyond them.
var idleBuckets = [...]time.Duration{200 * time.Microsecond, 400 * time.Microsecond, time.Millisecond}

// add joins one round's requests with the trace taken meanwhile. A
// request joins the last tap write whose flush ended inside its round trip
// (its reply; the PUTs are closed-loop, one at a time), and, if the reply
// was held, the first frame released that arrived from the tap at or after
// that flush, and the first log chunk covering that frame's stamp. A
// request whose reply cannot be found is counted, not measured.
func (b *breakdown) add(reqs []timedRequest, t requestTrace) {
	writes := t.TapWrites
	b.lastWrite = 0
	for _, r := range reqs {
		b.requests++
		if !r.ok {
			b.lastWrite = 0
			continue
		}
		// The last write whose flush ended by the receive.
		i := sort.Search(len(writes), func(i int) bool { return writes[i].FlushEndNs > r.recvNs }) - 1
		if i < 0 || writes[i].FlushEndNs < r.sendNs || writes[i].InputNs < r.sendNs {
			b.lastWrite = 0
			continue
		}
		w := writes[i]
		b.matched++
		row := [numSegs]time.Duration{}
		for s := range row {
			row[s] = -1
		}
		d := func(from, to uint64) time.Duration { return time.Duration(int64(to - from)) }
		// Each segment goes into its column and the request's row.
		put := func(s int, v time.Duration) {
			b.segs[s] = append(b.segs[s], v)
			row[s] = v
		}
		put(segTotal, d(r.sendNs, r.recvNs))
		put(segIn, d(r.sendNs, w.InputNs))
		put(segGuest, d(w.InputNs, w.FlushStartNs))
		if b.lastWrite != 0 {
			quiet := d(b.lastWrite, w.InputNs)
			k, _ := slices.BinarySearch(idleBuckets[:], quiet)
			b.byIdle[k] = append(b.byIdle[k], d(w.InputNs, w.FlushStartNs))
		}
		b.lastWrite = w.FlushEndNs
		put(segFlush, d(w.FlushStartNs, w.FlushEndNs))
		leaves := w.FlushEndNs
		j := slices.IndexFunc(t.Released, func(f releasedFrame) bool { return f.ArrivalNs >= w.FlushEndNs })
		if j >= 0 && t.Released[j].ReleaseNs <= r.recvNs {
			f := t.Released[j]
			b.held++
			leaves = f.ReleaseNs
			put(segHeld, d(f.ArrivalNs, f.ReleaseNs))
			k := slices.IndexFunc(t.Chunks, func(c chunkTime) bool { return c.End >= f.Stamp })
			if k >= 0 && t.Chunks[k].AckNs != 0 {
				c := t.Chunks[k]
				put(segLogRead, d(w.FlushEndNs, c.ReadNs))
				put(segShip, d(c.ReadNs, c.ShippedNs))
				put(segAck, d(c.ShippedNs, c.AckNs))
				put(segRelease, d(max(c.AckNs, f.ArrivalNs), f.ReleaseNs))
			}
		}
		put(segOut, d(leaves, r.recvNs))
		b.rows = append(b.rows, row)
	}
}

// printBreakdownTable prints where each case's requests spent their time.
func printBreakdownTable(w io.Writer, b [numCases]*breakdown) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprint(tw, "where a PUT's time goes (p50 / p99)\t")
	for c := range numCases {
		fmt.Fprintf(tw, "%s\t", caseNames[c])
	}
	fmt.Fprintln(tw)
	fmt.Fprint(tw, "requests sent / joined to their reply / reply held\t")
	for c := range numCases {
		fmt.Fprintf(tw, "%d / %d / %d\t", b[c].requests, b[c].matched, b[c].held)
	}
	fmt.Fprintln(tw)
	for s := range numSegs {
		fmt.Fprintf(tw, "%s\t", segNames[s])
		for c := range numCases {
			v := b[c].segs[s]
			if len(v) == 0 {
				fmt.Fprint(tw, "-\t")
				continue
			}
			p := percentiles(slices.Clone(v), 50, 99)
			fmt.Fprintf(tw, "%s / %s\t", millis(p[0]), millis(p[1]))
		}
		fmt.Fprintln(tw)
	}
	fmt.Fprint(tw, "QEMU read -> flush, by the time since the last reply's tap write:\t\t\t\t\n")
	for k := range len(idleBuckets) + 1 {
		name := ""
		switch {
		case k == 0:
			name = "under " + idleBuckets[0].String()
		case k == len(idleBuckets):
			name = "over " + idleBuckets[k-1].String()
		default:
			name = idleBuckets[k-1].String() + " to " + idleBuckets[k].String()
		}
		fmt.Fprintf(tw, "  %s: requests, p50\t", name)
		for c := range numCases {
			v := b[c].byIdle[k]
			if len(v) == 0 {
				fmt.Fprint(tw, "0\t")
				continue
			}
			fmt.Fprintf(tw, "%d, %s\t", len(v), millis(percentiles(slices.Clone(v), 50)[0]))
		}
		fmt.Fprintln(tw)
	}
	tw.Flush()
	fmt.Fprintln(w, "(ms; each segment's own percentiles, so they do not add up exactly; the unprotected VM's QEMU runs the preloaded library for its timestamps only, with no log to flush; the last rows: a recorder whose guest has gone idle takes a request in only at its next timer)")
}

func millis(d time.Duration) string { return fmt.Sprintf("%.2f", d.Seconds()*1e3) }

// writeBreakdownCSV writes every joined PUT's segments, in µs, one row
// per request: its case, its index among the case's joined requests, then
// one column per segment (empty where it did not pass it).
func writeBreakdownCSV(path string, b [numCases]*breakdown) error {
	var sb strings.Builder
	sb.WriteString("case,request")
	for s := range numSegs {
		fmt.Fprintf(&sb, ",%q", strings.TrimSpace(segNames[s]))
	}
	sb.WriteString("\n")
	for c := range numCases {
		for i, row := range b[c].rows {
			fmt.Fprintf(&sb, "%q,%d", caseNames[c], i)
			for _, v := range row {
				if v == -1 {
					sb.WriteString(",")
					continue
				}
				fmt.Fprintf(&sb, ",%.1f", float64(v)/1e3)
			}
			sb.WriteString("\n")
		}
	}
	return os.WriteFile(path, []byte(sb.String()), 0o644)
}
