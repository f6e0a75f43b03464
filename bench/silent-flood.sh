#!/usr/bin/env bash
# The slowloris case of issue 10: N connections that send nothing (or half the
# h2 preface) fill a listener capped at CAP connections, then a real client
# tries every 0.25 s. Prints how long until it is served, for balanced
# (`timeouts.requestHeader: 10s`, `limits.maxConnections: CAP`) and HAProxy
# (`timeout http-request 10s`, `maxconn CAP`), each pinned to core 0.
#
#   bench/silent-flood.sh [N] [CAP]        (defaults: 6000 silent, cap 4000)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
N=${1:-6000}
CAP=${2:-4000}
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null; rm -rf "$WORK"' EXIT
command -v haproxy >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null; }
command -v nginx >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null; }
if [ -z "${BALANCED_BIN:-}" ]; then cargo build --release -q; fi
BIN=${BALANCED_BIN:-target/release/balanced}
ulimit -n 20000

start_backends "$WORK" 1
cat > "$WORK/b.yaml" <<YAML
apiVersion: balanced.dev/v1alpha1
kind: BalancedService
metadata: {name: flood}
spec:
  endpoints: [{address: 127.0.0.1, port: 18081}]
  listeners: [{name: http, port: 27001}]
  healthCheck: {interval: 1s, timeout: 500ms, rise: 1}
  timeouts: {requestHeader: 10s}
  limits: {maxConnections: $CAP}
YAML
cat > "$WORK/h.cfg" <<CONF
global
  nbthread 1
  maxconn $CAP
defaults
  mode http
  timeout connect 1s
  timeout client 60s
  timeout server 60s
  timeout http-request 10s
frontend f
  bind 127.0.0.1:28001
  maxconn $CAP
  default_backend b
backend b
  server s1 127.0.0.1:18081
CONF
BALANCED_LOG=warn taskset -c 0 "$BIN" standalone -f "$WORK/b.yaml" --bind 127.0.0.1 --admin 127.0.0.1:27900 >"$WORK/b.log" 2>&1 &
taskset -c 0 haproxy -f "$WORK/h.cfg" -q >"$WORK/h.log" 2>&1 &
for p in 27001 28001; do
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$p/" >/dev/null && break; sleep 0.1; done
done

for target in "balanced 27001" "haproxy 28001"; do
  read -r name port <<<"$target"
  python3 - "$port" "$N" <<'PY' &
import asyncio, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
async def one(i):
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        if i % 2:
            w.write(b"PRI * HTTP/2.0\r\n")  # half the h2 preface
        await r.read()  # until the proxy closes it
    except OSError:
        pass
async def main():
    await asyncio.gather(*(one(i) for i in range(n)))
asyncio.run(main())
PY
  FLOOD=$!
  sleep 2 # the flood is in
  start=$(date +%s.%N); served=""
  while [ -z "$served" ]; do
    if curl -sf -m 1 "http://127.0.0.1:$port/" >/dev/null 2>&1; then served=$(date +%s.%N); break; fi
    now=$(date +%s.%N)
    if awk -v a="$start" -v b="$now" 'BEGIN { exit !(b - a > 60) }'; then break; fi
    sleep 0.25
  done
  if [ -n "$served" ]; then
    awk -v n="$name" -v a="$start" -v b="$served" -v c="$N" -v cap="$CAP" \
      'BEGIN { printf "%-9s %d silent connections, cap %d: a real client served after %.1f s\n", n, c, cap, b - a }'
  else
    echo "$name: $N silent connections, cap $CAP: not served within 60 s"
  fi
  wait "$FLOOD" 2>/dev/null || true
done
grep -h "maxConnections" "$WORK/b.log" | head -2 || true
