#!/bin/sh
# Installs what building, regenerating and testing ftgw need on Debian, if it
# is missing. Go itself must be on PATH (>= the version in go.mod).
set -eu

packages="clang llvm libbpf-dev iproute2 ethtool iputils-ping etcd-server gcc qemu-system-x86 qemu-utils nftables prometheus"
missing=""
for p in $packages; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
	echo "setup: installing$missing"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
	# Tests run prometheus and promtool themselves, in the lab's namespaces:
	# the server the package starts on the host (and the node exporter it
	# recommends) has no place on a test machine.
	case " $missing " in
	*" prometheus "*)
		for unit in prometheus prometheus-node-exporter; do
			systemctl disable --now "$unit" >/dev/null 2>&1 || true
		done
		;;
	esac
fi
command -v go >/dev/null || { echo "setup: go is not on PATH" >&2; exit 1; }
