#!/usr/bin/env bash
# Where balanced spends its CPU on the request path: perf record while wrk (or
# h2load) drives balanced pinned to one core, then the top of perf report.
#
#   bench/profile.sh [h1|h2] [SECONDS]      (defaults: h1, 8 s)
#   BALANCED_ARGS="--access-log /tmp/a.log" bench/profile.sh    extra flags for balanced
#   KEEP=/tmp/perf.data bench/profile.sh    keeps perf.data (perf report -i it, e.g. --call-graph caller)
#
# Needs perf (Debian linux-perf). The release profile keeps line tables, so
# symbols resolve. Prints the report to stdout; perf.data stays in a temp dir.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
KIND=${1:-h1}
DUR=${2:-8}
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null; rm -rf "$WORK"' EXIT
command -v perf >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf >/dev/null; }
# The release build keeps no symbols; the profiling profile is the same code with them.
[ -n "${BALANCED_BIN:-}" ] || cargo build --profile profiling -q
BIN=${BALANCED_BIN:-target/profiling/balanced}

start_backends "$WORK" 1
if [ "$KIND" = h2 ]; then PORTS="18181 18182 18183"; APP=", appProtocol: kubernetes.io/h2c"; else PORTS="18081 18082 18083"; APP=""; fi
{
  echo "apiVersion: balanced.dev/v1alpha1"
  echo "kind: BalancedService"
  echo "metadata: {name: prof}"
  echo "spec:"
  echo "  endpoints:"
  for p in $PORTS; do echo "    - {address: 127.0.0.1, port: $p}"; done
  echo "  listeners: [{name: http, port: 27001$APP}]"
  echo "  healthCheck: {interval: 1s, timeout: 500ms, rise: 1}"
} > "$WORK/prof.yaml"
BALANCED_LOG=warn taskset -c 0 "$BIN" standalone -f "$WORK/prof.yaml" --bind 127.0.0.1 --admin 127.0.0.1:27900 ${BALANCED_ARGS:-} &
PID=$!
for _ in $(seq 100); do curl -sf http://127.0.0.1:27001/ >/dev/null 2>&1 && break; sleep 0.1; done
sleep 1
perf record -F 2999 -g --call-graph dwarf,16384 -p "$PID" -o "$WORK/perf.data" -- sleep "$DUR" >/dev/null 2>&1 &
PERF=$!
if [ "$KIND" = h2 ]; then
  taskset -c 1 h2load -c32 -m10 -t1 -D"$DUR" http://127.0.0.1:27001/ | grep -E "^(finished|requests|status)"
else
  taskset -c 1 wrk -t1 -c32 -d"${DUR}s" http://127.0.0.1:27001/ | grep -E "Requests/sec|Non-2xx"
fi
wait $PERF || true
echo "== by thread"; perf report -i "$WORK/perf.data" --no-children --stdio --sort comm -g none 2>/dev/null | grep -v "^#" | grep -v "^$" | head -4
echo "== by object"; perf report -i "$WORK/perf.data" --no-children --stdio --sort dso -g none 2>/dev/null | grep -v "^#" | grep -v "^$" | head -8
echo "== inclusive, our code and hyper/tokio"
perf report -i "$WORK/perf.data" --children --percent-limit 3 --stdio --sort symbol -g none --dsos balanced 2>/dev/null | grep -v "^#" | grep -v "^$" | cut -c1-160 | head -40 || true # head closes the pipe early: not a failure
[ -n "${KEEP:-}" ] && cp "$WORK/perf.data" "$KEEP"
echo "== top symbols"
perf report -i "$WORK/perf.data" --no-children --percent-limit 0.5 --stdio --sort dso,symbol -g none 2>/dev/null | grep -v "^#" | grep -v "^$" | cut -c1-150 | head -70 || true
