#!/usr/bin/env bash
# Runs the image the way the chart's pods run it, on a private Docker network,
# and fails real hosts under steady client traffic:
#
#   three backends   `balanced backend` from the image itself
#   two proxies      `balanced standalone` in front of them (a Service's two
#                    replicas; the client routes to those whose /readyz passes,
#                    as kube-proxy routes to ready pods)
#   a client         tests/image/client.py in a container of its own
#
# Scenarios, each with the client running throughout and the fault healed
# before it ends: a backend killed (docker kill, then start), one hung
# (docker pause, then unpause), one cut off (docker network disconnect, then
# connect), and a proxy restarted (docker restart: SIGTERM, drain, start).
# Prints each scenario's failed requests, the image's start-up time, and exits
# non-zero when any scenario failed a request or the pod's constraints did
# not hold.
#
#   tests/image/run.sh        (after tests/image/build.sh; IMAGE=balanced:test)
set -euo pipefail
cd "$(dirname "$0")/../.."
IMAGE=${IMAGE:-balanced:test}
CLIENT_IMAGE=${CLIENT_IMAGE:-balanced-standin/rust:1.95.0-bookworm}
NET=balanced-image-test
SUBNET=172.31.250
SECONDS_PER_SCENARIO=${SECONDS_PER_SCENARIO:-12}
RATE=${RATE:-200}

# The pod's constraints, as the chart's securityContext and the proxy
# Deployments the controller renders set them (tests check the two agree):
# a read-only root, user and group 65532, no capabilities, no privilege
# escalation, and a memory volume where the Secrets they read are written.
POD_FLAGS=(--read-only --user 65532:65532 --cap-drop ALL --security-opt no-new-privileges --tmpfs /run/balanced/secrets)

say() { printf '[run] %s\n' "$*" >&2; }
names=(bt-b1 bt-b2 bt-b3 bt-p1 bt-p2 bt-client)
cleanup() {
  docker rm -f "${names[@]}" >/dev/null 2>&1 || true
  docker network rm "$NET" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
WORK=$(mktemp -d)
trap cleanup EXIT
cleanup
WORK=$(mktemp -d)
docker network create --subnet "$SUBNET.0/24" "$NET" >/dev/null

cat >"$WORK/web.yaml" <<EOF
apiVersion: balanced.dev/v1alpha1
kind: BalancedService
metadata: {name: web}
spec:
  endpoints:
    - {address: $SUBNET.11, port: 8080}
    - {address: $SUBNET.12, port: 8080}
    - {address: $SUBNET.13, port: 8080}
  listeners: [{name: http, port: 8080}]
  healthCheck: {protocol: HTTP, interval: 500ms, timeout: 300ms, rise: 1, fall: 2, downInterval: 500ms, http: {path: /}}
  timeouts: {connect: 300ms, response: 1s}
  retry: {on: [Error, Timeout], tries: 3}
EOF
chmod 644 "$WORK/web.yaml"

for i in 1 2 3; do
  docker run -d --name "bt-b$i" --network "$NET" --ip "$SUBNET.1$i" "${POD_FLAGS[@]}" \
    "$IMAGE" backend --listen 0.0.0.0:8080 --name "b$i" >/dev/null
done

# The proxy: what must hold of the pod before anything else.
start_proxy() { # name ip
  docker run -d --name "$1" --network "$NET" --ip "$2" "${POD_FLAGS[@]}" \
    -v "$WORK/web.yaml:/etc/balanced/web.yaml:ro" \
    "$IMAGE" standalone -f /etc/balanced/web.yaml --admin 0.0.0.0:9901 \
    --drain-delay 2s --grace 20s >/dev/null
}
ready_in() { # container ip since: seconds from `since` (date +%s%N) until /readyz answers 200
  local t0=$3 t
  for _ in $(seq 1 200); do
    [ "$(docker inspect -f '{{.State.Running}}' "$1")" = true ] || break
    if curl -fsS -o /dev/null --max-time 0.5 "http://$2:9901/readyz" 2>/dev/null; then
      t=$(date +%s%N)
      awk -v n=$((t - t0)) 'BEGIN { printf "%.2f", n / 1e9 }'
      return 0
    fi
    sleep 0.05
  done
  echo "never"
  return 1
}
t0=$(date +%s%N)
start_proxy bt-p1 "$SUBNET.2"
startup=$(ready_in bt-p1 "$SUBNET.2" "$t0") || {
  docker logs bt-p1 >&2
  exit 1
}
t0=$(date +%s%N)
start_proxy bt-p2 "$SUBNET.3"
ready_in bt-p2 "$SUBNET.3" "$t0" >/dev/null || {
  docker logs bt-p2 >&2
  exit 1
}

failed_checks=0
check() { # what, condition
  if eval "$2"; then say "ok: $1"; else
    say "FAILED: $1"
    failed_checks=$((failed_checks + 1))
  fi
}
check "the proxy runs as 65532:65532" \
  '[ "$(docker inspect -f "{{.Config.User}}" bt-p1)" = "65532:65532" ]'
check "on a read-only root file system" \
  '[ "$(docker inspect -f "{{.HostConfig.ReadonlyRootfs}}" bt-p1)" = "true" ]'
check "with no capabilities" \
  '[ "$(docker inspect -f "{{.HostConfig.CapDrop}}" bt-p1)" = "[ALL]" ]'
check "serving through the proxy" \
  'curl -fsS --max-time 2 "http://$SUBNET.2:8080/" | grep -q "^b[123]"'
check "and the image has no shell" \
  '! docker run --rm --entrypoint /bin/sh "$IMAGE" -c true >/dev/null 2>&1'

# One scenario: the client for SECONDS_PER_SCENARIO, the fault at 3 s, healed at 8 s.
results=()
scenario() { # name, fault command, heal command
  local name=$1 fault=$2 heal=$3
  docker rm -f bt-client >/dev/null 2>&1 || true
  docker run -d --name bt-client --network "$NET" --ip "$SUBNET.100" \
    -v "$PWD/tests/image/client.py:/client.py:ro" "$CLIENT_IMAGE" \
    python3 /client.py "$SECONDS_PER_SCENARIO" "$RATE" "$SUBNET.2:8080:9901,$SUBNET.3:8080:9901" >/dev/null
  sleep 3
  eval "$fault"
  sleep 5
  eval "$heal"
  docker wait bt-client >/dev/null
  local out
  out=$(docker logs bt-client 2>&1 | tail -1)
  local failed sent
  failed=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["failed"])' "$out" 2>/dev/null || echo "?")
  sent=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["sent"])' "$out" 2>/dev/null || echo "?")
  printf '%-28s %6s sent %4s failed   %s\n' "$name" "$sent" "$failed" "$out"
  results+=("$failed")
  # Every endpoint and both proxies back before the next scenario.
  sleep 2
}

say "scenarios: ${SECONDS_PER_SCENARIO}s of ~${RATE} req/s each, fault at 3 s, healed at 8 s"
scenario "baseline (no fault)" ":" ":"
scenario "backend killed" "docker kill bt-b1 >/dev/null" "docker start bt-b1 >/dev/null"
scenario "backend hung (paused)" "docker pause bt-b2 >/dev/null" "docker unpause bt-b2 >/dev/null"
scenario "backend partitioned" "docker network disconnect $NET bt-b3" \
  "docker network connect --ip $SUBNET.13 $NET bt-b3"
scenario "proxy restarted (SIGTERM)" "docker restart -t 30 bt-p1 >/dev/null &" "wait"

size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
awk -v s="$size" -v t="$startup" 'BEGIN { printf "image: %.1f MiB; docker run to /readyz 200: %s s\n", s / 1048576, t }'
bad=0
for f in "${results[@]}"; do [ "$f" = "0" ] || bad=1; done
if [ "$bad" != 0 ] || [ "$failed_checks" != 0 ]; then
  say "FAILED: a scenario lost requests or a constraint did not hold"
  docker logs bt-p1 2>&1 | tail -20 >&2
  exit 1
fi
say "every scenario: 0 failed requests"
