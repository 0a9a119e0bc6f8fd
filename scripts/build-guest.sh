#!/bin/sh
# Builds the Linux guest image: Debian's cloud kernel and an initramfs whose
# /init is cmd/ftgw-init, with the virtio-net and virtio-blk drivers and
# nothing else, and the disk the guest keeps its key-value log on.
#
#	build/guest/vmlinuz      the kernel
#	build/guest/initrd.img   newc cpio, gzip
#	build/guest/disk.qcow2   the disk: partition 1 boots the guest from
#	                         firmware, partition 2 is an empty key-value log
#	                         for ftgw.disk=/dev/vda2 (see step 5)
#
# Needs Go on PATH and apt; installs what else it needs (cpio, kmod, ...).
# Each step is skipped when its output is newer than its input, so a second
# run downloads nothing and rebuilds nothing. Run as root (apt).
set -eu

cd "$(dirname "$0")/.."
out=build/guest
cache=$out/cache      # the kernel package, kept across runs
modules=$out/modules  # the driver modules and their load order, from it
mkdir -p "$cache"

say() { echo "guest: $*"; }

# need <command> <package>: installs package if command is missing.
need() {
	command -v "$1" >/dev/null && return
	say "installing $2"
	[ -n "${apt_updated:-}" ] || { apt-get update -qq; apt_updated=1; }
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
}

command -v go >/dev/null || { echo "guest: go is not on PATH" >&2; exit 1; }
need cpio cpio
need gzip gzip
need depmod kmod
need qemu-img qemu-utils
need sfdisk fdisk
need mkfs.fat dosfstools
need mcopy mtools
need syslinux syslinux # and syslinux-common, with the MBR's code
command -v qemu-system-x86_64 >/dev/null ||
	say "note: qemu-system-x86_64 is missing (apt-get install qemu-system-x86); it runs the image, not builds it"

# 1. The kernel package: whatever linux-image-cloud-amd64 depends on today,
# at the version it asks for ("(= <version>)", else the candidate).
meta=linux-image-cloud-amd64
resolve() {
	apt-cache show --no-all-versions "$meta" 2>/dev/null | sed -n 's/^Depends: //p' | tr ',' '\n' |
		grep -o 'linux-image-[0-9][^ ]*-cloud-amd64\( (= [^)]*)\)\?' | head -n 1
}
dep=$(resolve)
if [ -z "$dep" ]; then
	# A fresh machine has no package lists yet.
	apt-get update -qq
	apt_updated=1
	dep=$(resolve)
fi
[ -n "$dep" ] || { echo "guest: cannot resolve $meta with apt-cache" >&2; exit 1; }
pkg=${dep%% *}
version=$(echo "$dep" | sed -n 's/.*(= \(.*\))$/\1/p')
[ -n "$version" ] ||
	version=$(apt-cache show --no-all-versions "$pkg" | sed -n 's/^Version: //p' | head -n 1)
# apt-get download names files <name>_<version>_<arch>.deb, ':' as %3a.
deb=$cache/${pkg}_$(echo "$version" | sed 's/:/%3a/')_amd64.deb
if [ -f "$deb" ]; then
	say "kernel $pkg $version (cached)"
else
	say "downloading $pkg $version"
	rm -f "$cache"/*.deb
	# apt-get download writes to the current directory; in a subshell, and
	# as root it warns that _apt cannot write there, harmlessly.
	(cd "$cache" && apt-get download -qq "$pkg=$version" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
	[ -f "$deb" ] || { echo "guest: download of $pkg failed" >&2; exit 1; }
fi

# 2. vmlinuz and the driver modules, from the package: virtio-net's, always
# loaded, in load-order; virtio-blk's, loaded only for ftgw.disk, in
# load-order-disk.
if [ ! -f $out/vmlinuz ] || [ ! -f $modules/load-order ] || [ ! -f $modules/load-order-disk ] ||
	[ "$deb" -nt $out/vmlinuz ] || [ "$deb" -nt $modules/load-order ] ||
	[ scripts/build-guest.sh -nt $modules/load-order ]; then
	say "extracting the kernel and the virtio-net and virtio-blk modules"
	tmp=$(mktemp -d)
	trap 'rm -rf "$tmp"' EXIT
	dpkg-deb -x "$deb" "$tmp"
	kver=$(ls "$tmp/lib/modules")
	# The drivers and their PCI transport: which are modules depends on the
	# kernel's configuration (in this one, CONFIG_VIRTIO_PCI=m,
	# CONFIG_VIRTIO_NET=m and CONFIG_VIRTIO_BLK=m); built-in ones need
	# nothing.
	for opt in CONFIG_VIRTIO_PCI CONFIG_VIRTIO_NET CONFIG_VIRTIO_BLK; do
		say "  $(grep "^$opt=" "$tmp/boot/config-$kver" || echo "$opt is not set")"
	done
	# The package has no modules.dep (its postinst runs depmod); make one,
	# then let modprobe list the modules in load order, dependencies first.
	depmod -b "$tmp" "$kver"
	rm -rf $modules && mkdir -p $modules
	# extract <load order file> <module>...: copies the modules and those
	# they depend on to $modules and lists their file names, in load order,
	# in the file. Each list is whole: the disk's repeats the virtio core
	# the net's has, which /init then finds loaded already.
	extract() {
		listname=$1 list=$modules/$1
		shift
		# -C /dev/null: this machine's modprobe.d has no say in the guest.
		modprobe -C /dev/null -d "$tmp" -S "$kver" --show-depends -a "$@" |
			while read -r kind path _; do
				[ "$kind" = insmod ] || continue # "builtin <name>": nothing to load
				name=$(basename "$path")
				# Compressed modules are unpacked here, so that /init can hand
				# them to finit_module as they are.
				case $name in
				*.ko.xz) need xz xz-utils; xz -dc "$path" >"$modules/${name%.xz}"; name=${name%.xz} ;;
				*.ko.zst) need zstd zstd; zstd -qdc "$path" >"$modules/${name%.zst}"; name=${name%.zst} ;;
				*.ko.gz) gzip -dc "$path" >"$modules/${name%.gz}"; name=${name%.gz} ;;
				*) cp "$path" "$modules/$name" ;;
				esac
				# A module listed twice (a shared dependency) loads once.
				grep -qx "$name" "$list.tmp" 2>/dev/null || echo "$name" >>"$list.tmp"
			done
		# An empty list (every driver built in) is still a list.
		touch "$list.tmp"
		mv "$list.tmp" "$list"
		say "  $listname: $(tr '\n' ' ' <"$list")"
	}
	extract load-order-disk virtio_pci virtio_blk
	# Last: its time is what the check above compares.
	extract load-order virtio_pci virtio_net
	cp "$tmp/boot/vmlinuz-$kver" $out/vmlinuz
	echo "$pkg $version" >$out/kernel-version
	rm -rf "$tmp"
	trap - EXIT
fi

# 3. /init. Always handed to go build, whose cache makes that cheap and
# which alone knows its inputs; the result replaces the old binary only if
# it differs (the build is reproducible: -trimpath, no VCS stamp), so that an
# unchanged /init does not rebuild the initramfs.
CGO_ENABLED=0 GOOS=linux GOARCH=amd64 go build -trimpath -buildvcs=false -ldflags='-s -w' \
	-o $out/init.new ./cmd/ftgw-init
if [ -f $out/init ] && cmp -s $out/init.new $out/init; then
	rm $out/init.new
else
	say "built /init"
	mv $out/init.new $out/init
fi

# 4. The initramfs: /init, the modules and their load order, mount points.
if [ ! -f $out/initrd.img ] || [ $out/init -nt $out/initrd.img ] ||
	[ $modules/load-order -nt $out/initrd.img ] || [ scripts/build-guest.sh -nt $out/initrd.img ]; then
	say "packing initrd.img"
	root=$(mktemp -d)
	trap 'rm -rf "$root"' EXIT
	mkdir -p "$root/dev" "$root/proc" "$root/sys" "$root/lib/modules"
	cp $out/init "$root/init"
	cp $modules/* "$root/lib/modules/"
	# Fixed owners, modes and times, and gzip without a name or a date: the
	# same inputs give the same image, byte for byte.
	chmod -R u=rwX,go=rX "$root"
	chmod 755 "$root/init"
	find "$root" -exec touch -h -d @0 {} +
	(cd "$root" && find . -mindepth 1 | LC_ALL=C sort |
		cpio --quiet -o -H newc -R 0:0 --reproducible) | gzip -9 -n >$out/initrd.img.new
	mv $out/initrd.img.new $out/initrd.img
	rm -rf "$root"
	trap - EXIT
fi

# 5. disk.qcow2, the guest's disk, 64 MiB, MBR-partitioned:
#
#	partition 1, 1-33 MiB, FAT16, bootable: syslinux, vmlinuz, initrd.img
#	             and syslinux.cfg, so that firmware (SeaBIOS) boots the
#	             guest without -kernel
#	partition 2, 33-64 MiB, zeros: the key-value log, ftgw.disk=/dev/vda2
#
# The log is on the disk either way the guest boots: the kernel's own
# partition scan finds /dev/vda2 after a -kernel boot too. A template: each
# VM gets a copy of its own. Firmware boots the guest at 192.0.2.10/24.
# vmlinuz and initrd.img go in as they are, so the disk follows them; like
# them it is the same, byte for byte, from the same inputs.
if [ ! -f $out/disk.qcow2 ] || [ $out/vmlinuz -nt $out/disk.qcow2 ] ||
	[ $out/initrd.img -nt $out/disk.qcow2 ] || [ scripts/build-guest.sh -nt $out/disk.qcow2 ]; then
	say "building disk.qcow2"
	tmp=$(mktemp -d)
	trap 'rm -rf "$tmp"' EXIT
	# Sectors of 512 bytes.
	boot_start=2048 boot_size=65536
	truncate -s 64M "$tmp/disk.raw"
	printf 'label: dos\nlabel-id: 0x66746777\nstart=%d, size=%d, type=e, bootable\nstart=%d, type=da\n' \
		$boot_start $boot_size $((boot_start + boot_size)) | sfdisk -q "$tmp/disk.raw"
	# The MBR's boot code (440 bytes, up to the partition table) chains to
	# the bootable partition's boot sector, which syslinux writes.
	dd if=/usr/lib/syslinux/mbr/mbr.bin of="$tmp/disk.raw" bs=440 count=1 conv=notrunc status=none
	# The FAT is made apart and copied in; -h: its boot sector must know
	# where on the disk it starts. --invariant: no random volume id.
	mkfs.fat -C -F 16 -n FTGWBOOT -h $boot_start --invariant "$tmp/boot.fat" $((boot_size / 2)) >/dev/null
	# mtools (under syslinux too) dates files from SOURCE_DATE_EPOCH: FAT's
	# first day, so that the same inputs give the same disk.
	export SOURCE_DATE_EPOCH=315532800
	syslinux --install "$tmp/boot.fat"
	cat >"$tmp/syslinux.cfg" <<-EOF
		DEFAULT ftgw
		PROMPT 0
		TIMEOUT 0
		LABEL ftgw
		  KERNEL vmlinuz
		  INITRD initrd.img
		  APPEND console=ttyS0 quiet nohz=off panic=-1 ftgw.ip=192.0.2.10/24 ftgw.disk=/dev/vda2
	EOF
	mcopy -i "$tmp/boot.fat" $out/vmlinuz $out/initrd.img "$tmp/syslinux.cfg" ::/
	unset SOURCE_DATE_EPOCH
	dd if="$tmp/boot.fat" of="$tmp/disk.raw" bs=512 seek=$boot_start conv=notrunc status=none
	qemu-img convert -f raw -O qcow2 "$tmp/disk.raw" $out/disk.qcow2.new
	mv $out/disk.qcow2.new $out/disk.qcow2
	rm -rf "$tmp"
	trap - EXIT
fi

say "$(cat $out/kernel-version): $out/vmlinuz $(du -k $out/vmlinuz | cut -f1) KiB, $out/initrd.img $(du -k $out/initrd.img | cut -f1) KiB, $out/disk.qcow2"
