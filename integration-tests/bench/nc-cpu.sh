#!/usr/bin/env bash
# CPU cost of a bulk transfer through the relay, per process:
#   bash integration-tests/bench/nc-cpu.sh BINDIR [MiB]
# BINDIR holds overlan and overlan-server (e.g. target/release). Starts a relay on
# loopback, sends MiB (default 1024) of zeros through `overlan nc` -> relay ->
# `overlan nc -l` (stdin and stdout pipes), and prints the throughput and the CPU seconds (user + system) of the
# relay, the sending nc and the receiving nc. Compare builds by alternating runs.
set -euo pipefail
bin=${1:?usage: nc-cpu.sh BINDIR [MiB]}
mib=${2:-1024}
command -v /usr/bin/time >/dev/null || { echo "needs /usr/bin/time (apt install time)" >&2; exit 1; }
work=$(mktemp -d)
relay_pid=""
nc_pid=""
cleanup() {
    [[ -n $nc_pid ]] && kill "$nc_pid" 2>/dev/null || true
    [[ -n $relay_pid ]] && kill "$relay_pid" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$bin/overlan-server" --listen 127.0.0.1:0 --data-dir "$work/data" --log warn >"$work/relay.out" 2>"$work/relay.err" &
relay_pid=$!
for _ in $(seq 100); do grep -q '^invite' "$work/relay.out" && break; sleep 0.1; done
OVERLAN_INVITE=$(awk '/^invite/ {print $2}' "$work/relay.out")
[[ -n $OVERLAN_INVITE ]] || { echo "the relay printed no invite" >&2; cat "$work/relay.err" >&2; exit 1; }
export OVERLAN_INVITE XDG_RUNTIME_DIR=$work/run
mkdir -p "$work/run"

# Output into a pipe, as `overlan nc -l PORT | consumer` and overlan-bench do.
/usr/bin/time -o "$work/b.time" -f "%U %S" "$bin/overlan" --identity "$work/idb" nc -l 7000 2>"$work/b.err" | cat >/dev/null &
nc_pid=$!
for _ in $(seq 100); do grep -q 'listening on' "$work/b.err" && break; sleep 0.1; done
vip=$(grep -o 'listening on [0-9.]*' "$work/b.err" | awk '{print $3}')
[[ -n $vip ]] || { echo "the listener did not start" >&2; cat "$work/b.err" >&2; exit 1; }

cpu() { awk '{print $14 + $15}' "/proc/$relay_pid/stat"; }
relay_before=$(cpu)
start=$(date +%s.%N)
head -c "${mib}M" /dev/zero | /usr/bin/time -o "$work/a.time" -f "%U %S" "$bin/overlan" --identity "$work/ida" nc "$vip" 7000 2>"$work/a.err"
wait "$nc_pid"
nc_pid=""
end=$(date +%s.%N)
relay_after=$(cpu)
ticks=$(getconf CLK_TCK)
python3 - "$mib" "$start" "$end" "$relay_before" "$relay_after" "$ticks" "$work/a.time" "$work/b.time" <<'PY'
import sys
mib, start, end, r0, r1, hz = (float(x) for x in sys.argv[1:7])
sender = sum(float(x) for x in open(sys.argv[7]).read().split()[-2:])
receiver = sum(float(x) for x in open(sys.argv[8]).read().split()[-2:])
print(f"{mib / (end - start):5.0f} MiB/s  relay {(r1 - r0) / hz:.2f} s  sender {sender:.2f} s  receiver {receiver:.2f} s")
PY
