package guest

import (
	"bytes"
	"reflect"
	"testing"
)

func FuzzHandleFrame(f *testing.F) {
	f.Add(arpRequestFrame())
	f.Add(pingFrame(1, 1, "ping"))
	f.Add(kvFrame("PUT a hello world"))
	f.Add(kvFrame("GET a"))
	f.Add(kvFrame("GET missing\n"))
	f.Add(append(kvFrame("PUT b 2"), make([]byte, 16)...))
	f.Add(editIP(kvFrame("PUT c 3"), func(ip []byte) { ip[0] = 0x46 }))
	f.Add([]byte{})

	f.Fuzz(func(t *testing.T, frame []byte) {
		orig := bytes.Clone(frame)
		a, b := newTestGuest(), newTestGuest()
		for _, g := range []*Guest{a, b} { // some state for GETs to find
			g.HandleFrame(kvFrame("PUT a 1"))
		}
		ra, rb := a.HandleFrame(frame), b.HandleFrame(frame)
		if !bytes.Equal(frame, orig) {
			t.Fatal("HandleFrame modified its input")
		}
		if !reflect.DeepEqual(ra, rb) {
			t.Fatalf("outputs differ:\n%x\n%x", ra, rb)
		}
		if sa, sb := a.State(), b.State(); !reflect.DeepEqual(sa, sb) {
			t.Fatalf("states differ:\n%+v\n%+v", sa, sb)
		}
		st := a.State()
		if st.Frames != 2 || st.Replies+st.Ignored != 2 || (len(ra) == 0) != (st.Ignored == 1) {
			t.Fatalf("counters inconsistent with %d replies: %+v", len(ra), st)
		}
		for _, r := range ra {
			// Whatever the input, the guest only speaks as itself.
			if len(r) < 42 || !bytes.Equal(r[6:12], guestMAC) || r[0]&1 != 0 {
				t.Fatalf("bad reply %x", r)
			}
		}
	})
}
