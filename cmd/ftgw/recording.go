package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// recording keeps on disk the log of the VM's current recorder since it
// started (at boot, or from a go-live snapshot): re-protecting a real VM
// means a new secondary replays all of it. A snapshot the recorder took
// itself cannot seed a replayer (pkg/replay/resume.go), so there is no
// later starting point than the recorder's own.
//
// The file grows with everything the VM logs, so it is capped: past the
// cap the recording is dropped, and this VM can only be re-protected by
// restarting the pair.
type recording struct {
	path string
	max  int64

	f    *os.File
	from recorderLog // where the recording starts
	size int64
	err  error // why the recording is not whole, or nil
}

func newRecording(dir string, max int64) *recording {
	return &recording{path: filepath.Join(dir, "recording.log"), max: max}
}

// restart begins the recording of a new recorder's log stream.
func (r *recording) restart(from recorderLog) {
	r.close()
	r.from, r.size, r.err = from, 0, nil
	if err := os.MkdirAll(filepath.Dir(r.path), 0o755); err != nil {
		r.err = err
		return
	}
	r.f, r.err = os.OpenFile(r.path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
}

// append adds the next chunk of the stream.
func (r *recording) append(chunk []byte) {
	if r.err != nil {
		return
	}
	if r.size+int64(len(chunk)) > r.max {
		r.fail(fmt.Errorf("the VM has logged more than keep_log_bytes (%d) since its recorder started", r.max))
		return
	}
	if _, err := r.f.Write(chunk); err != nil {
		r.fail(fmt.Errorf("keep the recording: %w", err))
		return
	}
	r.size += int64(len(chunk))
}

// fail drops the recording: nothing can be re-protected from part of it.
func (r *recording) fail(err error) {
	r.err = err
	r.close()
	os.Remove(r.path)
}

func (r *recording) close() {
	if r.f != nil {
		r.f.Close()
		r.f = nil
	}
}

// reader opens the recording for reading while it grows.
func (r *recording) reader() (*os.File, error) {
	if r.err != nil {
		return nil, r.err
	}
	if r.f == nil {
		return nil, errors.New("no recording: the VM's recorder has not started")
	}
	return os.Open(r.path)
}

// readChunk reads the recording at off, at most len(buf) bytes and not past
// end.
func readChunk(f *os.File, buf []byte, off, end int64) ([]byte, error) {
	n := min(int64(len(buf)), end-off)
	if n <= 0 {
		return nil, nil
	}
	got, err := f.ReadAt(buf[:n], off)
	if err != nil && !(errors.Is(err, io.EOF) && int64(got) == n) {
		return nil, fmt.Errorf("read the recording at %d: %w", off, err)
	}
	return buf[:n], nil
}
