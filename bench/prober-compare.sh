#!/usr/bin/env bash
# The prober side by side with HAProxy's checks: the same 10,000 endpoints
# (100 services x 100 loopback addresses over 100 nginx ports), TCP checks
# every 1 s, rise 2, fall 3; each prober pinned to the same core in turn,
# nginx on the other. Prints CPU (share of one core), peak RSS and how many
# endpoints each sees up.
#
#   bench/prober-compare.sh [SECONDS] [ROUNDS]      (defaults: 20 s, 2 rounds)
#   PROBER_CORE=0 LOAD_CORE=1 SERVICES=100 BALANCED_BIN=... bench/prober-compare.sh
#   PERF=1 bench/prober-compare.sh 10 1     also perf-records balanced and prints its top symbols
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
DUR=${1:-20}
ROUNDS=${2:-2}
SERVICES=${SERVICES:-100}
PER=100
PORTS=100
PROBER_CORE=${PROBER_CORE:-0}
LOAD_CORE=${LOAD_CORE:-1}
work_dir
need() { command -v "$1" >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null; }; }
need nginx nginx
need haproxy haproxy
need curl curl
# PERF=1 needs symbols: the profiling profile is the release build with them.
PROFILE=release; [ -n "${PERF:-}" ] && PROFILE=profiling
if [ -z "${BALANCED_BIN:-}" ]; then cargo build --profile "$PROFILE" -q; fi
BIN=${BALANCED_BIN:-target/$PROFILE/balanced}
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

# nginx: 100 ports on every loopback address.
{
  echo "worker_processes 1; pid $WORK/nginx.pid; error_log $WORK/nginx.log warn;"
  echo "events { worker_connections 16384; }"
  echo "http { access_log off; server {"
  for p in $(seq 0 $((PORTS - 1))); do echo "  listen $((21000 + p)) reuseport;"; done
  echo "  location / { return 200 ok; } } }"
} > "$WORK/nginx.conf"
taskset -c "$LOAD_CORE" nginx -c "$WORK/nginx.conf" -p "$WORK"

# Endpoint i of service s: 127.0.<s+1>.<i+1>:<21000 + (s+i) % 100>, as benches/prober.rs.
endpoint() { echo "127.0.$(($1 + 1)).$(($2 + 1)) $((21000 + ($1 + $2) % PORTS))"; }

{
  for s in $(seq 0 $((SERVICES - 1))); do
    printf -- "---\napiVersion: balanced.dev/v1alpha1\nkind: BalancedService\nmetadata: {name: svc%d}\nspec:\n" "$s"
    printf "  listeners: [{name: http, port: %d}]\n" $((22000 + s))
    printf "  healthCheck: {protocol: TCP, interval: 1s, timeout: 500ms, rise: 2, fall: 3}\n  endpoints:\n"
    for i in $(seq 0 $((PER - 1))); do
      read -r a p <<<"$(endpoint "$s" "$i")"
      printf "    - {address: %s, port: %d}\n" "$a" "$p"
    done
  done
} > "$WORK/balanced.yaml"

{
  printf "global\n  nbthread 1\n  maxconn 4000\ndefaults\n  mode tcp\n  timeout connect 500ms\n  timeout check 500ms\n  timeout client 10s\n  timeout server 10s\n"
  printf "frontend stats\n  mode http\n  bind 127.0.0.1:28999\n  stats enable\n  stats uri /stats\n"
  for s in $(seq 0 $((SERVICES - 1))); do
    printf "backend svc%d\n" "$s"
    for i in $(seq 0 $((PER - 1))); do
      read -r a p <<<"$(endpoint "$s" "$i")"
      printf "  server e%d %s:%d check inter 1s rise 2 fall 3\n" "$i" "$a" "$p"
    done
  done
} > "$WORK/haproxy.cfg"

TCK=$(getconf CLK_TCK)
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
up_balanced() { curl -s 127.0.0.1:27990/status | grep -c '"Healthy"' || true; }
up_haproxy() { curl -s '127.0.0.1:28999/stats;csv' | grep ',UP,' | grep -vc '^svc[0-9]*,BACKEND,' || true; }

run() {
  local name=$1 pid up0 t0 t1 up1
  case $name in
    balanced)
      env ${BALANCED_ENV:-X=1} BALANCED_LOG=warn taskset -c "$PROBER_CORE" "$BIN" standalone -f "$WORK/balanced.yaml" \
        --bind 127.0.0.1 --admin 127.0.0.1:27990 >"$WORK/balanced.log" 2>&1 &
      pid=$! ;;
    haproxy)
      taskset -c "$PROBER_CORE" haproxy -f "$WORK/haproxy.cfg" -q >"$WORK/haproxy.log" 2>&1 &
      pid=$! ;;
  esac
  PIDS+=("$pid")
  sleep 5 # start-up and the first rise
  up0=$("up_$name")
  t0=$(ticks "$pid")
  if [ -n "${STRACE:-}" ]; then
    timeout 5 strace -c -f -p "$pid" -o "$WORK/strace-$name.txt" >/dev/null 2>&1 || true
    echo "== $name: syscalls in 5 s"; head -25 "$WORK/strace-$name.txt"
  fi
  if [ -n "${PERF:-}" ]; then
    perf record -F 1999 -g -p "$pid" -o "$WORK/perf-$name.data" -- sleep "$DUR" >/dev/null 2>&1
  else
    sleep "$DUR"
  fi
  t1=$(ticks "$pid")
  up1=$("up_$name")
  local rss; rss=$(awk '/VmHWM/ {print int($2 / 1024)}' "/proc/$pid/status")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  awk -v n="$name" -v a="$t0" -v b="$t1" -v t="$TCK" -v d="$DUR" -v r="$rss" -v u0="$up0" -v u1="$up1" \
    'BEGIN { printf "%-9s %8.1f%% %10d MiB %8s %8s\n", n, (b - a) / t / d * 100, r, u0, u1 }'
}

echo "$((SERVICES * PER)) endpoints, TCP checks every 1 s (rise 2, fall 3); probers on core $PROBER_CORE, nginx on core $LOAD_CORE; ${DUR}s per run"
printf '%-9s %9s %14s %8s %8s\n' prober "cpu" "peak RSS" "up@5s" "up@end"
for r in $(seq "$ROUNDS"); do
  run balanced
  run haproxy
done
if [ -n "${PERF:-}" ]; then
  for name in balanced haproxy; do
    echo "== $name: inclusive, syscalls and softirq"
    perf report -i "$WORK/perf-$name.data" --children --stdio --sort symbol -g none 2>/dev/null \
      | grep -E "__x64_sys_|do_softirq|net_rx_action|entry_SYSCALL|exit_to_user|schedule$" | cut -c1-100 | head -20
  done
  echo "== balanced: top symbols"
  perf report -i "$WORK/perf-balanced.data" --no-children --percent-limit 0.7 --stdio --sort dso,symbol -g none 2>/dev/null | grep -v "^#" | grep -v "^$" | cut -c1-140 | head -30
fi
