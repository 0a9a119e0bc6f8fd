package arbiter

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// fileArbiter keeps one record per VM in a directory that both hosts see
// (the lab's shared path, or shared storage as in VMware FT):
//
//	<dir>/<vm>.claim  JSON {epoch, owner, time}, replaced atomically by rename
//	<dir>/<vm>.lock   empty; flocked exclusively around read-compare-write
//
// flock serialises claimers across processes and, because every call opens
// the lock file anew (a lock belongs to the open file), across goroutines too.
// Readers need no lock: rename makes a reader see the old or the new record,
// never a mix.
type fileArbiter struct {
	dir string
}

// fileRecord is the JSON in <vm>.claim. Time is for people reading the file.
type fileRecord struct {
	Epoch uint64    `json:"epoch"`
	Owner string    `json:"owner"`
	Time  time.Time `json:"time"`
}

// lockPoll is how often a claimer retries a held lock. Claims hold it for a
// couple of fsyncs, so a short poll keeps failover fast.
const lockPoll = 2 * time.Millisecond

func openFile(spec, dir string) (Arbiter, error) {
	if dir == "" {
		return nil, fmt.Errorf("arbiter spec %q: empty directory (want file:/path/to/dir)", spec)
	}
	// The directory is not created here: if the shared mount is missing, a
	// fresh local directory would give each host its own arbiter, and both
	// would win.
	st, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("arbiter spec %q: %w", spec, err)
	}
	if !st.IsDir() {
		return nil, fmt.Errorf("arbiter spec %q: %s is not a directory", spec, dir)
	}
	return &fileArbiter{dir: dir}, nil
}

func (a *fileArbiter) claimPath(vm string) string { return filepath.Join(a.dir, vm+".claim") }
func (a *fileArbiter) lockPath(vm string) string  { return filepath.Join(a.dir, vm+".lock") }

func (a *fileArbiter) TryClaim(ctx context.Context, vm, host string, known uint64) (Claim, error) {
	if err := checkClaim(vm, host, known); err != nil {
		return Claim{}, err
	}
	return bounded(ctx, "claim vm "+vm, func(ctx context.Context) (Claim, error) {
		return a.tryClaim(ctx, vm, host, known)
	})
}

func (a *fileArbiter) Current(ctx context.Context, vm string) (Claim, error) {
	if err := checkVM(vm); err != nil {
		return Claim{}, err
	}
	return bounded(ctx, "read vm "+vm, func(context.Context) (Claim, error) {
		rec, err := a.read(vm)
		return Claim{Epoch: rec.Epoch, Owner: rec.Owner}, err
	})
}

func (a *fileArbiter) Close() error { return nil }

// bounded runs f in its own goroutine so that storage that hangs (a dead NFS
// server blocks reads and fsyncs uninterruptibly) still lets the caller give
// up at the deadline with ErrUnavailable. f may then finish later; see the
// package doc on retries for why a late-committed claim is harmless.
func bounded(ctx context.Context, what string, f func(context.Context) (Claim, error)) (Claim, error) {
	caller := ctx
	ctx, cancel := withTimeout(ctx)
	defer cancel()
	type result struct {
		c   Claim
		err error
	}
	done := make(chan result, 1) // buffered: an abandoned f must not block
	go func() {
		c, err := f(ctx)
		done <- result{c, err}
	}()
	select {
	case r := <-done:
		if r.err != nil {
			var fileErr *fileError
			if errors.As(r.err, &fileErr) || ctx.Err() != nil {
				return Claim{}, unavailable(caller, what, r.err)
			}
			return Claim{}, fmt.Errorf("%s: %w", what, r.err)
		}
		return r.c, nil
	case <-ctx.Done():
		return Claim{}, unavailable(caller, what, ctx.Err())
	}
}

// fileError marks I/O failures of the shared storage, which mean the
// arbiter is unavailable (as opposed to, say, a corrupt record).
type fileError struct{ err error }

func (e *fileError) Error() string { return e.err.Error() }
func (e *fileError) Unwrap() error { return e.err }

func ioErr(format string, args ...any) error {
	return &fileError{fmt.Errorf(format, args...)}
}

func (a *fileArbiter) tryClaim(ctx context.Context, vm, host string, known uint64) (Claim, error) {
	unlock, err := a.lock(ctx, vm)
	if err != nil {
		return Claim{}, err
	}
	defer unlock()

	rec, err := a.read(vm)
	if err != nil {
		return Claim{}, err
	}
	switch {
	case rec.Epoch == known:
		// Nobody claimed since the caller last looked: take the next epoch.
	case rec.Epoch == known+1 && rec.Owner == host:
		// A retry of a claim this host already won (package doc, Retries).
		return Claim{Epoch: rec.Epoch, Owner: rec.Owner, Won: true}, nil
	default:
		return Claim{Epoch: rec.Epoch, Owner: rec.Owner}, nil
	}
	// Do not commit a claim whose caller has already been told it failed.
	if err := ctx.Err(); err != nil {
		return Claim{}, err
	}
	next := fileRecord{Epoch: known + 1, Owner: host, Time: time.Now().UTC()}
	if err := a.write(vm, next); err != nil {
		return Claim{}, err
	}
	return Claim{Epoch: next.Epoch, Owner: next.Owner, Won: true}, nil
}

// lock takes the exclusive flock on <vm>.lock, polling with LOCK_NB so the
// wait ends with ctx (a blocking flock cannot be interrupted).
func (a *fileArbiter) lock(ctx context.Context, vm string) (unlock func(), err error) {
	f, err := os.OpenFile(a.lockPath(vm), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, ioErr("open lock: %w", err)
	}
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			// Closing the file releases the lock.
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			f.Close()
			return nil, ioErr("lock %s: %w", f.Name(), err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", f.Name(), ctx.Err())
		case <-time.After(lockPoll):
		}
	}
}

// read returns the record for vm; a missing file is epoch 0.
func (a *fileArbiter) read(vm string) (fileRecord, error) {
	b, err := os.ReadFile(a.claimPath(vm))
	if errors.Is(err, fs.ErrNotExist) {
		return fileRecord{}, nil
	}
	if err != nil {
		return fileRecord{}, ioErr("read claim: %w", err)
	}
	var rec fileRecord
	if err := json.Unmarshal(b, &rec); err != nil {
		return fileRecord{}, fmt.Errorf("decode claim %s: %w", a.claimPath(vm), err)
	}
	if err := checkStored(rec.Epoch, rec.Owner); err != nil {
		return fileRecord{}, fmt.Errorf("claim %s: %w", a.claimPath(vm), err)
	}
	return rec, nil
}

// write replaces the record durably: temp file, fsync, rename, fsync of the
// directory (without it, a crash could forget the rename and with it the
// epoch, letting an old epoch be won twice).
func (a *fileArbiter) write(vm string, rec fileRecord) error {
	b, err := json.Marshal(rec)
	if err != nil {
		return fmt.Errorf("encode claim: %w", err)
	}
	tmp, err := os.CreateTemp(a.dir, "."+vm+".claim.tmp-*")
	if err != nil {
		return ioErr("create temp claim: %w", err)
	}
	defer os.Remove(tmp.Name()) // fails harmlessly after the rename
	if _, err := tmp.Write(append(b, '\n')); err != nil {
		tmp.Close()
		return ioErr("write temp claim: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return ioErr("sync temp claim: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return ioErr("close temp claim: %w", err)
	}
	if err := os.Rename(tmp.Name(), a.claimPath(vm)); err != nil {
		return ioErr("rename claim: %w", err)
	}
	d, err := os.Open(a.dir)
	if err != nil {
		return ioErr("open claim dir: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return ioErr("sync claim dir: %w", err)
	}
	return nil
}
