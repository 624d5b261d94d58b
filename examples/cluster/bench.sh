#!/usr/bin/env bash
# Interleaved wrk runs of `cluster --workers 2` (both runtime flavours; `cluster-0` is the
# single process of `--workers 0`, same runtime shape as the baseline) against a bare hyper
# hello world, GET /, 64 keep-alive connections. Prints req/s and server CPU per request
# (utime+stime of the server's processes, supervisor included, divided by requests served).
#
#   examples/cluster/bench.sh [ROUNDS=5] [SECONDS=10]
#   VARIANTS="cluster-ct bare" examples/cluster/bench.sh 10 8
#
# Needs wrk and a release build:
#   cargo build --release -p cluster --bins --examples
set -euo pipefail
rounds=${1:-5}
secs=${2:-10}
root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
cluster=$root/target/release/cluster
bare=$root/target/release/examples/bare_hyper
hz=$(getconf CLK_TCK)
port=3390
server_pid=
# Never leave a server running, whatever happens.
trap '[[ -n $server_pid ]] && kill -TERM "$server_pid" 2>/dev/null; true' EXIT

ticks() { # utime+stime of the given pids, in clock ticks
    local total=0 p f
    for p in "$@"; do
        read -r -a f < <(sed 's/.*) //' "/proc/$p/stat")
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}

run() { # variant -> prints "variant req/s us_cpu_per_req"
    local variant=$1 pid pids
    case $variant in
        cluster-ct) RUST_LOG=warn "$cluster" --workers 2 --listen 127.0.0.1:$port --admin off --worker-runtime current-thread & ;;
        cluster-mt) RUST_LOG=warn "$cluster" --workers 2 --listen 127.0.0.1:$port --admin off --worker-runtime multi-thread & ;;
        cluster-0) RUST_LOG=warn "$cluster" --workers 0 --listen 127.0.0.1:$port --admin off & ;;
        bare) "$bare" 127.0.0.1:$port 2>/dev/null & ;;
    esac
    pid=$!
    server_pid=$pid
    for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/" >/dev/null && break; sleep 0.05; done
    pids="$pid $( (pgrep -P "$pid" || true) | tr "\n" " ")"
    wrk -t2 -c64 -d2s "http://127.0.0.1:$port/" >/dev/null # warm-up
    local before after out reqs rps
    # shellcheck disable=SC2086
    before=$(ticks $pids)
    out=$(wrk -t2 -c64 -d"${secs}s" "http://127.0.0.1:$port/")
    # shellcheck disable=SC2086
    after=$(ticks $pids)
    kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
    server_pid=
    reqs=$(echo "$out" | awk '/requests in/ {print $1}')
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    errs=$(echo "$out" | awk '/Non-2xx|Socket errors/ {print}' | tr '\n' ' ')
    awk -v v="$variant" -v r="$rps" -v t=$((after - before)) -v n="$reqs" -v hz="$hz" -v e="$errs" \
        'BEGIN { printf "%-11s %10.0f req/s  %5.2f us CPU/req  %s\n", v, r, t * 1e6 / hz / n, e }'
}

read -r -a variants <<<"${VARIANTS:-cluster-ct bare cluster-mt}"
count=${#variants[@]}
results=$(mktemp)
for round in $(seq "$rounds"); do
    echo "# round $round"
    # Rotate the order so no variant always runs first.
    for i in $(seq 0 $((count - 1))); do
        run "${variants[$(((i + round) % count))]}" | tee -a "$results"
    done
done
echo "# medians over $rounds rounds"
for v in "${variants[@]}"; do
    rps=$(awk -v v="$v" '$1 == v {print $2}' "$results" | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}')
    cpu=$(awk -v v="$v" '$1 == v {print $4}' "$results" | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}')
    printf "%-11s %10.0f req/s  %5.2f us CPU/req\n" "$v" "$rps" "$cpu"
done
rm -f "$results"
