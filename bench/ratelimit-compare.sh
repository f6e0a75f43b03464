#!/usr/bin/env bash
# spec.rateLimit against nginx's limit_req, side by side under hey at twice
# the limit: 100 r/s with burst 10, hey sending 200 r/s (4 workers x 50 q/s)
# for SECONDS, once with nodelay / delay: false and once delayed.
#
#   bench/ratelimit-compare.sh [SECONDS]      (default 10)
#   RATE=50 BURST=0 bench/ratelimit-compare.sh 4    four times a 50 r/s limit with no burst
# Prints 200s and 429s per proxy; expected with nodelay: 200s = 100 x SECONDS
# + 11, the rest 429; delayed: no 429s, ~100 r/s through (hey waits).
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${1:-10}
RATE=${RATE:-100}
BURST=${BURST:-10}
WORK=$(mktemp -d)
trap 'pkill -f "admin 127.0.0.1:28900" 2>/dev/null || true; for p in nginx nginx-proxy; do [ -f "$WORK/$p.pid" ] && kill "$(cat "$WORK/$p.pid")" 2>/dev/null; done; rm -rf "$WORK"' EXIT
for tool in hey nginx; do command -v $tool >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $tool >/dev/null; }; done
if [ -z "${BALANCED_BIN:-}" ]; then cargo build --release -q; fi
BIN=${BALANCED_BIN:-target/release/balanced}
cat > "$WORK/backends.conf" <<CONF
worker_processes 1; pid $WORK/nginx.pid; error_log $WORK/b.log warn;
events { worker_connections 1024; }
http { access_log off; server { listen 127.0.0.1:18081; location / { return 200 "ok"; } } }
CONF
nginx -c "$WORK/backends.conf" -p "$WORK"
run() { # run NODELAY(yes|no)
  local nd=$1 delay
  [ "$nd" = yes ] && delay=false || delay=true
  cat > "$WORK/proxy.conf" <<CONF
worker_processes 1; pid $WORK/nginx-proxy.pid; error_log $WORK/p.log warn;
events { worker_connections 1024; }
http { access_log off; limit_req_zone \$host zone=one:1m rate=${RATE}r/s; upstream b { server 127.0.0.1:18081; }
  server { listen 127.0.0.1:28080; location / { limit_req zone=one $([ "$BURST" -gt 0 ] && echo burst=$BURST) $([ "$nd" = yes ] && echo nodelay); limit_req_status 429; proxy_pass http://b; } } }
CONF
  cat > "$WORK/bal.yaml" <<YAML
apiVersion: balanced.dev/v1alpha1
kind: BalancedService
metadata: {name: rl}
spec:
  endpoints: [{address: 127.0.0.1, port: 18081}]
  listeners: [{name: http, port: 28081}]
  rateLimit: {requests: $RATE, per: 1s, burst: $BURST, delay: $delay}
YAML
  nginx -c "$WORK/proxy.conf" -p "$WORK"
  BALANCED_LOG=warn "$BIN" standalone -f "$WORK/bal.yaml" --bind 127.0.0.1 --admin 127.0.0.1:28900 >"$WORK/bal.log" 2>&1 &
  sleep 1.5
  for target in "nginx 28080" "balanced 28081"; do
    set -- $target
    out=$(hey -z "${DUR}s" -c 4 -q 50 "http://127.0.0.1:$2/")
    ok=$(awk '/\[200\]/ {print $2}' <<<"$out"); limited=$(awk '/\[429\]/ {print $2}' <<<"$out")
    printf "%-10s %-8s 200: %6s  429: %6s  %s\n" "$1" "$([ "$nd" = yes ] && echo nodelay || echo delay)" "${ok:-0}" "${limited:-0}" "$(grep -E 'Requests/sec' <<<"$out" | tr -s ' \t' ' ')"
  done
  kill "$(cat "$WORK/nginx-proxy.pid")"; pkill -f "admin 127.0.0.1:28900" || true; sleep 0.5
}
run yes
run no
