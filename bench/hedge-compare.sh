#!/usr/bin/env bash
# One of three backends frozen (SIGSTOP: the kernel still accepts, nothing
# answers) under 16 clients, side by side: balanced with `retry.hedge` after
# `perTryTimeout: 200ms`, balanced without hedging, HAProxy (retry-on
# response-timeout) and nginx (proxy_next_upstream timeout), all with a 2 s
# response timeout. Each proxy on core 0, backends and hey on core 1.
#
#   bench/hedge-compare.sh [SECONDS]      (default 5; the freeze starts after 1 s)
# Prints per proxy: answers, failures (non-200 or errors), p99 and the slowest.
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${1:-5}
WORK=$(mktemp -d)
cleanup() {
  for p in 1 2 3; do [ -f "$WORK/b$p.pid" ] && kill -CONT "$(cat "$WORK/b$p.pid")" 2>/dev/null; done
  pkill -f "admin 127.0.0.1:2890" 2>/dev/null || true
  for p in b1 b2 b3 nginx-proxy haproxy; do [ -f "$WORK/$p.pid" ] && kill "$(cat "$WORK/$p.pid")" 2>/dev/null; done
  rm -rf "$WORK"
}
trap cleanup EXIT
for tool in hey nginx haproxy; do command -v $tool >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $tool >/dev/null; }; done
if [ -z "${BALANCED_BIN:-}" ]; then cargo build --release -q; fi
BIN=${BALANCED_BIN:-target/release/balanced}

# Three nginx backends, one process each, so one can be stopped alone.
for p in 1 2 3; do
  cat > "$WORK/b$p.conf" <<CONF
daemon on; master_process off; worker_processes 1; pid $WORK/b$p.pid; error_log $WORK/b$p.log warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:1808$p backlog=4096; location / { return 200 "ok"; } } }
CONF
  taskset -c 1 nginx -c "$WORK/b$p.conf" -p "$WORK"
done
UP="server 127.0.0.1:18081; server 127.0.0.1:18082; server 127.0.0.1:18083;"

cat > "$WORK/nginx-proxy.conf" <<CONF
worker_processes 1; pid $WORK/nginx-proxy.pid; error_log $WORK/np.log crit;
events { worker_connections 4096; }
http { access_log off;
  upstream b { $UP keepalive 64; }
  server { listen 127.0.0.1:28080;
    location / { proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_read_timeout 2s; proxy_connect_timeout 1s; proxy_next_upstream error timeout; } } }
CONF
cat > "$WORK/haproxy.cfg" <<CONF
global
  nbthread 1
  pidfile $WORK/haproxy.pid
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 2s
  retries 3
  option redispatch 1
  retry-on conn-failure empty-response response-timeout
frontend f
  bind 127.0.0.1:28082
  default_backend b
backend b
  balance roundrobin
  server s1 127.0.0.1:18081 check inter 1s
  server s2 127.0.0.1:18082 check inter 1s
  server s3 127.0.0.1:18083 check inter 1s
CONF
yaml() { # yaml PORT RETRY
  cat <<YAML
apiVersion: balanced.dev/v1alpha1
kind: BalancedService
metadata: {name: hedge}
spec:
  endpoints: [{address: 127.0.0.1, port: 18081}, {address: 127.0.0.1, port: 18082}, {address: 127.0.0.1, port: 18083}]
  listeners: [{name: http, port: $1}]
  algorithm: RoundRobin
  healthCheck: {interval: 1s, timeout: 500ms}
  timeouts: {connect: 1s, response: 2s}
  retry: $2
YAML
}
yaml 28083 "{perTryTimeout: 200ms, hedge: true}" > "$WORK/hedge.yaml"
yaml 28084 "{on: [Error, Timeout]}" > "$WORK/plain.yaml"

run() { # run NAME PORT START...
  local name=$1 port=$2; shift 2
  "$@"
  sleep 1.5
  taskset -c 1 hey -z "${DUR}s" -c 16 "http://127.0.0.1:$port/" > "$WORK/hey.out" &
  local hey=$!
  sleep 1
  kill -STOP "$(cat "$WORK/b2.pid")"
  wait $hey
  kill -CONT "$(cat "$WORK/b2.pid")"
  local out ok failed slowest p99
  out=$(cat "$WORK/hey.out")
  ok=$(awk '/\[200\]/ {print $2}' <<<"$out")
  # Non-200 answers under "Status code distribution", and every "[N] ..." under "Error distribution".
  failed=$(awk '/Status code distribution/ {s = 1; e = 0; next} /Error distribution/ {s = 0; e = 1; next}
    s && /\[[0-9]+\]/ {c = $1; gsub(/[][]/, "", c); if (c != 200) n += $2}
    e && /\[[0-9]+\]/ {c = $1; gsub(/[][]/, "", c); n += c} END {print n + 0}' <<<"$out")
  slowest=$(awk '/Slowest:/ {print $2}' <<<"$out")
  p99=$(awk '/99% in/ {print $3}' <<<"$out")
  printf "%-16s answered %6s  failed %4s  p99 %6.3f s  p100 %6.3f s\n" "$name" "${ok:-0}" "$failed" "${p99:-0}" "${slowest:-0}"
  sleep 0.5
}
start_nginx() { taskset -c 0 nginx -c "$WORK/nginx-proxy.conf" -p "$WORK"; }
start_haproxy() { taskset -c 0 haproxy -D -f "$WORK/haproxy.cfg"; }
start_balanced() { # start_balanced FILE ADMIN
  BALANCED_LOG=warn taskset -c 0 "$BIN" standalone -f "$1" --bind 127.0.0.1 --admin "$2" >"$WORK/bal.log" 2>&1 &
}
run "balanced hedge" 28083 start_balanced "$WORK/hedge.yaml" 127.0.0.1:28901
pkill -f "admin 127.0.0.1:28901" || true
run "balanced plain" 28084 start_balanced "$WORK/plain.yaml" 127.0.0.1:28902
pkill -f "admin 127.0.0.1:28902" || true
run "haproxy" 28082 start_haproxy
kill "$(cat "$WORK/haproxy.pid")"
run "nginx" 28080 start_nginx
kill "$(cat "$WORK/nginx-proxy.pid")"
