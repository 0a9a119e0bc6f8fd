package arbiter

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func openFileTest(t *testing.T, dir string) Arbiter {
	t.Helper()
	a, err := Open("file:" + dir)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { a.Close() })
	return a
}

func TestFile(t *testing.T) {
	dir := t.TempDir()
	testArbiter(t, func() Arbiter { return openFileTest(t, dir) })
}

func TestFileReopen(t *testing.T) {
	dir := t.TempDir()
	a := openFileTest(t, dir)
	mustClaim(t, a, "vm1", "a", 0, Claim{Epoch: 1, Owner: "a", Won: true})
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	b := openFileTest(t, dir)
	mustCurrent(t, b, "vm1", Claim{Epoch: 1, Owner: "a"})
	mustClaim(t, b, "vm1", "b", 0, Claim{Epoch: 1, Owner: "a"})
}

// TestFileLayout pins the on-disk format operators and the other host read.
func TestFileLayout(t *testing.T) {
	dir := t.TempDir()
	a := openFileTest(t, dir)
	mustClaim(t, a, "vm1", "a", 0, Claim{Epoch: 1, Owner: "a", Won: true})
	mustClaim(t, a, "vm1", "b", 1, Claim{Epoch: 2, Owner: "b", Won: true})

	b, err := os.ReadFile(filepath.Join(dir, "vm1.claim"))
	if err != nil {
		t.Fatal(err)
	}
	var rec struct {
		Epoch uint64    `json:"epoch"`
		Owner string    `json:"owner"`
		Time  time.Time `json:"time"`
	}
	if err := json.Unmarshal(b, &rec); err != nil {
		t.Fatalf("decode %s: %v", b, err)
	}
	if rec.Epoch != 2 || rec.Owner != "b" || time.Since(rec.Time) > time.Minute {
		t.Errorf("vm1.claim = %s", b)
	}
	// No temp files are left behind.
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	if want := []string{"vm1.claim", "vm1.lock"}; !slices.Equal(names, want) {
		t.Errorf("dir holds %q, want %q", names, want)
	}
}

func TestFileCorruptRecord(t *testing.T) {
	// Garbage, and records no claim writes: epoch 0 would read as "never
	// claimed" and let a restarting host boot the VM afresh.
	for _, rec := range []string{"{garbage", `{"epoch":0,"owner":"b"}`, `{"epoch":3}`, `null`, `{}`} {
		dir := t.TempDir()
		a := openFileTest(t, dir)
		if err := os.WriteFile(filepath.Join(dir, "vm1.claim"), []byte(rec), 0o644); err != nil {
			t.Fatal(err)
		}
		_, err := a.TryClaim(testContext(t), "vm1", "a", 0)
		if err == nil || errors.Is(err, ErrUnavailable) {
			t.Errorf("TryClaim on the record %s: %v; want a decode error", rec, err)
		}
		if c, err := a.Current(testContext(t), "vm1"); err == nil {
			t.Errorf("Current on the record %s: %+v, want an error", rec, c)
		}
	}
}

// TestFileLockHeld: a claimer that cannot get the lock (another process
// holds it, or the storage hangs) gives up at its deadline, unavailable.
func TestFileLockHeld(t *testing.T) {
	dir := t.TempDir()
	a := openFileTest(t, dir)
	f, err := os.OpenFile(filepath.Join(dir, "vm1.lock"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	c, err := a.TryClaim(ctx, "vm1", "a", 0)
	if !errors.Is(err, ErrUnavailable) || c.Won {
		t.Fatalf("TryClaim with the lock held = %+v, %v; want ErrUnavailable", c, err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("TryClaim took %v to give up", d)
	}

	// A caller that cancels is told so, not that the arbiter is down.
	ctx, cancel = context.WithCancel(context.Background())
	time.AfterFunc(50*time.Millisecond, cancel)
	if _, err := a.TryClaim(ctx, "vm1", "a", 0); !errors.Is(err, context.Canceled) || errors.Is(err, ErrUnavailable) {
		t.Fatalf("cancelled TryClaim: %v; want context.Canceled", err)
	}

	// Nothing was written; once the lock is free the claim goes through.
	if err := unix.Flock(int(f.Fd()), unix.LOCK_UN); err != nil {
		t.Fatal(err)
	}
	mustClaim(t, a, "vm1", "a", 0, Claim{Epoch: 1, Owner: "a", Won: true})
}

// helperEnv names the claim directory when the test binary runs as the
// helper process of TestFileRaceProcesses.
const helperEnv = "ARBITER_TEST_HELPER_DIR"

// TestFileRaceProcesses races two other processes and a few goroutines of
// this one for the same VM, round after round: flock must exclude across
// processes as well as goroutines.
func TestFileRaceProcesses(t *testing.T) {
	const procs, goroutines, rounds = 2, 6, 20
	dir := t.TempDir()

	var helpers []*helperProc
	for i := range procs {
		helpers = append(helpers, startHelper(t, dir, fmt.Sprintf("proc-%d", i)))
	}
	arbs := make([]Arbiter, goroutines)
	for i := range arbs {
		arbs[i] = openFileTest(t, dir)
	}

	var last Claim
	procWins := 0
	for round := range rounds {
		for _, h := range helpers {
			h.ask(t, last.Epoch)
		}
		got := raceRound(t, arbs, "vm-procs", last.Epoch)
		for _, h := range helpers {
			got = append(got, h.answer(t))
		}
		last = checkRound(t, round, last.Epoch, got)
		if last.Owner[:4] == "proc" {
			procWins++
		}
	}
	t.Logf("the other processes won %d of %d rounds", procWins, rounds)
	mustCurrent(t, arbs[0], "vm-procs", Claim{Epoch: rounds, Owner: last.Owner})
}

// TestFileHelperProcess is the other process of TestFileRaceProcesses, not a
// test: for each epoch read from stdin it claims vm-procs and writes the
// Claim (or {"err": ...}) as a JSON line.
func TestFileHelperProcess(t *testing.T) {
	dir := os.Getenv(helperEnv)
	if dir == "" {
		return
	}
	host := os.Getenv(helperEnv + "_HOST")
	a, err := Open("file:" + dir)
	if err != nil {
		fmt.Printf("{\"err\": %q}\n", err.Error())
		os.Exit(1)
	}
	in := bufio.NewScanner(os.Stdin)
	out := json.NewEncoder(os.Stdout)
	for in.Scan() {
		known, err := strconv.ParseUint(in.Text(), 10, 64)
		if err != nil {
			out.Encode(map[string]string{"err": err.Error()})
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		c, err := a.TryClaim(ctx, "vm-procs", host, known)
		cancel()
		if err != nil {
			out.Encode(map[string]string{"err": err.Error()})
			continue
		}
		out.Encode(c)
	}
	os.Exit(0) // before the testing package prints PASS into the protocol
}

type helperProc struct {
	stdin   io.WriteCloser
	answers chan string // JSON lines
}

func startHelper(t *testing.T, dir, host string) *helperProc {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestFileHelperProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), helperEnv+"="+dir, helperEnv+"_HOST="+host)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start helper: %v", err)
	}
	h := &helperProc{stdin: stdin, answers: make(chan string, 1)}
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			h.answers <- sc.Text()
		}
		close(h.answers)
	}()
	t.Cleanup(func() {
		stdin.Close() // the helper exits on EOF
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
	return h
}

func (h *helperProc) ask(t *testing.T, known uint64) {
	t.Helper()
	if _, err := fmt.Fprintln(h.stdin, known); err != nil {
		t.Fatalf("ask helper: %v", err)
	}
}

func (h *helperProc) answer(t *testing.T) Claim {
	t.Helper()
	select {
	case line, ok := <-h.answers:
		if !ok {
			t.Fatal("helper exited")
		}
		var r struct {
			Claim
			Err string `json:"err"`
		}
		if err := json.Unmarshal([]byte(line), &r); err != nil || r.Err != "" {
			t.Fatalf("helper answered %q (%v)", line, err)
		}
		return r.Claim
	case <-time.After(20 * time.Second):
		t.Fatal("helper did not answer within 20s")
	}
	return Claim{}
}
