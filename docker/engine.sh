#!/usr/bin/env bash
# A Docker engine for `make compose-demo`: installs Debian's docker.io,
# docker-compose and debootstrap when missing, and starts dockerd (log in
# /tmp/dockerd.log) when nothing answers on its socket.
set -euo pipefail

if ! command -v dockerd >/dev/null || ! command -v docker-compose >/dev/null \
    || ! command -v debootstrap >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-compose debootstrap >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
    nohup dockerd >/tmp/dockerd.log 2>&1 &
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && break
        sleep 1
    done
    docker info >/dev/null 2>&1 || { echo "dockerd did not start: see /tmp/dockerd.log" >&2; exit 1; }
fi
