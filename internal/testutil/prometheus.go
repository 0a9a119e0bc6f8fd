package testutil

import (
	"os"
	"os/exec"
	"testing"
)

// RequirePrometheus returns the paths of Debian's prometheus and promtool.
// Without them a test skips, except under CI (CI=true), where `make setup`
// has installed them and a missing one is a failure, not a skip.
func RequirePrometheus(tb testing.TB) (prometheus, promtool string) {
	tb.Helper()
	var missing []string
	paths := map[string]string{}
	for _, name := range []string{"prometheus", "promtool"} {
		p, err := exec.LookPath(name)
		if err != nil {
			missing = append(missing, name)
		}
		paths[name] = p
	}
	if len(missing) > 0 {
		if os.Getenv("CI") == "true" {
			tb.Fatalf("%v not installed under CI: `make setup` installs Debian's prometheus package", missing)
		}
		tb.Skipf("%v not installed (make setup installs Debian's prometheus package)", missing)
	}
	return paths["prometheus"], paths["promtool"]
}
