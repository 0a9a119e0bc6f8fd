package lab

import (
	"cmp"
	"fmt"
	"slices"
	"time"
)

// Anomalies explains, in at most limit lines, reads that no
// linearization can hold: a read of a value never written, a read from
// the future, a key read as never written after an acknowledged write, or
// a read of a value overwritten before the read began. Porcupine says
// whether a key's history is linearizable; these say where to look.
func Anomalies(ops []Op, limit int) []string {
	byKey := map[string][]Op{}
	for _, op := range ops {
		byKey[op.Key] = append(byKey[op.Key], op)
	}
	keys := make([]string, 0, len(byKey))
	for k := range byKey {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var out []string
	for _, k := range keys {
		out = append(out, keyAnomalies(byKey[k])...)
		if len(out) >= limit {
			return out[:limit]
		}
	}
	return out
}

func keyAnomalies(ops []Op) []string {
	writes := map[string]Op{}
	var acked []Op // acknowledged PUTs, by return
	for _, op := range ops {
		if op.Kind != OpPut {
			continue
		}
		writes[op.Value] = op
		if op.Outcome == OutcomeOK {
			acked = append(acked, op)
		}
	}
	slices.SortFunc(acked, func(a, b Op) int { return a.Return.Compare(b.Return) })
	// latest[i]: of acked[:i+1], the PUT that began last. Any PUT that
	// returned before it began was overwritten before the next read.
	latest := make([]Op, len(acked))
	for i, p := range acked {
		latest[i] = p
		if i > 0 && latest[i-1].Invoke.After(p.Invoke) {
			latest[i] = latest[i-1]
		}
	}
	at := func(t time.Time) string { return t.Format("15:04:05.000000") }
	var out []string
	for _, g := range ops {
		if g.Kind != OpGet || g.Outcome != OutcomeOK {
			continue
		}
		// The acknowledged PUTs that returned before the read began.
		n, _ := slices.BinarySearchFunc(acked, g.Invoke, func(p Op, t time.Time) int { return cmp.Compare(p.Return.UnixNano(), t.UnixNano()) })
		var before *Op
		if n > 0 {
			before = &latest[n-1]
		}
		w, written := writes[g.Value]
		switch {
		case !g.Found && before != nil:
			out = append(out, fmt.Sprintf("%s at %s read nothing, after %s returned at %s", g, at(g.Invoke), *before, at(before.Return)))
		case g.Found && !written:
			out = append(out, fmt.Sprintf("%s at %s read a value nobody wrote", g, at(g.Invoke)))
		case g.Found && w.Invoke.After(g.Return):
			out = append(out, fmt.Sprintf("%s at %s read %s, sent only at %s", g, at(g.Invoke), w, at(w.Invoke)))
		case g.Found && w.Outcome == OutcomeOK && before != nil && w.Return.Before(before.Invoke):
			out = append(out, fmt.Sprintf("%s at %s read a value overwritten before: %s returned at %s, then %s ran %s-%s",
				g, at(g.Invoke), w, at(w.Return), *before, at(before.Invoke), at(before.Return)))
		}
	}
	return out
}
