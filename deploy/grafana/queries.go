package grafana

import (
	"encoding/json"
	"fmt"
)

// Target is one PromQL query of a panel of a dashboard's JSON.
type Target struct {
	Panel string
	Expr  string
}

// Variable is one template variable of a dashboard's JSON and the query
// that lists its values (label_values(...) for Prometheus).
type Variable struct {
	Name, Type, Query string
}

type panelJSON struct {
	Title   string      `json:"title"`
	Panels  []panelJSON `json:"panels"` // a row's, when collapsed
	Targets []struct {
		Expr string `json:"expr"`
	} `json:"targets"`
}

type dashboardJSON struct {
	Panels     []panelJSON `json:"panels"`
	Templating struct {
		List []struct {
			Name  string          `json:"name"`
			Type  string          `json:"type"`
			Query json.RawMessage `json:"query"`
		} `json:"list"`
	} `json:"templating"`
}

// Parse reads the queries and variables of a dashboard as Grafana stores it,
// whoever wrote it: the tests read the committed file, not the generator.
func Parse(raw []byte) ([]Target, []Variable, error) {
	var d dashboardJSON
	if err := json.Unmarshal(raw, &d); err != nil {
		return nil, nil, fmt.Errorf("parse dashboard: %w", err)
	}
	var targets []Target
	var walk func([]panelJSON)
	walk = func(panels []panelJSON) {
		for _, p := range panels {
			for _, t := range p.Targets {
				targets = append(targets, Target{Panel: p.Title, Expr: t.Expr})
			}
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	var vars []Variable
	for _, v := range d.Templating.List {
		var q string
		// A datasource variable's query is its plugin type; a query
		// variable's may also be an object, which ftgw's never is.
		if err := json.Unmarshal(v.Query, &q); err != nil {
			return nil, nil, fmt.Errorf("variable %s: query %s: %w", v.Name, v.Query, err)
		}
		vars = append(vars, Variable{Name: v.Name, Type: v.Type, Query: q})
	}
	return targets, vars, nil
}
