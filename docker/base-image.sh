#!/usr/bin/env bash
# A Debian bookworm base image made locally, for hosts that reach no image
# registry: debootstrap (minbase, with python3, venv, pip and CA certificates)
# from the Debian mirror apt already uses, then `docker import`.
# Skips the work when the image exists. Usage: docker/base-image.sh [NAME]
set -euo pipefail

NAME="${1:-${BASE_IMAGE:-apdispatch-base:bookworm}}"
SUITE=bookworm

if docker image inspect "$NAME" >/dev/null 2>&1; then
    echo "base image $NAME exists"
    exit 0
fi

# The mirror apt is configured with (deb822 sources first, then the classic list).
mirror() {
    local uri
    uri=$(sed -n 's/^URIs:[[:space:]]*//p' /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | tr ' ' '\n' | grep -v -- '-security' | head -n1 || true)
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri=$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' \
            /etc/apt/sources.list)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

MIRROR="${DEBIAN_MIRROR:-$(mirror)}"
ROOTFS=$(mktemp -d /tmp/apdispatch-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT

echo "debootstrap $SUITE from $MIRROR into $ROOTFS"
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    "$SUITE" "$ROOTFS" "$MIRROR" >/tmp/apdispatch-debootstrap.log
# Package lists and caches are of no use in the image.
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
tar -C "$ROOTFS" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' - "$NAME"
echo "imported $NAME"
