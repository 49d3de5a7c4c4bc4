#!/usr/bin/env bash
# `make compose-demo`: build every image from nothing (docker/build.sh), then
# run docker-compose.yml's scenario once per policy through the containers,
# compressed to DURATION_S seconds (load levels kept), and print `make demo`'s
# table. Each policy gets a fresh AP, workers and certificates; the model zoo
# volume is built once and kept (`make compose-clean` removes it).
# COMPOSE_POLICIES: comma-separated policies; PLAINTEXT=1: no TLS between containers.
set -euo pipefail
cd "$(dirname "$0")/.."

POLICIES="${COMPOSE_POLICIES:-fastest,least-loaded,learned}"
export DURATION_S="${DURATION_S:-16}"
PROJECT="${COMPOSE_PROJECT:-apdispatch}"
files=(-f docker-compose.yml)
if [ "${PLAINTEXT:-0}" = 1 ]; then files+=(-f docker-compose.plaintext.yml); fi
compose() { docker-compose -p "$PROJECT" "${files[@]}" "$@"; }

t0=$(date +%s)
docker/engine.sh
docker/build.sh --quiet >/tmp/apdispatch-compose-build.log 2>&1 || {
    tail -n 40 /tmp/apdispatch-compose-build.log
    exit 1
}
t1=$(date +%s)
echo "images built in $((t1 - t0)) s (log: /tmp/apdispatch-compose-build.log)"

# Free host ports for what the compose file publishes: this host runs other
# APs and Prometheus servers.
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }
AP_HOST_PORT=$(free_port)
PROMETHEUS_HOST_PORT=$(free_port)
export AP_HOST_PORT PROMETHEUS_HOST_PORT

# What Prometheus scraped: targets up, and the AP's request counter against
# the requests the load sent (polled: the last scrape comes up to 5 s later);
# fails unless every target is up and the counter adds up.
scraped() {
    python3 - "$PROMETHEUS_HOST_PORT" "$1" <<'PY'
import json, sys, time, urllib.parse, urllib.request
port, sent = sys.argv[1], int(sys.argv[2])
def query(q):
    url = f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(q)}"
    result = json.load(urllib.request.urlopen(url, timeout=5))["data"]["result"]
    return [float(r["value"][1]) for r in result]
counted, up, deadline = 0.0, [], time.monotonic() + 20
while time.monotonic() < deadline:
    try:
        counted = sum(query("sum(apdispatch_ap_requests_total)"))
        up = query("up")
    except OSError:
        pass
    if counted >= sent:
        break
    time.sleep(1)
print(f"prometheus: {int(sum(up))} of {len(up)} targets up; the AP counted {counted:.0f} of {sent} requests")
sys.exit(0 if up and sum(up) == len(up) and counted == sent else 1)
PY
}

out="build/compose/demo-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out"
trap 'compose down --remove-orphans >/dev/null 2>&1 || true' EXIT
# Everything but the load (run below, once the AP is healthy) and Grafana
# (no image here: it is under a profile).
services=$(compose config --services | grep -v -x -e load -e grafana)
pairs=()
status=0
for policy in ${POLICIES//,/ }; do
    s=$(date +%s)
    rm -f build/compose/load.json
    # shellcheck disable=SC2086
    POLICY="$policy" compose up -d --no-build $services >>"$out/compose.log" 2>&1 || {
        echo "policy $policy: docker-compose up failed; logs in $out/$policy.log"
        tail -n 5 "$out/compose.log"
        compose logs --no-color >"$out/$policy.log" 2>&1
        exit 1
    }
    ap=$(compose ps -q ap)
    until [ "$(docker inspect -f '{{.State.Health.Status}}' "$ap")" = healthy ]; do
        if [ "$(docker inspect -f '{{.State.Health.Status}}' "$ap")" = unhealthy ] \
            || [ "$(docker inspect -f '{{.State.Running}}' "$ap")" != true ]; then
            echo "policy $policy: the AP never saw every worker register; logs in $out/$policy.log"
            compose logs --no-color >"$out/$policy.log" 2>&1
            exit 1
        fi
        sleep 1
    done
    POLICY="$policy" compose run --rm --no-deps load >"$out/$policy-load.txt" 2>&1 || {
        echo "policy $policy: the load failed:"
        tail -n 20 "$out/$policy-load.txt"
        compose logs --no-color >"$out/$policy.log" 2>&1
        exit 1
    }
    mv build/compose/load.json "$out/$policy.json"
    sent=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["sent"])' "$out/$policy.json")
    metrics=$(scraped "$sent" 2>&1) || { status=1; metrics="$metrics (FAILED)"; }
    compose logs --no-color >"$out/$policy.log" 2>&1
    hot=$(grep -o '"hot_path": "[^"]*"' "$out/$policy.log" | head -n 1 | cut -d'"' -f4)
    compose down --remove-orphans >>"$out/compose.log" 2>&1
    echo "policy $policy: $(($(date +%s) - s)) s; $metrics; the AP's hot path: ${hot:-not logged}"
    pairs+=("$policy=/reports/$policy.json")
done
t2=$(date +%s)
echo "scenario runs took $((t2 - t1)) s; reports and logs in $out"
echo
docker run --rm -v "$PWD/$out:/reports:ro" apdispatch-ap:latest \
    python -m apdispatch.tools.compose "${pairs[@]}"
exit "$status"
