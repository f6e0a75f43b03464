#!/usr/bin/env bash
# What routing costs on the request path: the same balanced build, pinned to
# one core, in front of the same nginx backends, once with no routes and once
# with 10 routes that the benchmark request walks through (the last one, a
# PathPrefix "/", takes it). Alternating rounds; wrk on the other core.
#
#   bench/routes-ab.sh [ROUNDS] [SECONDS]     (defaults: 3 rounds of 8 s)
#   PROXY_CORE=0 LOAD_CORE=1 CONNS=32 BALANCED_BIN=... bench/routes-ab.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
ROUNDS=${1:-3}
DUR=${2:-8}
CONNS=${CONNS:-32}
PROXY_CORE=${PROXY_CORE:-0}
LOAD_CORE=${LOAD_CORE:-1}
work_dir
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
command -v nginx >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null; }
if [ -z "${BALANCED_BIN:-}" ]; then cargo build --release -q; fi
BIN=${BALANCED_BIN:-target/release/balanced}

start_backends "$WORK" "$LOAD_CORE"
spec() { # spec NAME PORT ROUTES
  cat <<YAML
apiVersion: balanced.dev/v1alpha1
kind: BalancedService
metadata: {name: $1}
spec:
  endpoints:
    - {address: 127.0.0.1, port: 18081}
    - {address: 127.0.0.1, port: 18082}
    - {address: 127.0.0.1, port: 18083}
  listeners: [{name: http, port: $2}]
  healthCheck: {protocol: TCP, interval: 1s, timeout: 500ms, rise: 1}
$3
YAML
}
ROUTES="  routes:"
for i in $(seq 1 9); do
  case $((i % 3)) in
    0) m="{path: {type: PathPrefix, value: /svc-$i}}" ;;
    1) m="{headers: [{name: x-tenant, value: t$i}]}" ;;
    2) m="{path: {type: RegularExpression, value: '/r$i/[0-9]+'}}" ;;
  esac
  ROUTES+=$'\n'"    - {name: r$i, matches: [$m], backendRefs: [{name: default}]}"
done
ROUTES+=$'\n'"    - {name: all, matches: [{path: {type: PathPrefix, value: /}}], backendRefs: [{name: default}]}"
spec none 27101 "" >"$WORK/none.yaml"
spec routed 27102 "$ROUTES" >"$WORK/routed.yaml"
for which in none routed; do
  port=$([ $which = none ] && echo 27101 || echo 27102)
  BALANCED_LOG=warn taskset -c "$PROXY_CORE" "$BIN" standalone -f "$WORK/$which.yaml" \
    --bind 127.0.0.1 --admin "127.0.0.1:$((port + 800))" >"$WORK/$which.log" 2>&1 &
  PIDS+=($!)
done
for port in 27101 27102; do
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/" >/dev/null 2>&1 && break; sleep 0.1; done
done
declare -A RPS
for round in $(seq "$ROUNDS"); do
  for which in none routed; do
    port=$([ $which = none ] && echo 27101 || echo 27102)
    out=$(taskset -c "$LOAD_CORE" wrk -t1 -c"$CONNS" -d"${DUR}s" "http://127.0.0.1:$port/")
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    RPS[$which]+="$rps "
    echo "round $round  $which  $rps req/s" >&2
  done
done
median() { tr ' ' '\n' <<<"$1" | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
none=$(median "${RPS[none]}"); routed=$(median "${RPS[routed]}")
printf "%-22s %10s\n" "balanced" "req/s"
printf "%-22s %10.0f\n" "no routes" "$none" "10 routes (last takes)" "$routed"
awk -v a="$none" -v b="$routed" 'BEGIN { printf "routed / none          %10.3f  (%.1f%% %s)\n", b / a, (a > b ? (a - b) / a : (b - a) / a) * 100, (a > b ? "loss" : "gain") }'
