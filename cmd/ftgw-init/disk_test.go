package main

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/ftgw/ftgw/pkg/guest"
)

// applyLogged on a log in a plain file: the replies are the Store's, only
// the PUTs that succeed reach the log, a full log refuses a PUT without
// applying it, and replaying the log rebuilds the store.
func TestApplyLogged(t *testing.T) {
	// Room for the first two PUTs' records (8 bytes of header each) and not
	// for the third.
	size := int64(8 + len("PUT a 1") + 8 + len("PUT b two words\n") + 8)
	f, err := os.Create(filepath.Join(t.TempDir(), "disk"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	log, err := guest.OpenDiskLog(f, size, func([]byte) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	store := guest.NewStore()
	steps := []struct{ req, want string }{
		{"GET a", "NOTFOUND a"},
		{"PUT a 1", "OK 1 a"},
		{"PUT a", "ERR usage: PUT <key> <value>"},
		{"FROB", "ERR unknown command"},
		{"PUT b two words\n", "OK 2 b"},
		{"PUT c 3", errDiskFull},
		{"GET c", "NOTFOUND c"},
		{"GET b", "VALUE b two words"},
	}
	for _, st := range steps {
		got, err := applyLogged(store, log, st.req)
		if err != nil || got != st.want {
			t.Errorf("applyLogged(%q) = %q, %v; want %q", st.req, got, err, st.want)
		}
	}
	if store.Puts() != 2 {
		t.Errorf("Puts = %d after a refused PUT, want 2", store.Puts())
	}

	var logged []string
	replayed := guest.NewStore()
	if _, err := guest.OpenDiskLog(f, size, func(req []byte) error {
		logged = append(logged, string(req))
		replayed.Apply(string(req))
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if want := []string{"PUT a 1", "PUT b two words\n"}; !slices.Equal(logged, want) {
		t.Errorf("logged %q, want %q", logged, want)
	}
	if replayed.Digest() != store.Digest() {
		t.Errorf("the replayed store differs from the served one")
	}
}

// Without a log, applyLogged is the Store's Apply, byte for byte.
func TestApplyLoggedWithoutDisk(t *testing.T) {
	store, want := guest.NewStore(), guest.NewStore()
	for _, req := range []string{"PUT a 1", "GET a", "PUT", "GET b", "PUT b 2\n"} {
		got, err := applyLogged(store, nil, req)
		if w := want.Apply(req); err != nil || got != w {
			t.Errorf("applyLogged(%q) = %q, %v; want %q", req, got, err, w)
		}
	}
}
