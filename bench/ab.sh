#!/usr/bin/env bash
# A/B of two balanced builds in one run: both serve the same nginx backends,
# each pinned to the same core, and take turns under the same load, so drift
# on a shared machine hits both alike. For "did this change cost anything?".
#
#   bench/ab.sh OLD_BIN NEW_BIN [TURNS] [SECONDS]     (defaults: 6 turns of 5 s)
#   PROTO=h2 bench/ab.sh ...    h2c clients to h2c backends (h2load) instead of
#                               HTTP/1.1 keep-alive (wrk)
#   URL_PATH=/256k bench/ab.sh  256 KiB answers instead of 2 bytes
#   UPLOAD=FILE URL_PATH=/sink PROTO=h2 ...   each request POSTs FILE (h2load -d)
#
# Prints per turn and in median: req/s and CPU microseconds per request of
# each build, and NEW/OLD; then each one's peak RSS.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
OLD=$1
NEW=$2
TURNS=${3:-6}
DUR=${4:-5}
PROTO=${PROTO:-h1}
URL_PATH=${URL_PATH:-/}
UPLOAD=${UPLOAD:-}
work_dir
start_backends "$WORK" 1

serve() { # bin port admin -> pid
  local base=18081 app=""
  if [ "$PROTO" = h2 ]; then base=18181 app=", appProtocol: kubernetes.io/h2c"; fi
  cat >"$WORK/$2.yaml" <<EOF
apiVersion: balanced.dev/v1alpha1
kind: BalancedService
metadata: {name: ab}
spec:
  endpoints: [{address: 127.0.0.1, port: $base}, {address: 127.0.0.1, port: $((base + 1))}, {address: 127.0.0.1, port: $((base + 2))}]
  listeners: [{name: http, port: $2$app}]
  healthCheck: {protocol: TCP, interval: 2s}
EOF
  BALANCED_LOG=warn taskset -c 0 "$1" standalone -f "$WORK/$2.yaml" --admin "127.0.0.1:$3" --bind 127.0.0.1 \
    >"$WORK/$2.log" 2>&1 &
  echo $!
}
OLD_PID=$(serve "$OLD" 18401 19401)
NEW_PID=$(serve "$NEW" 18402 19402)
PIDS+=("$OLD_PID" "$NEW_PID")
for a in 19401 19402; do
  for _ in $(seq 1 100); do curl -fsS -o /dev/null "http://127.0.0.1:$a/readyz" 2>/dev/null && break; sleep 0.1; done
done
sleep 1.5 # every endpoint healthy

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
load() { # port -> requests done
  if [ "$PROTO" = h2 ]; then
    taskset -c 1 h2load -c32 -m10 -D"$DUR" ${UPLOAD:+-d "$UPLOAD"} "http://127.0.0.1:$1$URL_PATH" 2>/dev/null |
      awk '/^requests:/ {print $8}'
  else
    taskset -c 1 wrk -t1 -c32 -d"${DUR}s" "http://127.0.0.1:$1$URL_PATH" 2>/dev/null |
      awk '/^Requests\/sec/ {print int($2 * '"$DUR"')}'
  fi
}
hz=$(getconf CLK_TCK)
declare -a OLD_US NEW_US OLD_RPS NEW_RPS
turn() { # pid port -> "rps us_per_req"
  local t0 t1 n
  t0=$(ticks "$1")
  n=$(load "$2")
  t1=$(ticks "$1")
  awk -v n="$n" -v d="$DUR" -v t=$((t1 - t0)) -v hz="$hz" 'BEGIN { printf "%.0f %.2f", n / d, t * 1e6 / hz / n }'
}
printf '%-5s %12s %10s %12s %10s\n' turn "old req/s" "old us/req" "new req/s" "new us/req"
for i in $(seq 1 "$TURNS"); do
  # Alternate which goes first, so warm-up and drift fall on both.
  if [ $((i % 2)) = 1 ]; then
    read -r orps ous <<<"$(turn "$OLD_PID" 18401)"
    read -r nrps nus <<<"$(turn "$NEW_PID" 18402)"
  else
    read -r nrps nus <<<"$(turn "$NEW_PID" 18402)"
    read -r orps ous <<<"$(turn "$OLD_PID" 18401)"
  fi
  OLD_US+=("$ous") NEW_US+=("$nus") OLD_RPS+=("$orps") NEW_RPS+=("$nrps")
  printf '%-5s %12s %10s %12s %10s\n' "$i" "$orps" "$ous" "$nrps" "$nus"
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR] = $1} END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
mo=$(median "${OLD_US[@]}") mn=$(median "${NEW_US[@]}")
ro=$(median "${OLD_RPS[@]}") rn=$(median "${NEW_RPS[@]}")
printf '%-5s %12s %10s %12s %10s\n' median "$ro" "$mo" "$rn" "$mn"
awk -v mo="$mo" -v mn="$mn" -v ro="$ro" -v rn="$rn" -v p="$PROTO" \
  'BEGIN { printf "%s new/old: cpu per request %.3fx, throughput %.3fx\n", p, mn / mo, rn / ro }'
# Peak resident memory of each over the whole run (anonymous part apart:
# the rest is the binary's own pages, shared with nothing but still counted).
for who in OLD NEW; do
  pid=${who}_PID
  awk -v w="$who" '/VmHWM/ {h = $2} /RssAnon/ {a = $2} /RssFile/ {f = $2}
    END { printf "%s peak RSS %.1f MiB (now: anonymous %.1f, file %.1f)\n", w, h / 1024, a / 1024, f / 1024 }' "/proc/${!pid}/status"
done
