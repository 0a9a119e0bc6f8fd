#!/bin/sh
# Refreshes the vendored libbpf headers from Debian's libbpf-dev, the version
# the committed objects were built against. Run from anywhere.
set -eu
here=$(dirname "$0")
for h in bpf_helpers.h bpf_helper_defs.h bpf_endian.h; do
	cp "/usr/include/bpf/$h" "$here/$h"
done
dpkg-query -W -f='libbpf-dev ${Version}\n' libbpf-dev >"$here/VERSION"
