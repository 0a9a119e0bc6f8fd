# ftgw: see README.md. Everything here runs as root (BPF, namespaces).

GO ?= go
FTGW := bin/ftgw
GENERATED := pkg/datapath/gateway_bpfel.go pkg/datapath/gateway_bpfel.o deploy/grafana/ftgw-dashboard.json

.PHONY: all setup build install guest generate dashboard check-generated vet test demo lab-down clean

all: build

setup:
	./scripts/setup.sh

# ftgw and, beside it, the library the recording QEMU runs with (preload/).
build:
	$(GO) build -buildvcs=auto -o $(FTGW) ./cmd/ftgw
	$(CC) -O2 -Wall -Wextra -shared -fPIC -o bin/ftgw-rr.so preload/ftgw-rr.c -ldl

# The daemon, its systemd unit and an example config (never over a config
# already there). DESTDIR stages the tree for a package.
PREFIX ?= /usr/local
install: build
	install -D -m 0755 $(FTGW) $(DESTDIR)$(PREFIX)/bin/ftgw
	install -D -m 0755 bin/ftgw-rr.so $(DESTDIR)$(PREFIX)/bin/ftgw-rr.so
	install -d $(DESTDIR)/etc/systemd/system
	sed 's#/usr/local#$(PREFIX)#g' deploy/ftgw.service > $(DESTDIR)/etc/systemd/system/ftgw.service
	chmod 0644 $(DESTDIR)/etc/systemd/system/ftgw.service
	install -D -m 0644 deploy/ftgw.yaml $(DESTDIR)/etc/ftgw/ftgw.yaml.example
	install -D -m 0644 README.md $(DESTDIR)$(PREFIX)/share/doc/ftgw/README.md
	@echo "installed; next: cp /etc/ftgw/ftgw.yaml.example /etc/ftgw/ftgw.yaml, edit it, systemctl enable --now ftgw"

# The Linux guest image: Debian's cloud kernel and an initramfs whose /init is
# cmd/ftgw-init, in build/guest/. Up-to-date steps are skipped.
guest:
	./scripts/build-guest.sh

# Rebuilds the BPF objects with clang through bpf2go; they are committed so
# that `go build` needs no clang.
generate:
	$(GO) generate ./...

# The Grafana dashboard, from deploy/grafana/dashboard.go (make generate
# rebuilds it too).
dashboard:
	$(GO) generate ./deploy/grafana

# Fails if the committed BPF objects or dashboard differ from what the
# sources build.
check-generated: generate
	@git diff --exit-code -- $(GENERATED) || \
		{ echo "generated files are stale: run 'make generate' and commit them" >&2; exit 1; }

vet:
	$(GO) vet ./...
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed" >&2; exit 1; }

# Every test: unit, BPF (prog.Run) and end-to-end across namespaces. The
# end-to-end tests share the lab's fixed names, so packages run one at a time;
# test/ alone runs longer than go test's default bound of 10 minutes.
test: setup check-generated vet guest
	$(GO) test -p 1 -count=1 -timeout 60m ./...

# The two-host lab with traffic, then its commit latency and state.
demo: setup build
	-$(FTGW) lab down 2>/dev/null
	$(FTGW) lab up
	$(FTGW) lab traffic --requests 2000
	$(FTGW) lab status

lab-down: build
	$(FTGW) lab down

clean:
	rm -rf bin
