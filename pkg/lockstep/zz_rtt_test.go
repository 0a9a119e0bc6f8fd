package lockstep

import (
	"testing"
	"time"
)

func TestRTTDebug(t *testing.T) {
	pki := newPKI(t)
	s := startSecondary(t, pki, SecondaryConfig{})
	p := newTestPrimary(t, pki, s.Addr().String(), PrimaryConfig{})
	run(t, p.Run)
	for i := 0; i < 20; i++ {
		time.Sleep(7 * time.Millisecond)
		t.Logf("p %v s %v", p.RTT(), s.RTT())
	}
}
