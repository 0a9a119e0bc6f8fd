package lab

import (
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"
)

var historyStart = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func ms(n int) time.Time { return historyStart.Add(time.Duration(n) * time.Millisecond) }

func put(client int, key, value string, count uint64, invoke, ret int) Op {
	return Op{Client: client, Kind: OpPut, Key: key, Value: value, Count: count, Invoke: ms(invoke), Return: ms(ret)}
}

func get(client int, key, value string, invoke, ret int) Op {
	return Op{Client: client, Kind: OpGet, Key: key, Value: value, Found: true, Invoke: ms(invoke), Return: ms(ret)}
}

func getNotFound(client int, key string, invoke, ret int) Op {
	return Op{Client: client, Kind: OpGet, Key: key, Invoke: ms(invoke), Return: ms(ret)}
}

func timedOut(op Op) Op {
	op.Outcome = OutcomeIndeterminate
	op.Count, op.Found = 0, false
	if op.Kind == OpGet {
		op.Value = ""
	}
	return op
}

func historyOf(ops ...Op) *History {
	h := &History{}
	for _, op := range ops {
		h.Add(op)
	}
	return h
}

func TestLinearizableHistories(t *testing.T) {
	tests := []struct {
		name string
		ops  []Op
		want porcupine.CheckResult
	}{
		{
			name: "clean with overwrites and concurrent ops",
			ops: []Op{
				getNotFound(2, "k1", 0, 3),
				put(0, "k0", "c0-0", 1, 0, 10),
				put(2, "k1", "c2-1", 2, 5, 15),
				get(1, "k0", "c0-0", 20, 30),
				get(2, "k1", "c2-1", 20, 30),
				put(0, "k0", "c0-1", 3, 40, 60),
				get(1, "k0", "c0-0", 45, 50), // concurrent with the overwrite: old value
				get(2, "k0", "c0-1", 50, 55), // concurrent with the overwrite: new value
				get(1, "k0", "c0-1", 70, 80),
				// Two concurrent PUTs may land in either order.
				put(0, "k2", "c0-2", 4, 100, 120),
				put(1, "k2", "c1-3", 5, 105, 115),
				get(2, "k2", "c0-2", 130, 140),
			},
			want: porcupine.Ok,
		},
		{
			name: "lost acknowledged write: older value read after overwrite",
			ops: []Op{
				put(0, "k0", "c0-0", 1, 0, 10),
				put(0, "k0", "c0-1", 2, 20, 30),
				get(1, "k0", "c0-0", 40, 50),
			},
			want: porcupine.Illegal,
		},
		{
			name: "lost acknowledged write: not found after put",
			ops: []Op{
				put(0, "k0", "c0-0", 1, 0, 10),
				getNotFound(1, "k0", 20, 30),
			},
			want: porcupine.Illegal,
		},
		{
			name: "stale read after a read of the overwrite",
			ops: []Op{
				put(0, "k0", "c0-0", 1, 0, 10),
				put(0, "k0", "c0-1", 2, 20, 60),
				get(1, "k0", "c0-1", 25, 30),
				get(2, "k0", "c0-0", 35, 40),
			},
			want: porcupine.Illegal,
		},
		{
			name: "timed-out put later read",
			ops: []Op{
				put(0, "k0", "c0-0", 1, 0, 10),
				timedOut(put(0, "k0", "c0-1", 0, 20, 1020)),
				get(1, "k0", "c0-0", 30, 40),
				get(1, "k0", "c0-1", 1100, 1110),
			},
			want: porcupine.Ok,
		},
		{
			name: "timed-out put never read",
			ops: []Op{
				put(0, "k0", "c0-0", 1, 0, 10),
				timedOut(put(0, "k0", "c0-1", 0, 20, 1020)),
				get(1, "k0", "c0-0", 1100, 1110),
			},
			want: porcupine.Ok,
		},
		{
			// Once read, the timed-out PUT has taken effect: reading the
			// value it overwrote afterwards is a violation.
			name: "timed-out put read then older value read",
			ops: []Op{
				put(0, "k0", "c0-0", 1, 0, 10),
				timedOut(put(0, "k0", "c0-1", 0, 20, 1020)),
				get(1, "k0", "c0-1", 1100, 1110),
				get(1, "k0", "c0-0", 1200, 1210),
			},
			want: porcupine.Illegal,
		},
		{
			// Kept, its "not found" would contradict the acknowledged PUT.
			name: "timed-out get dropped",
			ops: []Op{
				put(0, "k0", "c0-0", 1, 0, 10),
				timedOut(get(1, "k0", "", 20, 1020)),
			},
			want: porcupine.Ok,
		},
		{
			name: "empty history",
			want: porcupine.Ok,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := CheckHistory(historyOf(tt.ops...), time.Time{}, 10*time.Second)
			if res.Verdict != tt.want {
				t.Fatalf("verdict %s, want %s: %s", res.Verdict, tt.want, res)
			}
			if res.CounterViolations != 0 {
				t.Errorf("%d counter violations, want 0: %v", res.CounterViolations, res.CounterExamples)
			}
			if got, want := res.OK(), tt.want == porcupine.Ok; got != want {
				t.Errorf("OK() = %v, want %v", got, want)
			}
		})
	}
}

func TestHistoryCounts(t *testing.T) {
	h := historyOf(
		put(0, "k0", "c0-0", 1, 0, 10),
		timedOut(put(1, "k1", "c1-0", 0, 0, 1000)),
		get(2, "k0", "c0-0", 20, 30),
		timedOut(get(2, "k0", "", 40, 1040)),
	)
	res := CheckHistory(h, time.Time{}, 10*time.Second)
	if res.Ops != 4 || res.Acked != 2 || res.Indeterminate != 2 {
		t.Errorf("ops %d acked %d indeterminate %d, want 4 2 2", res.Ops, res.Acked, res.Indeterminate)
	}
	want := "ops 4 acked 2 indeterminate 2, linearizable: ok, counter violations 0, longest gap 0s"
	if got := res.String(); got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
}

func TestCounterViolations(t *testing.T) {
	tests := []struct {
		name string
		ops  []Op
		want int
	}{
		{
			name: "increasing",
			ops: []Op{
				put(0, "k0", "c0-0", 1, 0, 10),
				put(1, "k1", "c1-0", 2, 20, 30),
				put(0, "k0", "c0-1", 3, 40, 50),
			},
			want: 0,
		},
		{
			name: "duplicate count",
			ops: []Op{
				put(0, "k0", "c0-0", 3, 0, 10),
				put(1, "k1", "c1-0", 3, 20, 30),
			},
			want: 1,
		},
		{
			name: "duplicate count of concurrent puts",
			ops: []Op{
				put(0, "k0", "c0-0", 3, 0, 30),
				put(1, "k1", "c1-0", 3, 10, 20),
			},
			want: 1,
		},
		{
			name: "count goes back in real time",
			ops: []Op{
				put(0, "k0", "c0-0", 5, 0, 10),
				put(1, "k1", "c1-0", 4, 20, 30),
			},
			want: 1,
		},
		{
			name: "goes back from the highest count acknowledged before",
			ops: []Op{
				put(0, "k0", "c0-0", 7, 0, 10),
				put(1, "k1", "c1-0", 2, 0, 15),
				put(2, "k2", "c2-0", 5, 20, 30),
			},
			want: 1,
		},
		{
			name: "concurrent puts may count in either order",
			ops: []Op{
				put(0, "k0", "c0-0", 5, 0, 30),
				put(1, "k1", "c1-0", 4, 10, 20),
			},
			want: 0,
		},
		{
			// porcupine takes [call, return] as closed: touching is concurrent.
			name: "return at the other's invoke is concurrent",
			ops: []Op{
				put(0, "k0", "c0-0", 5, 0, 10),
				put(1, "k1", "c1-0", 4, 10, 20),
			},
			want: 0,
		},
		{
			name: "timed-out puts carry no count",
			ops: []Op{
				timedOut(put(0, "k0", "c0-0", 0, 0, 1000)),
				timedOut(put(1, "k1", "c1-0", 0, 0, 1000)),
				put(2, "k2", "c2-0", 1, 1100, 1110),
			},
			want: 0,
		},
		{
			// Each PUT is counted once, though the last both repeats a
			// count and goes back.
			name: "one violation per put",
			ops: []Op{
				put(0, "k0", "c0-0", 1, 0, 10),
				put(0, "k0", "c0-1", 2, 20, 30),
				put(0, "k0", "c0-2", 2, 40, 50),
				put(0, "k0", "c0-3", 1, 60, 70),
			},
			want: 2,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := CheckHistory(historyOf(tt.ops...), time.Time{}, 10*time.Second)
			if res.CounterViolations != tt.want {
				t.Fatalf("%d counter violations, want %d: %v", res.CounterViolations, tt.want, res.CounterExamples)
			}
			if got := len(res.CounterExamples); got != min(tt.want, maxCounterExamples) {
				t.Errorf("%d examples, want %d", got, min(tt.want, maxCounterExamples))
			}
			// Different keys, so the register check has nothing to object to.
			if res.Verdict != porcupine.Ok {
				t.Errorf("verdict %s, want Ok", res.Verdict)
			}
			if got, want := res.OK(), tt.want == 0; got != want {
				t.Errorf("OK() = %v, want %v: %s", got, want, res)
			}
		})
	}
}

func TestCounterExampleNamesBothPuts(t *testing.T) {
	res := CheckHistory(historyOf(
		put(0, "k0", "c0-0", 5, 0, 10),
		put(1, "k1", "c1-0", 4, 20, 30),
	), time.Time{}, 10*time.Second)
	want := "client 1 put k1=c1-0 -> 4 went back from client 0 put k0=c0-0 -> 5 acknowledged before it was sent"
	if len(res.CounterExamples) != 1 || res.CounterExamples[0] != want {
		t.Fatalf("examples %q, want [%q]", res.CounterExamples, want)
	}
	if !strings.Contains(res.String(), "counter violations 1 ("+want+")") {
		t.Errorf("String() = %q, want the example in it", res.String())
	}
}

func TestGapAfterFault(t *testing.T) {
	tests := []struct {
		name  string
		fault time.Time
		ops   []Op
		want  time.Duration
	}{
		{
			name:  "between acks",
			fault: ms(100),
			ops: []Op{
				getNotFound(0, "k0", 40, 50), // before the fault: not counted
				put(0, "k0", "c0-0", 1, 140, 150),
				put(1, "k1", "c1-0", 2, 160, 900),
				get(0, "k0", "c0-0", 910, 950),
			},
			want: 750 * time.Millisecond, // 150 to 900
		},
		{
			name:  "fault to first ack",
			fault: ms(100),
			ops: []Op{
				timedOut(get(0, "k0", "", 90, 690)),
				put(0, "k0", "c0-0", 1, 695, 700),
				put(0, "k0", "c0-1", 2, 710, 750),
				put(0, "k0", "c0-2", 3, 760, 800),
			},
			want: 600 * time.Millisecond, // 100 to 700
		},
		{
			name:  "last ack to the end of the history",
			fault: ms(100),
			ops: []Op{
				put(0, "k0", "c0-0", 1, 0, 120),
				put(0, "k0", "c0-1", 2, 130, 400),
				put(0, "k0", "c0-2", 3, 410, 450),
				timedOut(put(0, "k0", "c0-3", 0, 460, 1000)),
			},
			want: 550 * time.Millisecond, // 450 to 1000
		},
		{
			name:  "nothing acknowledged after the fault",
			fault: ms(100),
			ops: []Op{
				put(0, "k0", "c0-0", 1, 0, 50),
				timedOut(put(0, "k0", "c0-1", 0, 60, 660)),
				timedOut(put(1, "k1", "c1-0", 0, 70, 670)),
			},
			want: 570 * time.Millisecond, // 100 to 670
		},
		{
			name: "no fault",
			ops: []Op{
				put(0, "k0", "c0-0", 1, 0, 50),
				put(0, "k0", "c0-1", 2, 500, 550),
			},
			want: 0,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := CheckHistory(historyOf(tt.ops...), tt.fault, 10*time.Second)
			if res.LongestGap != tt.want {
				t.Errorf("longest gap %s, want %s", res.LongestGap, tt.want)
			}
		})
	}
}

func TestHistoryUnknownIsNotOK(t *testing.T) {
	if (HistoryResult{Verdict: porcupine.Unknown}).OK() {
		t.Error("an undecided check reports OK")
	}
}

func TestHistoryVisualize(t *testing.T) {
	res := CheckHistory(historyOf(
		put(0, "k0", "c0-0", 1, 0, 10),
		getNotFound(1, "k0", 20, 30),
	), ms(5), 10*time.Second)
	if res.Verdict != porcupine.Illegal {
		t.Fatalf("verdict %s, want Illegal", res.Verdict)
	}
	path := t.TempDir() + "/history.html"
	if err := res.Visualize(path); err != nil {
		t.Fatal(err)
	}
	html, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(html), "get(k0) -\\u003e not found") && !strings.Contains(string(html), "get(k0) -> not found") {
		t.Errorf("visualization does not show the failing get")
	}
	if err := (HistoryResult{}).Visualize(path); err == nil {
		t.Error("visualized a result that was never checked")
	}
}

func TestHistoryConcurrentAdd(t *testing.T) {
	h := &History{}
	var adders sync.WaitGroup
	for c := range 8 {
		adders.Go(func() {
			for i := range 100 {
				h.Add(put(c, "k0", "v", uint64(i), i, i+1))
			}
		})
	}
	adders.Wait()
	if got := h.Len(); got != 800 {
		t.Errorf("%d operations, want 800", got)
	}
}

func TestHistoryLoadConfig(t *testing.T) {
	tests := []struct {
		name    string
		cfg     LoadConfig
		wantErr bool
	}{
		{"defaults with bounds", LoadConfig{MaxOps: 10, MaxTime: time.Second}, false},
		{"no op bound", LoadConfig{MaxTime: time.Second}, true},
		{"no time bound", LoadConfig{MaxOps: 10}, true},
		{"write fraction above 1", LoadConfig{WriteFraction: 1.5, MaxOps: 10, MaxTime: time.Second}, true},
		{"negative clients", LoadConfig{Clients: -1, MaxOps: 10, MaxTime: time.Second}, true},
		{"another VM", LoadConfig{VM: VM(64).IP, MaxOps: 10, MaxTime: time.Second}, false},
		{"an IPv6 VM", LoadConfig{VM: netip.MustParseAddr("2001:db8::1"), MaxOps: 10, MaxTime: time.Second}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := tt.cfg
			cfg.setDefaults()
			err := cfg.validate()
			if (err != nil) != tt.wantErr {
				t.Fatalf("validate() = %v, want error %v", err, tt.wantErr)
			}
			if !tt.wantErr && (cfg.Clients != 4 || cfg.Keys != 5 || cfg.WriteFraction != 0.5) {
				t.Errorf("defaults %+v, want 4 clients, 5 keys, write fraction 0.5", cfg)
			}
			if want := tt.cfg.VM; !tt.wantErr && (want.IsValid() && cfg.VM != want || !want.IsValid() && cfg.VM != VMIP) {
				t.Errorf("VM %s, want %s (default %s)", cfg.VM, want, VMIP)
			}
		})
	}
}

func TestAnomalies(t *testing.T) {
	ops := []Op{
		put(0, "k0", "c0-0", 1, 0, 10),
		put(0, "k0", "c0-1", 2, 20, 30),
		get(1, "k0", "c0-0", 40, 50), // overwritten before it began
		get(2, "k0", "c0-1", 40, 50),
		put(0, "k1", "c0-2", 3, 60, 70),
		getNotFound(1, "k1", 80, 90), // lost
		get(2, "k2", "ghost", 80, 90),
		get(1, "k0", "c3-9", 100, 110),
		put(3, "k0", "c3-9", 4, 120, 130), // read before it was sent
	}
	got := Anomalies(ops, 10)
	want := []string{"overwritten before", "read a value nobody wrote", "read nothing", "sent only at"}
	if len(got) != len(want) {
		t.Fatalf("anomalies %q, want %d", got, len(want))
	}
	for _, w := range want {
		found := false
		for _, g := range got {
			found = found || strings.Contains(g, w)
		}
		if !found {
			t.Errorf("no anomaly %q in %q", w, got)
		}
	}
	if n := len(Anomalies(ops, 2)); n != 2 {
		t.Errorf("limit 2: %d anomalies", n)
	}
}

// A long outage leaves hundreds of PUTs without an answer. Those that no
// read saw cannot change the verdict, and must not make the search blow
// up; one a read saw still counts.
func TestManyIndeterminatePutsDecided(t *testing.T) {
	var ops []Op
	clock := 0
	for i := range 3000 {
		key := fmt.Sprintf("k%d", i%3)
		value := fmt.Sprintf("c%d-%d", i%4, i)
		switch {
		case i%10 == 3:
			ops = append(ops, timedOut(put(i%4, key, value, 0, clock, clock+1)))
		case i%2 == 0:
			ops = append(ops, put(i%4, key, value, uint64(i+1), clock, clock+1))
		}
		clock += 2
	}
	// A read of the last timed-out PUT of k0, after it.
	var seen Op
	for _, op := range ops {
		if op.Key == "k0" && op.Outcome == OutcomeIndeterminate {
			seen = op
		}
	}
	ops = append(ops, get(1, "k0", seen.Value, clock+1, clock+2))
	res := CheckHistory(historyOf(ops...), time.Time{}, 10*time.Second)
	if res.Verdict != porcupine.Ok {
		t.Fatalf("verdict %s, want ok: %s", res.Verdict, res)
	}
	// The read put the timed-out PUT after every acknowledged one: a
	// later read of an earlier value is stale.
	var after Op
	for _, op := range ops {
		if op.Key == "k0" && op.Kind == OpPut && op.Outcome == OutcomeOK && op.Invoke.After(seen.Return) {
			after = op
			break
		}
	}
	if after.Value == "" {
		t.Skip("no acknowledged PUT after the read one")
	}
	stale := append(slices.Clone(ops), get(3, "k0", after.Value, clock+3, clock+4))
	if res := CheckHistory(historyOf(stale...), time.Time{}, 10*time.Second); res.Verdict != porcupine.Illegal {
		t.Errorf("a value read after a later read of its overwrite: verdict %s, want illegal", res.Verdict)
	}
}
