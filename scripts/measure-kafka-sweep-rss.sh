#!/usr/bin/env bash
# Measure what a 50,000,000-point sweep costs the hosts of a Kafka grid:
# starts a tansu broker and two `kwq serve` hosts on 127.0.0.1 (free
# ports, a temporary directory), submits one 50M-point no-op sweep, and
# prints every host's RSS, the job's counts and how far it was expanded
# every INTERVAL seconds for SECONDS seconds; then stops everything.
#   bash scripts/measure-kafka-sweep-rss.sh [SECONDS] [INTERVAL]
# Uses target/release/kwq if built, else target/debug/kwq.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-600}
interval=${2:-30}
kwq=target/release/kwq
[ -x "$kwq" ] || kwq=target/debug/kwq
[ -x "$kwq" ] || { echo "build kwq first (cargo build)" >&2; exit 2; }
kwq=$(realpath "$kwq")
tansu=$(bash scripts/install-tansu.sh)
dir=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
broker=$(free_port)
(cd "$dir" && exec "$tansu" broker --listener-url "tcp://127.0.0.1:$broker" \
  --advertised-listener-url "tcp://127.0.0.1:$broker" --storage-engine sqlite://tansu.db) >/dev/null 2>&1 &
pids+=($!)
until (exec 3<>"/dev/tcp/127.0.0.1/$broker") 2>/dev/null; do sleep 0.2; done
ports=()
for name in h1 h2; do
  port=$(free_port)
  ports+=("$port")
  extra=()
  [ "$name" = h1 ] && extra=(--examples)
  KWQ_LOG=warn "$kwq" serve --store "kafka://127.0.0.1:$broker?rejoin_stale=true" --host "$name" \
    --data-dir "$dir/$name" --listen "127.0.0.1:$port" "${extra[@]}" 2>>"$dir/$name.log" &
  pids+=($!)
  until curl -sf "http://127.0.0.1:$port/healthz" >/dev/null; do sleep 0.2; done
done
api="http://127.0.0.1:${ports[0]}"
start=$(date +%s.%N)
job=$(curl -sf "$api/v1/jobs" -H 'content-type: application/json' -d \
  '{"module":"noop","sweep":{"params":{"seed":{"from":0,"to":49999999}}}}' |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
echo "50,000,000-point sweep $job accepted in $(python3 -c "print(round(($(date +%s.%N)-$start)*1000,1))") ms"
printf '%6s %10s %10s %10s %10s %10s\n' s completed expanded rss_h1_MB rss_h2_MB tasks/s
last=0
for ((t = interval; t <= seconds; t += interval)); do
  sleep "$interval"
  read -r completed expanded < <(curl -sf "$api/v1/jobs/$job" |
    python3 -c 'import json,sys; j=json.load(sys.stdin); print(j["counts"]["Completed"], j["expanded"])')
  rss=()
  for pid in "${pids[1]}" "${pids[2]}"; do
    rss+=("$(awk '/VmRSS/ {printf "%.0f", $2/1024}' "/proc/$pid/status")")
  done
  printf '%6s %10s %10s %10s %10s %10s\n' "$t" "$completed" "$expanded" "${rss[0]}" "${rss[1]}" \
    "$(( (completed - last) / interval ))"
  last=$completed
done
