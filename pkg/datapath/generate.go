package datapath

//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -mcpu=v3" -target bpfel -type counter -type owner_record -type log_record -type hold_meta -type log_state -type latency_hist -type role gateway ../../bpf/gateway.c -- -I../../bpf/include -I../../bpf -I/usr/include/x86_64-linux-gnu
