#!/usr/bin/env bash
# Builds every image of docker-compose.yml on this host from nothing, with no
# image registry: the base image (docker/base-image.sh, skipped when present),
# then the roles' images on it. The images trust this host's extra CA
# certificates (pip behind a TLS-inspecting proxy), and when pip here finds
# wheels in a local folder (pip's find-links: the CPU build of torch), the
# builds get that folder, served on loopback, instead of the CPU wheel index.
# Usage: docker/build.sh [docker-compose build options]
set -euo pipefail
cd "$(dirname "$0")/.."

export BASE_IMAGE="${BASE_IMAGE:-apdispatch-base:bookworm}"
docker/base-image.sh "$BASE_IMAGE"

find docker/ca -name '*.crt' -delete
for crt in /usr/local/share/ca-certificates/*.crt; do
    [ -f "$crt" ] && cp "$crt" docker/ca/
done

server=""
stop_server() { if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; fi; }
trap stop_server EXIT

links="${PIP_FIND_LINKS:-$(python3 -m pip config get global.find-links 2>/dev/null || true)}"
links="${links%% *}"  # the first folder, when several are named
if [ -z "${TORCH_FIND_LINKS:-}" ] && [ -d "$links" ] && ls "$links"/torch-*+cpu-*.whl >/dev/null 2>&1; then
    # A fixed port: the address is a build argument, and a new one would miss
    # the build cache of the layers that install the dependencies.
    port="${WHEELS_PORT:-38517}"
    python3 -m http.server --bind 127.0.0.1 --directory "$links" "$port" >/dev/null 2>&1 &
    server=$!
    for _ in $(seq 50); do
        python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/')" 2>/dev/null && break
        sleep 0.1
    done
    export TORCH_FIND_LINKS="http://127.0.0.1:$port/"
    # The CPU wheel is here: the CPU index is not needed (nor, maybe, reachable).
    export TORCH_INDEX_URL="${TORCH_INDEX_URL-}"
    echo "torch CPU wheel from $links, served at $TORCH_FIND_LINKS"
fi

# One service per image: the services of a role share its image, and compose
# would otherwise build it once per service.
services=$(docker-compose -f docker-compose.yml config | awk '
    /^  [^ ].*:$/ { service = substr($1, 1, length($1) - 1) }
    /^      dockerfile:/ { if (!seen[$2]++) print service }')
# shellcheck disable=SC2086
docker-compose -f docker-compose.yml build "$@" $services
