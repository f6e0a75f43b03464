#!/usr/bin/env bash
# Side by side: balanced, HAProxy and nginx as reverse proxies in front of the
# same three nginx backends, each proxy pinned to the same core (taskset), load
# generator and backends on the other core. Alternating rounds, so drift on a
# shared machine hits every proxy alike.
#
#   bench/compare.sh [ROUNDS] [SECONDS]       (defaults: 3 rounds of 8 s)
#   PROXY_CORE=0 LOAD_CORE=1 CONNS=32 ONLY="h1 h2 tcp" BALANCED_BIN=... bench/compare.sh
#   ACCESS_LOG=1 bench/compare.sh    adds a row: a second balanced, the same but
#                                    with --access-log to a file (the log's cost)
#
# Prints, per proxy and per protocol: req/s and p99 (medians of rounds; each
# round's p99 on the line below), CPU
# microseconds per request of the proxy process, the share of that CPU spent
# in the proxy's own code (user time; the rest is the kernel's, for the
# proxy's system calls), and balanced's ratios.
#   h1:  wrk -t1 -cCONNS keep-alive, HTTP/1.1 clients, HTTP/1.1 backends (2-byte body)
#   h2:  h2load, h2c clients, h2c backends (nginx `listen ... http2`);
#        nginx cannot proxy to h2 upstreams, so its row is h2c -> HTTP/1.1
#   tcp: iperf3 through a TCP listener (HAProxy mode tcp, nginx stream), balanced
#        by source address everywhere: iperf3's two connections must meet one server.
#        IPERF_ARGS=-Z sends with sendfile: where iperf3 itself fills the load
#        core at the same Gbit/s for every proxy, a cheaper sender lets them differ
#   https:  wrk -t1 -cCONNS keep-alive over TLS (one ECDSA P-256 certificate for
#           all three; HAProxy `bind ssl crt`, nginx `listen ssl`), HTTP/1.1 backends
#   tlsnew: the same with `Connection: close`: a full TLS handshake per request
#           (wrk resumes no session), the new-connection rate
#   (ONLY="https tlsnew" bench/compare.sh runs just those two)
#   SYSCALLS=1 adds a column: the proxy's system calls and context switches per
#   request (perf stat on the process), to see whether a gap is in the kernel
# Installs what it needs from Debian when missing. Everything runs on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
ROUNDS=${1:-3}
DUR=${2:-8}
CONNS=${CONNS:-32}
PROXY_CORE=${PROXY_CORE:-0}
LOAD_CORE=${LOAD_CORE:-1}
ONLY=${ONLY:-h1 h2 tcp}
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  [ -f "$WORK/nginx-proxy.pid" ] && kill "$(cat "$WORK/nginx-proxy.pid")" 2>/dev/null || true
  [ -n "${KEEP:-}" ] && echo "kept $WORK" >&2 || rm -rf "$WORK"
}
trap cleanup EXIT

need() { command -v "$1" >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null; }; }
need wrk wrk
need nginx nginx
need haproxy haproxy
need h2load nghttp2-client
need iperf3 iperf3
need curl curl
[ -f /usr/lib/nginx/modules/ngx_stream_module.so ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libnginx-mod-stream >/dev/null; }

# BALANCED_BIN=path compares another build (say, the previous commit's).
# The shipped build (fat LTO, Cargo.toml's `dist` profile), as the image has it.
if [ -z "${BALANCED_BIN:-}" ]; then cargo build --profile dist -q; fi
BIN=${BALANCED_BIN:-target/dist/balanced}

# Backends: one nginx worker on the load core. h1 on 18081-3, h2c on 18181-3.
start_backends "$WORK" "$LOAD_CORE"

# iperf3 servers for the TCP runs (one per endpoint; one stream lands on one).
for p in 15201 15202 15203; do
  taskset -c "$LOAD_CORE" iperf3 -s -p $p -D --logfile "$WORK/iperf$p.log" >/dev/null
done
sleep 0.3
pgrep -f "iperf3 -s -p 1520" >/dev/null && PIDS+=($(pgrep -f "iperf3 -s -p 1520"))

# One certificate for every TLS listener: ECDSA P-256, as most sites serve now.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -keyout "$WORK/key.pem" -out "$WORK/cert.pem" -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost,IP:127.0.0.1 2>/dev/null
cat "$WORK/cert.pem" "$WORK/key.pem" > "$WORK/haproxy.pem"

# --- the three proxies, configured as alike as their words allow -----------
# Least connections, upstream keep-alive, retry on connect error/timeout to
# another server, active checks every 1 s, passive ejection after 1 failure.
# Each adds the forwarding headers balanced always adds (X-Forwarded-For,
# X-Forwarded-Proto, Forwarded): a proxy that sends fewer headers upstream
# does less work per request (h2c: hpack encoding is ~10% of ours).
cat > "$WORK/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 8000
defaults
  timeout connect 1s
  timeout client 60s
  timeout server 60s
  retries 2
  option redispatch 1
frontend h1
  mode http
  bind 127.0.0.1:28001
  option forwardfor
  http-request set-header X-Forwarded-Proto http
  http-request add-header Forwarded for=%[src];proto=http
  default_backend h1
backend h1
  mode http
  balance leastconn
  http-reuse always
  retry-on conn-failure empty-response response-timeout
  server s1 127.0.0.1:18081 check inter 1s
  server s2 127.0.0.1:18082 check inter 1s
  server s3 127.0.0.1:18083 check inter 1s
frontend https
  mode http
  bind 127.0.0.1:28004 ssl crt $WORK/haproxy.pem alpn h2,http/1.1
  option forwardfor
  http-request set-header X-Forwarded-Proto https
  http-request add-header Forwarded for=%[src];proto=https
  default_backend h1
frontend h2
  mode http
  bind 127.0.0.1:28002 proto h2
  option forwardfor
  http-request set-header X-Forwarded-Proto http
  http-request add-header Forwarded for=%[src];proto=http
  default_backend h2
backend h2
  mode http
  balance leastconn
  http-reuse always
  retry-on conn-failure empty-response response-timeout
  server s1 127.0.0.1:18181 proto h2 check inter 1s
  server s2 127.0.0.1:18182 proto h2 check inter 1s
  server s3 127.0.0.1:18183 proto h2 check inter 1s
frontend tcp
  mode tcp
  bind 127.0.0.1:28003
  default_backend tcp
backend tcp
  mode tcp
  balance source
  server s1 127.0.0.1:15201 check inter 1s
  server s2 127.0.0.1:15202 check inter 1s
  server s3 127.0.0.1:15203 check inter 1s
CONF

cat > "$WORK/nginx-proxy.conf" <<CONF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
pid $WORK/nginx-proxy.pid;
error_log $WORK/nginx-proxy.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream h1 { least_conn; keepalive 64;
    server 127.0.0.1:18081 max_fails=1 fail_timeout=10s;
    server 127.0.0.1:18082 max_fails=1 fail_timeout=10s;
    server 127.0.0.1:18083 max_fails=1 fail_timeout=10s; }
  server { listen 127.0.0.1:29001; listen 127.0.0.1:29002 http2; listen 127.0.0.1:29004 ssl;
           ssl_certificate $WORK/cert.pem; ssl_certificate_key $WORK/key.pem;
           location / { proxy_pass http://h1; proxy_http_version 1.1;
                        proxy_set_header Connection ""; proxy_next_upstream error timeout;
                        proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
                        proxy_set_header X-Forwarded-Proto \$scheme;
                        proxy_set_header Forwarded "for=\$remote_addr;proto=\$scheme"; } }
}
stream {
  upstream tcp { hash \$remote_addr consistent;
    server 127.0.0.1:15201; server 127.0.0.1:15202; server 127.0.0.1:15203; }
  server { listen 127.0.0.1:29003; proxy_pass tcp; }
}
CONF

cat > "$WORK/balanced.yaml" <<YAML
apiVersion: balanced.dev/v1alpha1
kind: BalancedService
metadata: {name: h1}
spec:
  endpoints:
    - {address: 127.0.0.1, port: 18081}
    - {address: 127.0.0.1, port: 18082}
    - {address: 127.0.0.1, port: 18083}
  listeners: [{name: http, port: 27001}, {name: https, port: 27004, tls: {certFile: $WORK/cert.pem, keyFile: $WORK/key.pem}}]
  healthCheck: {protocol: TCP, interval: 1s, timeout: 500ms, rise: 1}
---
apiVersion: balanced.dev/v1alpha1
kind: BalancedService
metadata: {name: h2}
spec:
  endpoints:
    - {address: 127.0.0.1, port: 18181}
    - {address: 127.0.0.1, port: 18182}
    - {address: 127.0.0.1, port: 18183}
  listeners: [{name: http, port: 27002, appProtocol: kubernetes.io/h2c}]
  healthCheck: {protocol: TCP, interval: 1s, timeout: 500ms, rise: 1}
---
apiVersion: balanced.dev/v1alpha1
kind: BalancedService
metadata: {name: tcp}
spec:
  endpoints:
    - {address: 127.0.0.1, port: 15201}
    - {address: 127.0.0.1, port: 15202}
    - {address: 127.0.0.1, port: 15203}
  listeners: [{name: tcp, port: 27003, protocol: TCP}]
  algorithm: ConsistentHash
  hash: {source: SourceIP}
  healthCheck: {protocol: TCP, interval: 1s, timeout: 500ms, rise: 1}
YAML
# An older balanced without appProtocol or TLS: drop the field so the script still runs.
once=$("$BIN" standalone -f "$WORK/balanced.yaml" --once 2>&1 || true)
if grep -q "tls: unknown field" <<<"$once"; then
  sed -i 's/, {name: https, port: 27004, tls: {[^}]*}}//' "$WORK/balanced.yaml"
fi
if grep -q "appProtocol: unknown field" <<<"$once"; then
  sed -i 's/, appProtocol: kubernetes.io\/h2c//' "$WORK/balanced.yaml"
fi

# The binary's own pages count in its RSS as the page cache holds them: the
# same build read 9.8 or 11.3 MiB of file pages at idle here, as an old copy
# or one just copied. From an empty cache, builds compare alike.
if [ -w /proc/sys/vm/drop_caches ]; then sync; echo 3 >/proc/sys/vm/drop_caches; fi
BALANCED_LOG=warn taskset -c "$PROXY_CORE" "$BIN" standalone -f "$WORK/balanced.yaml" \
  --bind 127.0.0.1 --admin 127.0.0.1:27900 >"$WORK/balanced.log" 2>&1 &
BALANCED=$!; PIDS+=($BALANCED)
NAMES="balanced haproxy nginx"
if [ -n "${ACCESS_LOG:-}" ]; then
  # The same proxy on ports 2600x, one JSON line per request to a file on disk.
  sed 's/port: 2700/port: 2600/' "$WORK/balanced.yaml" >"$WORK/balanced-log.yaml"
  BALANCED_LOG=warn taskset -c "$PROXY_CORE" "$BIN" standalone -f "$WORK/balanced-log.yaml" \
    --bind 127.0.0.1 --admin 127.0.0.1:26900 --access-log "$WORK/access.log" >"$WORK/balanced-log.log" 2>&1 &
  LOGGED=$!; PIDS+=($LOGGED)
  NAMES="balanced logged haproxy nginx"
fi
taskset -c "$PROXY_CORE" haproxy -f "$WORK/haproxy.cfg" -q >"$WORK/haproxy.log" 2>&1 &
HAPROXY=$!; PIDS+=($HAPROXY)
taskset -c "$PROXY_CORE" nginx -c "$WORK/nginx-proxy.conf" -p "$WORK"
sleep 0.5
NGINX=$(pgrep -P "$(cat "$WORK/nginx-proxy.pid")" | head -1)

wait_up() { for _ in $(seq 100); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "not up: $1" >&2; for f in "$WORK"/*.log; do echo "== $f"; tail -n 5 "$f"; done >&2; exit 1; }
wait_up http://127.0.0.1:27001/
[ -n "${ACCESS_LOG:-}" ] && wait_up http://127.0.0.1:26001/
wait_up http://127.0.0.1:28001/
wait_up http://127.0.0.1:29001/
sleep 2 # every proxy's first checks have passed

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
user_ticks() { awk '{print $14}' "/proc/$1/stat"; }
TCK=$(getconf CLK_TCK)
declare -A RPS P99 CPU SYS USER

# measure NAME PID KIND URL: one run, appends "rps p99 cpu_us" to the arrays.
measure() {
  local name=$1 pid=$2 kind=$3 url=$4 out rps p99 reqs t0 t1 u0 u1 perf=""
  if [ -n "${SYSCALLS:-}" ]; then
    perf stat -x, -e raw_syscalls:sys_enter,context-switches -p "$pid" -o "$WORK/perf.out" &
    perf=$!
  fi
  t0=$(ticks "$pid"); u0=$(user_ticks "$pid")
  case $kind in
    h1|https|tlsnew)
      local close=()
      [ "$kind" = tlsnew ] && close=(-H "Connection: close")
      out=$(taskset -c "$LOAD_CORE" wrk -t1 -c"$CONNS" -d"${DUR}s" --latency "${close[@]}" "$url")
      rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
      # In ms, so rounds compare: wrk prints us, ms or s as fits.
      p99=$(awk '$1=="99%" { v = $2 + 0; if ($2 ~ /us$/) v /= 1000; else if ($2 ~ /[0-9]s$/) v *= 1000; printf "%.2f", v }' <<<"$out")
      reqs=$(awk '/requests in/ {print $1}' <<<"$out")
      if grep -q "Non-2xx" <<<"$out"; then echo "  $name: $(grep Non-2xx <<<"$out")" >&2; fi
      ;;
    h2)
      out=$(taskset -c "$LOAD_CORE" h2load -c"$CONNS" -m10 -t1 -D"$DUR" "$url" 2>&1)
      rps=$(awk '/^finished in/ {gsub(",","",$4); print $4}' <<<"$out")
      reqs=$(awk '/^requests:/ {print $8}' <<<"$out")
      p99=$(awk '/time for request:/ { v = $6 + 0; if ($6 ~ /us$/) v /= 1000; else if ($6 ~ /[0-9]s$/) v *= 1000; printf "%.2f", v }' <<<"$out")
      local failed; failed=$(awk '/^requests:/ {print $10}' <<<"$out")
      local ok2xx; ok2xx=$(awk '/^status codes:/ {print $3}' <<<"$out")
      [ "${failed:-0}" != "0" ] && echo "  $name: $failed failed; $(awk '/^status codes:/' <<<"$out")" >&2
      # Only answered 2xx count: a proxy that fails fast is not fast.
      rps=$(awk -v r="$rps" -v n="$reqs" -v ok="${ok2xx:-0}" 'BEGIN { printf "%.1f", (n > 0 ? r * ok / n : 0) }')
      reqs=${ok2xx:-0}
      ;;
    tcp)
      out=$(taskset -c "$LOAD_CORE" iperf3 -c 127.0.0.1 -p "$url" -t "$DUR" ${IPERF_ARGS:-} -f g -J 2>/dev/null)
      rps=$(python3 -c 'import json,sys; d=json.load(sys.stdin); print(round(d.get("end",{}).get("sum_received",{}).get("bits_per_second",0)/1e9,2))' <<<"$out" || echo 0)
      reqs=$(python3 -c 'import json,sys; d=json.load(sys.stdin); print(int(d.get("end",{}).get("sum_received",{}).get("bytes",0)/1048576))' <<<"$out" || echo 0)
      p99="-"
      ;;
  esac
  t1=$(ticks "$pid"); u1=$(user_ticks "$pid")
  if [ -n "$perf" ]; then
    kill -INT "$perf"; wait "$perf" || true
    local sc cs
    sc=$(awk -F, '/raw_syscalls:sys_enter/ {print $1}' "$WORK/perf.out")
    cs=$(awk -F, '/context-switches/ {print $1}' "$WORK/perf.out")
    SYS[$name]+=$(awk -v s="$sc" -v c="$cs" -v n="$reqs" 'BEGIN { if (n > 0) printf "%.2f/%.3f", s / n, c / n; else print "nan" }')" "
  fi
  local cpu
  cpu=$(awk -v a="$t0" -v b="$t1" -v t="$TCK" -v n="$reqs" 'BEGIN { if (n > 0) printf "%.1f", (b - a) / t * 1e6 / n; else print "nan" }')
  RPS[$name]+="$rps "; P99[$name]+="$p99 "; CPU[$name]+="$cpu "
  USER[$name]+=$(awk -v a="$t0" -v b="$t1" -v c="$u0" -v d="$u1" 'BEGIN { if (b > a) printf "%.0f", (d - c) / (b - a) * 100; else print "nan" }')" "
}

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR ? a[int((NR+1)/2)] : "nan")}'; }

for kind in $ONLY; do
  case $kind in
    h1) targets=("balanced $BALANCED http://127.0.0.1:27001/" "haproxy $HAPROXY http://127.0.0.1:28001/" "nginx $NGINX http://127.0.0.1:29001/") ;;
    h2) targets=("balanced $BALANCED http://127.0.0.1:27002/" "haproxy $HAPROXY http://127.0.0.1:28002/" "nginx $NGINX http://127.0.0.1:29002/") ;;
    tcp) targets=("balanced $BALANCED 27003" "haproxy $HAPROXY 28003" "nginx $NGINX 29003") ;;
    https|tlsnew) targets=("balanced $BALANCED https://127.0.0.1:27004/" "haproxy $HAPROXY https://127.0.0.1:28004/" "nginx $NGINX https://127.0.0.1:29004/") ;;
  esac
  if [ -n "${ACCESS_LOG:-}" ]; then
    case $kind in
      h1) targets+=("logged $LOGGED http://127.0.0.1:26001/") ;;
      h2) targets+=("logged $LOGGED http://127.0.0.1:26002/") ;;
      tcp) targets+=("logged $LOGGED 26003") ;;
    esac
  fi
  # A one-second round per proxy first, not counted: the page cache was
  # dropped for the RSS figure, and the first requests read each proxy's code
  # from disk (balanced's first round had a p99 of 16 ms, its next 0.8).
  for t in "${targets[@]}"; do
    read -r name pid url <<<"$t"
    DUR=1 measure "warmup/$name" "$pid" "$kind" "$url"
  done
  for r in $(seq "$ROUNDS"); do
    for t in "${targets[@]}"; do
      read -r name pid url <<<"$t"
      measure "$kind/$name" "$pid" "$kind" "$url"
    done
  done
  case $kind in
    h1) unit="req/s"; what="wrk -t1 -c$CONNS -d${DUR}s, HTTP/1.1 keep-alive, 2-byte body" ;;
    h2) unit="req/s"; what="h2load -c$CONNS -m10 -D$DUR, h2c (nginx row: h2c -> HTTP/1.1 upstream)" ;;
    tcp) unit="Gbit/s"; what="iperf3 -t$DUR through a TCP listener (cpu column: us per MiB)" ;;
    https) unit="req/s"; what="wrk -t1 -c$CONNS -d${DUR}s, HTTPS/1.1 keep-alive (TLS 1.3, ECDSA P-256), 2-byte body" ;;
    tlsnew) unit="req/s"; what="wrk -t1 -c$CONNS -d${DUR}s -H 'Connection: close': a full TLS 1.3 handshake per request" ;;
  esac
  echo
  echo "== $kind: $what; proxies on core $PROXY_CORE, load+backends on core $LOAD_CORE; $ROUNDS rounds"
  printf '%-10s %12s %14s %12s %6s   %s\n' proxy "$unit" p99 "cpu us/req" "user%" "rounds"
  for name in $NAMES; do
    k="$kind/$name"
    p99=$(median <<<"${P99[$k]}")
    case $kind in h2) p99="${p99}ms(max)" ;; tcp) ;; *) p99="${p99}ms" ;; esac
    printf '%-10s %12s %14s %12s %6s   %s\n' "$name" "$(median <<<"${RPS[$k]}")" "$p99" \
      "$(median <<<"${CPU[$k]}")" "$(median <<<"${USER[$k]}")" "${RPS[$k]}"
    # One round's stall moves its p99 and not the median: both are shown.
    [ "$kind" != tcp ] && printf '%-10s %s by round: %s\n' "" "$([ "$kind" = h2 ] && echo "slowest request" || echo p99), ms" "${P99[$k]}"
    if [ -n "${SYSCALLS:-}" ]; then
      printf '%-10s syscalls/context switches per request, by round: %s\n' "" "${SYS[$k]}"
    fi
  done
  b=$(median <<<"${RPS[$kind/balanced]}"); h=$(median <<<"${RPS[$kind/haproxy]}"); n=$(median <<<"${RPS[$kind/nginx]}")
  bc=$(median <<<"${CPU[$kind/balanced]}"); hc=$(median <<<"${CPU[$kind/haproxy]}"); nc=$(median <<<"${CPU[$kind/nginx]}")
  awk -v b="$b" -v h="$h" -v n="$n" -v bc="$bc" -v hc="$hc" -v nc="$nc" 'BEGIN {
    printf "balanced/haproxy: throughput %.2fx, cpu per unit %.2fx;  balanced/nginx: throughput %.2fx, cpu per unit %.2fx\n", b/h, bc/hc, b/n, bc/nc }'
  if [ -n "${ACCESS_LOG:-}" ]; then
    l=$(median <<<"${RPS[$kind/logged]}"); lc=$(median <<<"${CPU[$kind/logged]}")
    awk -v b="$b" -v l="$l" -v bc="$bc" -v lc="$lc" 'BEGIN {
      printf "access log on/off: throughput %.2fx (%.1f%% lost), cpu per unit %.2fx\n", l/b, (1 - l/b) * 100, lc/bc }'
  fi
done
echo
# The binary's own pages (file) apart from the heap and stacks (anonymous):
# the first is shared page cache, the second what load adds.
awk '/VmHWM/ {h = $2} /RssAnon/ {a = $2} /RssFile/ {f = $2}
  END { printf "balanced peak RSS: %.1f MiB (now: anonymous %.1f, file %.1f)\n", h / 1024, a / 1024, f / 1024 }' \
  "/proc/$BALANCED/status"
if [ -n "${ACCESS_LOG:-}" ]; then
  echo "access log: $(wc -l <"$WORK/access.log") lines, $(du -m "$WORK/access.log" | cut -f1) MiB; last: $(tail -n 1 "$WORK/access.log")"
fi
