package arbiter

import (
	"encoding/json"
	"os"
	"testing"
)

// A claim record is read back from storage the other host writes too
// (the shared directory, the etcd key). Decoding whatever is there never
// panics, and a record it accepts survives the arbiter's own encoding:
// written back as a claim writes it, it decodes to the same record.
func FuzzDecodeClaimRecord(f *testing.F) {
	for _, rec := range []string{
		`{"epoch":1,"owner":"host-a","time":"2026-12-01T10:00:00.123456789Z"}`,
		`{"epoch":18446744073709551615,"owner":"h\u00e9te","time":"2026-12-01T11:00:00+01:00"}` + "\n",
		`{"epoch":2,"owner":"host-b"}`,
		`{"epoch":-1,"owner":"x"}`,
		`{"epoch":1e3}`,
		`{"epoch":3,"owner":"host-a"} trailing`,
		`{"epoch":3,"owner":"host-a","time":"not a time"}`,
		`{"EPOCH":4,"Owner":"host-a","owner":"host-b"}`,
		`null`,
		"",
	} {
		f.Add([]byte(rec))
	}
	dir := f.TempDir()
	files := &fileArbiter{dir: dir}
	const vm = "vm1"
	readFile := func(t *testing.T, b []byte) (fileRecord, error) {
		t.Helper()
		if err := os.WriteFile(files.claimPath(vm), b, 0o600); err != nil {
			t.Fatal(err)
		}
		return files.read(vm)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if rec, err := decodeRecord(b); err == nil {
			// As TryClaim encodes the record it puts.
			again, err := json.Marshal(rec)
			if err != nil {
				t.Fatalf("encode %+v: %v", rec, err)
			}
			if rec2, err := decodeRecord(again); err != nil || rec2 != rec {
				t.Fatalf("etcd record %+v encodes as %s, which decodes as %+v, %v", rec, again, rec2, err)
			}
		}

		rec, err := readFile(t, b)
		if err != nil {
			return
		}
		// As write encodes the record it renames into place.
		again, err := json.Marshal(rec)
		if err != nil {
			t.Fatalf("encode %+v: %v", rec, err)
		}
		rec2, err := readFile(t, append(again, '\n'))
		if err != nil || rec2.Epoch != rec.Epoch || rec2.Owner != rec.Owner || !rec2.Time.Equal(rec.Time) {
			t.Fatalf("file record %+v encodes as %s, which decodes as %+v, %v", rec, again, rec2, err)
		}
	})
}
