//go:build ignore

// Writes ftgw-dashboard.json: go generate ./deploy/grafana
package main

import (
	"log"
	"os"

	"github.com/ftgw/ftgw/deploy/grafana"
)

func main() {
	raw, err := grafana.JSON()
	if err != nil {
		log.Fatal(err)
	}
	if err := os.WriteFile("ftgw-dashboard.json", raw, 0o644); err != nil {
		log.Fatal(err)
	}
}
