package lab

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/anishathalye/porcupine"

	"github.com/ftgw/ftgw/pkg/guest"
)

// OpKind is what an operation asked the guest to do.
type OpKind uint8

const (
	OpPut OpKind = iota
	OpGet
)

func (k OpKind) String() string {
	if k == OpPut {
		return "put"
	}
	return "get"
}

// Outcome is what the client learnt about an operation.
type Outcome uint8

const (
	// OutcomeOK: the guest answered.
	OutcomeOK Outcome = iota
	// OutcomeIndeterminate: no answer came in time, so the operation may
	// or may not have taken effect.
	OutcomeIndeterminate
)

// Op is one operation of a client against the guest's key-value store.
type Op struct {
	Client int // zero-indexed, as porcupine's visualization wants
	Kind   OpKind
	Key    string
	// Value is what a PUT wrote or what a GET read.
	Value string
	Found bool   // GET: the key had a value
	Count uint64 // PUT: the guest's count of PUTs applied, this one included
	// Invoke is when the request was sent, Return when its answer came or
	// the client gave up.
	Invoke, Return time.Time
	Outcome        Outcome
}

func (o Op) String() string {
	var request, answer string
	switch {
	case o.Kind == OpPut:
		request, answer = fmt.Sprintf("put %s=%s", o.Key, o.Value), fmt.Sprintf("-> %d", o.Count)
	case o.Found:
		request, answer = "get "+o.Key, "-> "+o.Value
	default:
		request, answer = "get "+o.Key, "-> not found"
	}
	if o.Outcome == OutcomeIndeterminate {
		answer = "timed out"
	}
	return fmt.Sprintf("client %d %s %s", o.Client, request, answer)
}

// History collects the operations of concurrent clients.
type History struct {
	mu  sync.Mutex
	ops []Op
}

// Add records one finished operation; it is safe from several goroutines.
func (h *History) Add(op Op) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.ops = append(h.ops, op)
}

// Len is the number of operations recorded so far.
func (h *History) Len() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.ops)
}

// Ops returns a copy of the operations recorded so far, in the order they
// finished.
func (h *History) Ops() []Op {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.ops)
}

// LoadConfig shapes a Load. Zero fields take the defaults below, except the
// bounds MaxOps and MaxTime, which must be set.
type LoadConfig struct {
	Clients int // concurrent clients; default 4
	Keys    int // keys "k0".."k<Keys-1>"; default 5
	// KeyPrefix goes before every key: loads run one after another on
	// one VM each judge a history of their own, from keys no earlier
	// load wrote.
	KeyPrefix     string
	WriteFraction float64       // share of PUTs, in (0, 1]; default 0.5
	Timeout       time.Duration // per request; zero means guest.DefaultTimeout
	MaxOps        int           // operations in all, over every client
	MaxTime       time.Duration
	// VM is the address of the VM the load drives; default VMIP.
	VM netip.Addr
}

func (cfg *LoadConfig) setDefaults() {
	if cfg.Clients == 0 {
		cfg.Clients = 4
	}
	if cfg.Keys == 0 {
		cfg.Keys = 5
	}
	if cfg.WriteFraction == 0 {
		cfg.WriteFraction = 0.5
	}
	if !cfg.VM.IsValid() {
		cfg.VM = VMIP
	}
}

func (cfg LoadConfig) validate() error {
	switch {
	case cfg.Clients < 1:
		return fmt.Errorf("%d clients, want at least 1", cfg.Clients)
	case cfg.Keys < 1:
		return fmt.Errorf("%d keys, want at least 1", cfg.Keys)
	case cfg.WriteFraction <= 0 || cfg.WriteFraction > 1:
		return fmt.Errorf("write fraction %g, want one in (0, 1]", cfg.WriteFraction)
	case cfg.Timeout < 0:
		return fmt.Errorf("negative request timeout %s", cfg.Timeout)
	case cfg.MaxOps < 1:
		return fmt.Errorf("max ops %d, want a bound of at least 1", cfg.MaxOps)
	case cfg.MaxTime <= 0:
		return fmt.Errorf("max time %s, want a positive bound", cfg.MaxTime)
	case !cfg.VM.Is4():
		return fmt.Errorf("VM %s, want an IPv4 address", cfg.VM)
	}
	return nil
}

// Load is a Jepsen-style mixed load from the client namespace: several
// clients, each one request at a time, PUTs and GETs over a few shared keys,
// each PUT writing a value no other PUT writes, so a read names the write it
// saw. Requests are never retried (a PUT is not idempotent): a timed-out one
// is recorded as indeterminate.
type Load struct {
	history  History
	paused   atomic.Bool
	inFlight atomic.Int64 // operations begun and not yet ended
	acked    atomic.Int64
	started  atomic.Int64 // operations begun, against MaxOps
	stop     chan struct{}
	stopOnce sync.Once
	done     chan struct{} // closed when every client has returned
}

// StartLoad dials one client per cfg.Clients in the client namespace and
// starts the load; it runs until Stop, MaxOps operations or MaxTime.
func StartLoad(cfg LoadConfig) (_ *Load, err error) {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("start load: %w", err)
	}
	clients := make([]*guest.Client, 0, cfg.Clients)
	defer func() {
		if err != nil {
			for _, c := range clients {
				c.Close()
			}
		}
	}()
	for i := range cfg.Clients {
		c, err := DialVM(cfg.VM, cfg.Timeout)
		if err != nil {
			return nil, fmt.Errorf("dial load client %d of %s: %w", i, cfg.VM, err)
		}
		clients = append(clients, c)
	}

	l := &Load{stop: make(chan struct{}), done: make(chan struct{})}
	deadline := time.Now().Add(cfg.MaxTime)
	var running sync.WaitGroup
	for id, c := range clients {
		running.Go(func() { l.runClient(id, c, cfg, deadline) })
	}
	go func() {
		running.Wait()
		close(l.done)
	}()
	return l, nil
}

func (l *Load) runClient(id int, c *guest.Client, cfg LoadConfig, deadline time.Time) {
	defer func() { c.Close() }()
	keys := make([]string, cfg.Keys)
	for i := range keys {
		keys[i] = fmt.Sprintf("%sk%d", cfg.KeyPrefix, i)
	}
	for seq := 0; seq < cfg.MaxOps; seq++ {
		select {
		case <-l.stop:
			return
		default:
		}
		if !time.Now().Before(deadline) || l.started.Add(1) > int64(cfg.MaxOps) {
			return
		}
		for l.paused.Load() {
			select {
			case <-l.stop:
				return
			case <-time.After(time.Millisecond):
			}
		}
		l.inFlight.Add(1)
		op := Op{Client: id, Key: keys[rand.IntN(len(keys))], Kind: OpGet}
		var err error
		op.Invoke = time.Now()
		if rand.Float64() < cfg.WriteFraction {
			op.Kind, op.Value = OpPut, fmt.Sprintf("c%d-%d", id, seq)
			op.Count, err = c.Put(op.Key, op.Value)
		} else {
			op.Value, op.Found, err = c.Get(op.Key)
		}
		op.Return = time.Now()
		// Any error counts as indeterminate, not only a timeout: taking a
		// failed operation as unknown can hide a violation, never invent
		// one.
		if err != nil {
			op.Outcome = OutcomeIndeterminate
		} else {
			l.acked.Add(1)
		}
		l.history.Add(op)
		l.inFlight.Add(-1)
		if err != nil {
			// The reply may still come, late (held output released
			// after a failover): from a new port, it cannot be taken
			// for the answer to a later request on the same key.
			if fresh, derr := DialVM(cfg.VM, cfg.Timeout); derr == nil {
				c.Close()
				c = fresh
			}
		}
	}
}

// Pause stops the clients between operations, and returns once none is
// under way (or after timeout): the VM's state sits still for a look.
func (l *Load) Pause(timeout time.Duration) error {
	l.paused.Store(true)
	deadline := time.Now().Add(timeout)
	for l.inFlight.Load() > 0 {
		if time.Now().After(deadline) {
			return fmt.Errorf("pause load: %d operations still under way after %s", l.inFlight.Load(), timeout)
		}
		time.Sleep(time.Millisecond)
	}
	return nil
}

// Resume lets the clients go on after Pause.
func (l *Load) Resume() { l.paused.Store(false) }

// Ops is the number of operations finished so far, acknowledged or not.
func (l *Load) Ops() int { return l.history.Len() }

// Acked is the number of operations acknowledged so far.
func (l *Load) Acked() int { return int(l.acked.Load()) }

// WaitOps waits until n operations have finished, acknowledged or not, or
// fails after timeout or when the load ends short of n.
func (l *Load) WaitOps(n int, timeout time.Duration) error {
	return l.waitFor("finished", l.Ops, n, timeout)
}

// WaitAcked waits until n operations have been acknowledged, or fails after
// timeout or when the load ends short of n.
func (l *Load) WaitAcked(n int, timeout time.Duration) error {
	return l.waitFor("acknowledged", l.Acked, n, timeout)
}

func (l *Load) waitFor(what string, count func() int, n int, timeout time.Duration) error {
	expired := time.NewTimer(timeout)
	defer expired.Stop()
	poll := time.NewTicker(5 * time.Millisecond)
	defer poll.Stop()
	for count() < n {
		select {
		case <-l.done:
			// The last operations may have landed after the check above.
			if got := count(); got < n {
				return fmt.Errorf("load ended with %d operations %s, want %d", got, what, n)
			}
			return nil
		case <-expired.C:
			return fmt.Errorf("%d operations %s after %s, want %d", count(), what, timeout, n)
		case <-poll.C:
		}
	}
	return nil
}

// Stop ends the load, waits for every client's request in flight (at most
// one request timeout) and returns the history.
func (l *Load) Stop() *History {
	l.stopOnce.Do(func() { close(l.stop) })
	<-l.done
	return &l.history
}

// HistoryResult is what CheckHistory found.
type HistoryResult struct {
	Ops, Acked, Indeterminate int
	// Verdict is porcupine's: Ok, Illegal, or Unknown when the search
	// timed out before deciding.
	Verdict porcupine.CheckResult
	// CounterViolations counts acknowledged PUTs whose count repeats an
	// earlier PUT's, or is not above that of a PUT acknowledged before
	// this one was sent; CounterExamples describes the first few.
	CounterViolations int
	CounterExamples   []string
	// LongestGap is the longest time after the fault during which no
	// operation was acknowledged (fault to first ack, between acks, last
	// ack to the end of the history); zero without a fault time.
	LongestGap time.Duration

	linearization *porcupine.LinearizationInfo
}

// maxCounterExamples bounds CounterExamples: the first few say what went
// wrong, thousands would bury it.
const maxCounterExamples = 5

// OK reports whether the history is linearizable (decided, not timed out)
// and the PUT counter behaved.
func (r HistoryResult) OK() bool {
	return r.Verdict == porcupine.Ok && r.CounterViolations == 0
}

func (r HistoryResult) String() string {
	var firstExample string
	if len(r.CounterExamples) > 0 {
		firstExample = " (" + r.CounterExamples[0] + ")"
	}
	return fmt.Sprintf("ops %d acked %d indeterminate %d, linearizable: %s, counter violations %d%s, longest gap %s",
		r.Ops, r.Acked, r.Indeterminate, strings.ToLower(string(r.Verdict)),
		r.CounterViolations, firstExample, r.LongestGap.Round(100*time.Microsecond))
}

// Visualize writes porcupine's HTML view of the history and the longest
// linearizations it found to path, with the fault, the longest gap and
// the counter violations marked.
func (r HistoryResult) Visualize(path string) error {
	if r.linearization == nil {
		return errors.New("visualize history: result has no linearization info, not from CheckHistory")
	}
	if err := porcupine.VisualizePath(registerModel, *r.linearization, path); err != nil {
		return fmt.Errorf("visualize history: %w", err)
	}
	return nil
}

// CheckHistory checks h for linearizability against a register per key
// and checks the guest's PUT counter; fault is when the fault hit (zero
// for none) and timeout bounds the linearizability search (zero: none).
func CheckHistory(h *History, fault time.Time, timeout time.Duration) HistoryResult {
	ops := h.Ops()
	res := HistoryResult{Ops: len(ops)}
	for _, op := range ops {
		if op.Outcome == OutcomeOK {
			res.Acked++
		} else {
			res.Indeterminate++
		}
	}
	origin := earliestInvoke(ops)
	offset := func(t time.Time) int64 { return t.Sub(origin).Nanoseconds() }

	verdict, info := porcupine.CheckOperationsVerbose(registerModel, porcupineOps(ops, offset), timeout)
	res.Verdict = verdict

	var annotations []porcupine.Annotation
	for _, v := range counterViolations(ops) {
		res.CounterViolations++
		if len(res.CounterExamples) < maxCounterExamples {
			res.CounterExamples = append(res.CounterExamples, v.reason)
		}
		annotations = append(annotations, porcupine.Annotation{
			ClientId: v.op.Client, Start: offset(v.op.Invoke), End: offset(v.op.Return),
			Description: "counter", Details: v.reason, BackgroundColor: "#f4a7a7",
		})
	}
	if !fault.IsZero() {
		from, to := longestGap(ops, fault)
		res.LongestGap = to.Sub(from)
		annotations = append(annotations,
			porcupine.Annotation{Tag: "fault", Start: offset(fault), Description: "fault"},
			porcupine.Annotation{Tag: "longest gap", Start: offset(from), End: offset(to),
				Description: res.LongestGap.Round(100 * time.Microsecond).String()})
	}
	info.AddAnnotations(annotations)
	res.linearization = &info
	return res
}

func earliestInvoke(ops []Op) time.Time {
	var origin time.Time
	for i, op := range ops {
		if i == 0 || op.Invoke.Before(origin) {
			origin = op.Invoke
		}
	}
	return origin
}

// registerInput and registerOutput are an Op as the register model sees it.
type registerInput struct {
	put        bool
	key, value string
}

type registerOutput struct {
	value string
	found bool
	// timedOut marks a PUT whose answer never came, for the visualization.
	timedOut bool
}

// registerState is one key's value; the zero state is "not found".
type registerState struct {
	value string
	found bool
}

// registerModel is a register per key: porcupine checks each key's
// operations on their own, which keeps the search small.
var registerModel = porcupine.Model{
	Partition:      partitionByKey,
	PartitionEvent: partitionEventsByKey,
	Init:           func() any { return registerState{} },
	Step: func(state, input, output any) (bool, any) {
		in, out, st := input.(registerInput), output.(registerOutput), state.(registerState)
		if in.put {
			return true, registerState{value: in.value, found: true}
		}
		return out == registerOutput{value: st.value, found: st.found}, st
	},
	DescribeOperation: func(input, output any) string {
		in, out := input.(registerInput), output.(registerOutput)
		switch {
		case in.put && out.timedOut:
			return fmt.Sprintf("put(%s, %s) timed out", in.key, in.value)
		case in.put:
			return fmt.Sprintf("put(%s, %s)", in.key, in.value)
		case out.found:
			return fmt.Sprintf("get(%s) -> %s", in.key, out.value)
		default:
			return fmt.Sprintf("get(%s) -> not found", in.key)
		}
	},
	DescribeState: func(state any) string {
		if st := state.(registerState); st.found {
			return st.value
		}
		return "not found"
	},
}

// porcupineOps turns ops into porcupine's, with times as offsets.
func porcupineOps(ops []Op, offset func(time.Time) int64) []porcupine.Operation {
	var latestReturn int64
	for _, op := range ops {
		latestReturn = max(latestReturn, offset(op.Return))
	}
	// What the acknowledged reads saw, per key.
	read := map[registerInput]bool{}
	for _, op := range ops {
		if op.Kind == OpGet && op.Outcome == OutcomeOK && op.Found {
			read[registerInput{put: true, key: op.Key, value: op.Value}] = true
		}
	}
	history := make([]porcupine.Operation, 0, len(ops))
	for _, op := range ops {
		in := registerInput{put: op.Kind == OpPut, key: op.Key, value: op.Value}
		out := registerOutput{value: op.Value, found: op.Found}
		ret := offset(op.Return)
		if op.Kind == OpPut {
			out = registerOutput{} // a PUT's answer says nothing about the register
		}
		if op.Outcome == OutcomeIndeterminate {
			if op.Kind == OpGet {
				continue // it read nothing we know
			}
			// A PUT whose answer never came may have taken effect at any
			// time after it was sent, or never: an answer after every
			// other one lets the checker place it anywhere from its call
			// on, including after every read, as if it never happened.
			// One that no read saw can always go there, last, where it
			// changes nothing: left out, it saves the search from trying
			// it everywhere else (a long outage leaves hundreds).
			if !read[in] {
				continue
			}
			out.timedOut = true
			ret = latestReturn + 1
		}
		history = append(history, porcupine.Operation{
			ClientId: op.Client, Input: in, Call: offset(op.Invoke), Output: out, Return: ret,
		})
	}
	return history
}

func partitionByKey(history []porcupine.Operation) [][]porcupine.Operation {
	byKey := map[string][]porcupine.Operation{}
	for _, op := range history {
		key := op.Input.(registerInput).key
		byKey[key] = append(byKey[key], op)
	}
	return sortedByKey(byKey)
}

func partitionEventsByKey(history []porcupine.Event) [][]porcupine.Event {
	// A return event carries the output, not the key: find it by the id
	// of its call.
	keyOfID := map[int]string{}
	byKey := map[string][]porcupine.Event{}
	for _, ev := range history {
		if ev.Kind == porcupine.CallEvent {
			keyOfID[ev.Id] = ev.Value.(registerInput).key
		}
		key := keyOfID[ev.Id]
		byKey[key] = append(byKey[key], ev)
	}
	return sortedByKey(byKey)
}

// sortedByKey lists partitions in key order, so a visualization is the same
// from one check to the next.
func sortedByKey[T any](byKey map[string][]T) [][]T {
	keys := make([]string, 0, len(byKey))
	for k := range byKey {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	parts := make([][]T, 0, len(keys))
	for _, k := range keys {
		parts = append(parts, byKey[k])
	}
	return parts
}

type counterViolation struct {
	op     Op
	reason string
}

// counterViolations checks the counts of acknowledged PUTs: the guest counts
// every PUT it applies, so two PUTs with one count mean one was applied
// twice or state was lost, and a PUT sent after another was acknowledged
// must get a higher count. Each PUT is reported once, for its first fault.
func counterViolations(ops []Op) []counterViolation {
	var puts []Op
	for _, op := range ops {
		if op.Kind == OpPut && op.Outcome == OutcomeOK {
			puts = append(puts, op)
		}
	}
	byInvoke := slices.SortedStableFunc(slices.Values(puts), func(a, b Op) int { return a.Invoke.Compare(b.Invoke) })
	byReturn := slices.SortedStableFunc(slices.Values(puts), func(a, b Op) int { return a.Return.Compare(b.Return) })

	var violations []counterViolation
	firstWithCount := map[uint64]Op{}
	// highest is the PUT with the highest count among those acknowledged
	// before the current one was sent.
	var highest *Op
	returned := 0
	for _, put := range byInvoke {
		for returned < len(byReturn) && byReturn[returned].Return.Before(put.Invoke) {
			if done := &byReturn[returned]; highest == nil || done.Count > highest.Count {
				highest = done
			}
			returned++
		}
		if first, seen := firstWithCount[put.Count]; seen {
			violations = append(violations, counterViolation{put,
				fmt.Sprintf("%s repeats the count of %s", put, first)})
			continue
		}
		firstWithCount[put.Count] = put
		if highest != nil && highest.Count > put.Count {
			violations = append(violations, counterViolation{put,
				fmt.Sprintf("%s went back from %s acknowledged before it was sent", put, *highest)})
		}
	}
	return violations
}

// longestGap returns the longest interval after fault without an
// acknowledgement: from the fault to the first one, between two, or from
// the last one to the end of the history.
func longestGap(ops []Op, fault time.Time) (from, to time.Time) {
	end := fault
	var acks []time.Time
	for _, op := range ops {
		if op.Return.After(end) {
			end = op.Return
		}
		if op.Outcome == OutcomeOK && !op.Return.Before(fault) {
			acks = append(acks, op.Return)
		}
	}
	slices.SortFunc(acks, func(a, b time.Time) int { return a.Compare(b) })
	from, to = fault, fault
	last := fault
	for _, at := range append(acks, end) {
		if at.Sub(last) > to.Sub(from) {
			from, to = last, at
		}
		last = at
	}
	return from, to
}
