#!/usr/bin/env bash
# HTTP proxy throughput and latency: wrk against balanced (standalone), against
# nginx as a reverse proxy with the same upstreams, and against one backend
# directly. Keep-alive, small responses. Usage: bench/proxy.sh [SECONDS] [CONNECTIONS]
# Installs wrk and nginx from Debian if missing. Everything runs on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_RUN=${1:-10}
CONNS=${2:-64}
THREADS=2
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null; rm -rf "$WORK"' EXIT

need() { command -v "$1" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }; }
need wrk wrk
need nginx nginx

cargo build --release -q
BIN=target/release/balanced

# Backends: nginx answering a 3-byte body on three ports (fast, steady upstreams),
# and nginx as the reference reverse proxy on 18090 (least_conn, keepalive).
cat > "$WORK/nginx.conf" <<CONF
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  server { listen 127.0.0.1:18081; listen 127.0.0.1:18082; listen 127.0.0.1:18083;
           location / { return 200 "ok\n"; } }
  upstream backends { least_conn; keepalive 64;
    server 127.0.0.1:18081 max_fails=1 fail_timeout=10s;
    server 127.0.0.1:18082 max_fails=1 fail_timeout=10s;
    server 127.0.0.1:18083 max_fails=1 fail_timeout=10s; }
  server { listen 127.0.0.1:18090;
           location / { proxy_pass http://backends; proxy_http_version 1.1;
                        proxy_set_header Connection ""; proxy_next_upstream error timeout; } }
}
CONF
nginx -c "$WORK/nginx.conf" -p "$WORK"

cat > "$WORK/bench.yaml" <<YAML
apiVersion: balanced.dev/v1alpha1
kind: BalancedService
metadata: {name: bench}
spec:
  endpoints:
    - {address: 127.0.0.1, port: 18081}
    - {address: 127.0.0.1, port: 18082}
    - {address: 127.0.0.1, port: 18083}
  listeners: [{name: http, port: 18080}]
  healthCheck: {protocol: HTTP, interval: 1s, timeout: 500ms, rise: 1, http: {path: /}}
YAML
BALANCED_LOG=warn "$BIN" standalone -f "$WORK/bench.yaml" --bind 127.0.0.1 --admin 127.0.0.1:19902 &
PROXY=$!
for _ in $(seq 50); do curl -sf localhost:18080/ >/dev/null 2>&1 && break; sleep 0.1; done

run() {
  local name=$1 url=$2
  local out; out=$(wrk -t$THREADS -c"$CONNS" -d"${SECONDS_RUN}s" --latency "$url")
  local rps p50 p99
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  local errs; errs=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
  printf '%-28s %12s %10s %10s  %s\n' "$name" "$rps" "$p50" "$p99" "$errs"
}
echo "wrk -t$THREADS -c$CONNS -d${SECONDS_RUN}s, keep-alive, 3-byte responses, $(nproc) cores shared by everything"
printf '%-28s %12s %10s %10s\n' "target" "req/s" "p50" "p99"
run "backend direct (nginx)" http://127.0.0.1:18081/
cpu() { awk '{print $14 + $15}' "/proc/$PROXY/stat"; }
CPU0=$(cpu)
run "balanced (LeastConnections)" http://127.0.0.1:18080/
CPU1=$(cpu)
run "nginx proxy (least_conn)" http://127.0.0.1:18090/
PEAK_RSS=$(awk '/VmHWM/ {print $2}' /proc/$PROXY/status)
TCK=$(getconf CLK_TCK)
echo "balanced peak RSS: $((PEAK_RSS / 1024)) MiB; CPU during its run: $(awk -v a="$CPU0" -v b="$CPU1" -v t="$TCK" -v s="$SECONDS_RUN" 'BEGIN {printf "%.2f cores", (b - a) / t / s}')"
