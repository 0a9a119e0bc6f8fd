package goqemu

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/digitalocean/go-qemu/qmp/raw"

	"github.com/ftgw/ftgw/pkg/replay"
)

// fakeQEMU answers QMP on a unix socket the way QEMU does: a greeting,
// qmp_capabilities, query-status, a query-commands reply well over 64 KiB,
// and an event after query-status.
func fakeQEMU(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "qmp.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var commands []string
	for i := range 3000 {
		commands = append(commands, fmt.Sprintf(`{"name":"x-a-rather-long-command-name-%04d"}`, i))
	}
	long := `{"return":[` + strings.Join(commands, ",") + `]}`
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		fmt.Fprintln(c, `{"QMP":{"version":{"qemu":{"micro":0,"minor":2,"major":7}},"capabilities":[]}}`)
		dec := json.NewDecoder(bufio.NewReader(c))
		for {
			var cmd struct {
				Execute string `json:"execute"`
			}
			if err := dec.Decode(&cmd); err != nil {
				return
			}
			switch cmd.Execute {
			case "query-status":
				fmt.Fprintln(c, `{"return":{"status":"running","singlestep":false,"running":true}}`)
				fmt.Fprintln(c, `{"event":"RESUME","data":{},"timestamp":{"seconds":1,"microseconds":2}}`)
			case "query-commands":
				fmt.Fprintln(c, long)
			default:
				fmt.Fprintln(c, `{"return":{}}`)
			}
		}
	}()
	return path
}

// go-qemu's generated commands and its event type, over ftgw's client,
// including a reply go-qemu's own monitor could not read.
func TestGoQEMUCommandsRunOverFtgwsClient(t *testing.T) {
	sm, err := replay.NewSocketMonitor("unix", fakeQEMU(t), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	mon := Monitor{sm}
	if err := mon.Connect(); err != nil {
		t.Fatal(err)
	}
	defer mon.Disconnect()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events, err := mon.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}

	typed := raw.NewMonitor(mon)
	status, err := typed.QueryStatus()
	if err != nil {
		t.Fatal(err)
	}
	if !status.Running || status.Status != raw.RunStateRunning {
		t.Errorf("query-status: %+v", status)
	}
	select {
	case e := <-events:
		if e.Event != "RESUME" || e.Timestamp.Microseconds != 2 {
			t.Errorf("event %+v", e)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no event")
	}
	cmds, err := typed.QueryCommands()
	if err != nil {
		t.Fatalf("a reply over 64 KiB: %v", err)
	}
	if len(cmds) != 3000 || cmds[2999].Name != "x-a-rather-long-command-name-2999" {
		t.Errorf("query-commands: %d commands", len(cmds))
	}
}
