#!/usr/bin/env bash
# Instructions per request of one or more balanced builds, counted by
# valgrind's callgrind: the same count for the same build and load whatever
# else the machine is doing, so it settles an A/B that wall-clock CPU time on
# a shared machine cannot (bench/ab.sh moves by a few percent between slots).
#
#   bench/instructions.sh BIN [BIN...]       h2c clients to h2c backends
#   PROTO=h1 bench/instructions.sh BIN...    HTTP/1.1 keep-alive clients
#   bench/instructions.sh BIN haproxy        HAProxy too (nbthread 1, the forwarding
#                                            headers balanced adds): the same count for it
#   N=4000 bench/instructions.sh ...         requests counted (default 3000)
#   KEEP=/tmp/ir bench/instructions.sh ...   keeps each build's profile as
#                                            /tmp/ir.1, .2, ... (callgrind_annotate)
#
# Each build runs under callgrind on core 0 (so balanced picks the
# current-thread runtime, as in bench/compare.sh), the load on core 1; a first round of requests warms its pools
# and caches, the counters are zeroed, N requests are sent, and the counters
# dumped. Prints each build's instructions per request and its ratio to the
# first build. Instructions are not time (a cache miss or a syscall costs more
# than its count), but a change that only moves work around shows here.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
PROTO=${PROTO:-h2}
N=${N:-3000}
work_dir
start_backends "$WORK" 1

load() { # port requests
  if [ "$PROTO" = h2 ]; then
    taskset -c 1 h2load -c8 -m10 -n"$2" "http://127.0.0.1:$1/" >/dev/null 2>&1
  else
    # hey keeps its connections alive; -c8 spreads the load like h2load's.
    taskset -c 1 hey -c 8 -n "$2" "http://127.0.0.1:$1/" >/dev/null 2>&1
  fi
}

first=""
port=18501
for bin in "$@"; do
  base=18081 app=""
  if [ "$PROTO" = h2 ]; then base=18181 app=", appProtocol: kubernetes.io/h2c"; fi
  out="$WORK/callgrind.$port"
  if [ "$bin" = haproxy ]; then
    proto=""; [ "$PROTO" = h2 ] && proto=" proto h2"
    cat >"$WORK/$port.cfg" <<EOF
global
  nbthread 1
defaults
  mode http
  timeout connect 1s
  timeout client 60s
  timeout server 60s
frontend f
  bind 127.0.0.1:$port$proto
  option forwardfor
  http-request set-header X-Forwarded-Proto http
  http-request add-header Forwarded for=%[src];proto=http
  default_backend b
backend b
  balance leastconn
  http-reuse always
  server s1 127.0.0.1:$base$proto
  server s2 127.0.0.1:$((base + 1))$proto
  server s3 127.0.0.1:$((base + 2))$proto
EOF
    taskset -c 0 valgrind --tool=callgrind --callgrind-out-file="$out.%p" haproxy -db -f "$WORK/$port.cfg" \
      >"$WORK/$port.log" 2>&1 &
  else
    cat >"$WORK/$port.yaml" <<EOF
apiVersion: balanced.dev/v1alpha1
kind: BalancedService
metadata: {name: ir}
spec:
  endpoints: [{address: 127.0.0.1, port: $base}, {address: 127.0.0.1, port: $((base + 1))}, {address: 127.0.0.1, port: $((base + 2))}]
  listeners: [{name: http, port: $port$app}]
  healthCheck: {protocol: TCP, interval: 1s, timeout: 500ms, rise: 1}
EOF
    BALANCED_LOG=warn taskset -c 0 valgrind --tool=callgrind --callgrind-out-file="$out.%p" \
      "$bin" standalone -f "$WORK/$port.yaml" --admin "127.0.0.1:$((port + 1000))" --bind 127.0.0.1 \
      >"$WORK/$port.log" 2>&1 &
  fi
  pid=$!
  PIDS+=("$pid")
  for _ in $(seq 1 300); do
    if [ "$bin" = haproxy ]; then
      curl -fsS -o /dev/null ${app:+--http2-prior-knowledge} "http://127.0.0.1:$port/" 2>/dev/null && break
    else
      curl -fsS -o /dev/null "http://127.0.0.1:$((port + 1000))/readyz" 2>/dev/null && break
    fi
    sleep 0.2
  done
  sleep 2
  load "$port" 1000
  callgrind_control -z "$pid" >/dev/null 2>&1
  load "$port" "$N"
  callgrind_control -d "$pid" >/dev/null 2>&1
  sleep 1
  ir=$(grep -h '^summary:' "$out.$pid".* 2>/dev/null | tail -1 | awk '{print $2}')
  if [ -z "$ir" ]; then ir=$(grep -h '^totals:' "$out.$pid".* | tail -1 | awk '{print $2}'); fi
  if [ -n "${KEEP:-}" ]; then cat "$out.$pid".* >"$KEEP.$(((port - 18501) / 2 + 1))"; fi
  per=$((ir / N))
  [ -z "$first" ] && first=$per
  awk -v b="$bin" -v p="$per" -v f="$first" -v proto="$PROTO" \
    'BEGIN { printf "%-28s %s %9d instructions/request  %.3fx\n", b, proto, p, p / f }'
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  port=$((port + 2))
done
