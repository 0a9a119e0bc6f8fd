package guest

import "testing"

func TestStoreApply(t *testing.T) {
	var s Store // the zero value is usable, as cmd/ftgw-init relies on
	steps := []struct{ req, want string }{
		{"GET a", "NOTFOUND a"},
		{"PUT a 1", "OK 1 a"},
		{"PUT b two words\n", "OK 2 b"},
		{"GET b\r\n", "VALUE b two words"},
		{"PUT a", "ERR usage: PUT <key> <value>"},
		{"GET a b", "ERR usage: GET <key>"},
		{"", "ERR empty request"},
		{"PUT a \xff", "ERR request is not UTF-8"},
		{"put a 2", "ERR unknown command"},
		{"PUT a 3", "OK 3 a"},
		{"GET a", "VALUE a 3"},
	}
	for _, st := range steps {
		if got := s.Apply(st.req); got != st.want {
			t.Errorf("Apply(%q) = %q, want %q", st.req, got, st.want)
		}
	}
	if s.Puts() != 3 {
		t.Errorf("Puts = %d, want 3", s.Puts())
	}
	if want := digest(3, map[string]string{"a": "3", "b": "two words"}); s.Digest() != want {
		t.Errorf("Digest = %s, want %s", s.Digest(), want)
	}
	if NewStore().Digest() != (&Store{}).Digest() {
		t.Errorf("empty stores differ")
	}
}
