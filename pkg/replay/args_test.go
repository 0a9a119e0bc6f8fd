package replay

import (
	"net"
	"slices"
	"strings"
	"testing"
)

// A plain VM (the bench's unprotected baseline) runs the recorder's machine:
// its command line is the recorder's without the record/replay option and
// the filter that logs the network input, and nothing else differs.
func TestPlainArgsAreTheRecordersWithoutReplay(t *testing.T) {
	m := Machine{Kernel: "/k", Initrd: "/i", Cmdline: "console=ttyS0 ftgw.ip=192.0.2.10/24", MAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}}
	record := Config{Machine: m, Mode: Record, Dir: "/d"}.Args()
	plain := Config{Machine: m, Mode: Plain, Dir: "/d"}.Args()

	icount := slices.Index(record, "-icount")
	if icount < 0 || record[icount+1] != "shift=5,sleep=on,rr=record,rrfile="+logPath {
		t.Fatalf("record's -icount: %v", record)
	}
	if i := slices.Index(plain, "-icount"); i < 0 || plain[i+1] != "shift=5,sleep=on" {
		t.Fatalf("plain's -icount: %v", plain)
	}
	filter := slices.Index(record, "filter-replay,id=replay0,netdev=net0")
	if filter < 1 || record[filter-1] != "-object" {
		t.Fatalf("record has no filter-replay: %v", record)
	}
	want := slices.Clone(record)
	want[icount+1] = "shift=5,sleep=on"
	want = slices.Delete(want, filter-1, filter+1)
	if !slices.Equal(plain, want) {
		t.Errorf("plain args\n%s\nwant\n%s", strings.Join(plain, " "), strings.Join(want, " "))
	}
	if slices.Contains(plain, "-S") || slices.ContainsFunc(plain, func(a string) bool { return strings.Contains(a, "rr=") }) {
		t.Errorf("plain args carry replay options: %v", plain)
	}
}

// A VM with a disk gets it through blkreplay in every mode, and one
// without a kernel boots from it.
func TestDiskArgs(t *testing.T) {
	m := Machine{Disk: true, MAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}}
	for _, mode := range []Mode{Record, Replay, Plain} {
		args := strings.Join(Config{Machine: m, Mode: mode, Dir: "/d", LogFIFO: "/d/fifo"}.Args(), " ")
		for _, want := range []string{
			"-drive if=none,id=disk0-file,format=qcow2,file=/d/disk.qcow2",
			"-drive driver=blkreplay,if=none,image=disk0-file,id=disk0",
			"-device virtio-blk-pci,drive=disk0,bootindex=0",
		} {
			if !strings.Contains(args, want) {
				t.Errorf("%s: no %q in %s", mode, want, args)
			}
		}
		if strings.Contains(args, "-kernel") || strings.Index(args, "id=vmstate") > strings.Index(args, "id=disk0-file") {
			t.Errorf("%s: a kernel, or the vm state image after the disk: %s", mode, args)
		}
	}
	m.Kernel, m.Cmdline = "/k", "ftgw.disk=/dev/vda"
	args := strings.Join(Config{Machine: m, Mode: Record, Dir: "/d"}.Args(), " ")
	if !strings.Contains(args, "-kernel /k -append ftgw.disk=/dev/vda") || strings.Contains(args, "bootindex") || strings.Contains(args, "-initrd") {
		t.Errorf("direct boot with a disk: %s", args)
	}
}
