#!/usr/bin/env bash
# The unmodified-programs benchmark (issue 9): three hosts made of network namespaces
# on veth links with MTU 1500 — a client host A, a relay host R, a server host B — and
# in one run, the same programs over four paths from A to B:
#
#   direct    A -> R (kernel forwarding) -> B: the plain routed path
#   socat     A -> socat on R -> B: an unencrypted user-space TCP relay, the ceiling
#             for a relayed path
#   tun       A (overlan tun) -> overlan-server on R -> B (overlan tun): TUN mode
#   forward   A (overlan forward) -> overlan-server on R -> B (overlan expose)
#
# iperf3 TCP throughput (median of ROUNDS runs of SECS seconds), sockperf 64-byte TCP
# request/response round trip (median), and ping (average of 20). Ratios are against
# the socat path measured in the same run. Needs root, iproute2, iperf3, sockperf,
# socat, ping, and release binaries (`cargo build --release --bins`).
#
#   bash integration-tests/bench/tun-bench.sh [ROUNDS] [SECS]
set -euo pipefail
cd "$(dirname "$0")/../.."

ROUNDS=${1:-3}
SECS=${2:-4}
BIN=${BIN:-target/release}
for tool in ip iperf3 sockperf socat ping python3; do
    command -v "$tool" >/dev/null || { echo "tun-bench: $tool is needed" >&2; exit 2; }
done
[ -x "$BIN/overlan" ] && [ -x "$BIN/overlan-server" ] || { echo "tun-bench: build first: cargo build --release --bins" >&2; exit 2; }

TAG="tb$$"
A="${TAG}a" R="${TAG}r" B="${TAG}b"
WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    # overlan tun removes its interface on the way out: give each a moment to.
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    done
    # Whatever still runs in a namespace (a forked socat, a stuck process) goes too.
    for ns in "$A" "$R" "$B"; do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

ip netns add "$A"; ip netns add "$R"; ip netns add "$B"
ip link add ra netns "$R" type veth peer name ar netns "$A"
ip link add rb netns "$R" type veth peer name br netns "$B"
ip -n "$R" addr add 10.240.1.1/24 dev ra; ip -n "$A" addr add 10.240.1.2/24 dev ar
ip -n "$R" addr add 10.240.2.1/24 dev rb; ip -n "$B" addr add 10.240.2.2/24 dev br
for pair in "$R ra" "$A ar" "$R rb" "$B br"; do
    set -- $pair
    ip -n "$1" link set dev "$2" mtu 1500 up
done
for ns in "$A" "$R" "$B"; do ip -n "$ns" link set lo up; done
ip -n "$A" route add default via 10.240.1.1
ip -n "$B" route add default via 10.240.2.1
ip netns exec "$R" sysctl -qw net.ipv4.ip_forward=1

bg() { # NS CMD... : run in the background in NS, remembered for cleanup
    local ns=$1; shift
    ip netns exec "$ns" "$@" >"$WORK/bg.$#.$RANDOM.log" 2>&1 &
    PIDS+=($!)
}

# Servers on B, and the socat relay on R.
bg "$B" iperf3 -s -p 5201
bg "$B" sockperf server --tcp -i 0.0.0.0 -p 11111
bg "$R" socat TCP-LISTEN:6201,fork,reuseaddr TCP:10.240.2.2:5201
bg "$R" socat TCP-LISTEN:6111,fork,reuseaddr,nodelay TCP:10.240.2.2:11111,nodelay

# The overlay: a relay on R, TUN on A and B, an expose on B and a forward on A.
ip netns exec "$R" "$BIN/overlan-server" --listen 0.0.0.0:7700 --data-dir "$WORK/relay" --log warn ${RELAY_ARGS:-} >"$WORK/relay.out" 2>"$WORK/relay.err" &
PIDS+=($!)
for _ in $(seq 50); do grep -q '^invite ' "$WORK/relay.out" 2>/dev/null && break; sleep 0.1; done
INVITE=$(sed -n 's/^invite //p' "$WORK/relay.out")
client() { # NS RELAY_IP ARGS... (run with &: exec, so $! is overlan itself)
    local ns=$1 relay=$2; shift 2
    exec ip netns exec "$ns" env OVERLAN_INVITE="$INVITE" XDG_RUNTIME_DIR="$WORK/run-$ns" \
        "$BIN/overlan" --relay "$relay:7700" --identity "$WORK/$ns.pem" "$@"
}
client "$A" 10.240.1.1 tun >"$WORK/tun-a.out" 2>&1 &
PIDS+=($!)
client "$B" 10.240.2.1 tun >"$WORK/tun-b.out" 2>&1 &
PIDS+=($!)
client "$B" 10.240.2.1 --name svc expose 5201 127.0.0.1:5201 >"$WORK/expose.out" 2>&1 &
PIDS+=($!)
client "$B" 10.240.2.1 --name svc2 expose 11111 127.0.0.1:11111 >"$WORK/expose2.out" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do
    grep -q '^vip ' "$WORK/tun-b.out" 2>/dev/null && grep -q '^expose' "$WORK/expose2.out" 2>/dev/null && break
    sleep 0.1
done
VIP_B=$(sed -n 's/^vip //p' "$WORK/tun-b.out")
client "$A" 10.240.1.1 --name fwd forward 127.0.0.1:7201 svc:5201 >"$WORK/forward.out" 2>&1 &
PIDS+=($!)
client "$A" 10.240.1.1 --name fwd2 forward 127.0.0.1:7111 svc2:11111 >"$WORK/forward2.out" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do grep -q '^forward' "$WORK/forward2.out" 2>/dev/null && grep -q '^vip ' "$WORK/tun-a.out" && break; sleep 0.1; done
ip netns exec "$A" ping -c 3 -i 0.2 -w 10 "$VIP_B" >/dev/null || { echo "tun-bench: the overlay does not answer" >&2; exit 1; }

# path name, iperf3 host:port, sockperf host:port, ping target
PATHS=(
    "direct 10.240.2.2:5201 10.240.2.2:11111 10.240.2.2"
    "socat 10.240.1.1:6201 10.240.1.1:6111 -"
    "tun $VIP_B:5201 $VIP_B:11111 $VIP_B"
    "forward 127.0.0.1:7201 127.0.0.1:7111 -"
)

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

declare -A TPUT RTT PING
for round in $(seq "$ROUNDS"); do
    for entry in "${PATHS[@]}"; do
        set -- $entry
        name=$1 iperf=$2
        mbps=$(ip netns exec "$A" iperf3 -c "${iperf%:*}" -p "${iperf##*:}" -t "$SECS" -J \
            | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e6)')
        echo "$mbps" >>"$WORK/tput.$name"
    done
done
for entry in "${PATHS[@]}"; do
    set -- $entry
    name=$1 rr=$3 target=$4
    TPUT[$name]=$(median <"$WORK/tput.$name")
    # sockperf prints percentiles in usec; take the median round trip (it reports half
    # a round trip as latency: doubled here).
    p50=$(ip netns exec "$A" sockperf ping-pong --tcp -i "${rr%:*}" -p "${rr##*:}" -m 64 -t "$SECS" 2>&1 \
        | sed -n 's/.*<MAX> observation.*//; s/.*percentile 50.000 = *\([0-9.]*\).*/\1/p' | head -1)
    RTT[$name]=$(python3 -c "print(2*float('$p50'))")
    if [ "$target" != "-" ]; then
        PING[$name]=$(ip netns exec "$A" ping -c 20 -i 0.2 -q "$target" | sed -n 's#.*= [0-9.]*/\([0-9.]*\)/.*#\1#p')
    else
        PING[$name]="-"
    fi
done

echo "unmodified programs over veth (MTU 1500), A -> B; iperf3 TCP median of $ROUNDS x ${SECS}s; sockperf 64-byte TCP round trip p50; ping avg of 20"
printf "%-8s %12s %10s %14s %10s %10s\n" path "iperf3 Mb/s" "x socat" "64B RTT p50 us" "x socat" "ping ms"
for name in direct socat tun forward; do
    printf "%-8s %12.0f %10.2f %14.1f %10.2f %10s\n" "$name" "${TPUT[$name]}" \
        "$(python3 -c "print(${TPUT[$name]}/${TPUT[socat]})")" "${RTT[$name]}" \
        "$(python3 -c "print(${RTT[$name]}/${RTT[socat]})")" "${PING[$name]}"
done
tun_ratio=$(python3 -c "print(${TPUT[tun]}/${TPUT[socat]})")
rtt_ratio=$(python3 -c "print(${RTT[tun]}/${RTT[socat]})")
echo "targets: TUN iperf3 >= 0.5x socat: $(python3 -c "print('met' if $tun_ratio >= 0.5 else 'NOT met')") ($tun_ratio); TUN round trip <= 2x socat: $(python3 -c "print('met' if $rtt_ratio <= 2 else 'NOT met')") ($rtt_ratio)"
