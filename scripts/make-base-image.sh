#!/usr/bin/env bash
# Build the local base image uffd-migrate-base:local from Debian bookworm.
#
# No container registry is reachable from our machines, so the image the
# Dockerfile starts FROM is made here: debootstrap a minbase bookworm with
# python3 and venv, then `docker import` the root filesystem (the approach of
# moby's contrib/mkimage.sh).  The mirror is the Debian archive this machine's
# apt already uses, read from /etc/apt/sources.list* at run time; set
# DEBIAN_MIRROR to override it.
#
# Cached: when the image exists, this does nothing.  FORCE=1 rebuilds it.
#
# Usage: scripts/make-base-image.sh [IMAGE]   (default uffd-migrate-base:local)
set -euo pipefail

image=${1:-${BASE_IMAGE:-uffd-migrate-base:local}}
suite=bookworm
packages=python3,python3-venv,python3-pip,ca-certificates

log() { printf 'make-base-image: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

if [[ ${FORCE:-0} != 1 ]] && docker image inspect "$image" >/dev/null 2>&1; then
    log "$image exists, nothing to do"
    exit 0
fi

[[ $(id -u) == 0 ]] || die "debootstrap needs root"

if ! command -v debootstrap >/dev/null 2>&1; then
    log "installing debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

# Print the first URI from apt's sources that serves the Debian archive for
# $suite: one-line "deb URI SUITE ..." entries and deb822 stanzas alike.
# Security and third-party repositories are skipped: the archive's path ends
# in /debian.
find_mirror() {
    local files=() f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] && files+=("$f")
    done
    ((${#files[@]})) || return 1
    awk -v suite="$suite" '
        function candidate(uri, suites,   n, i, s) {
            sub(/\/+$/, "", uri)
            if (found || uri !~ /^https?:\/\/.*\/debian$/) return
            n = split(suites, s, /[ \t]+/)
            for (i = 1; i <= n; i++) if (s[i] == suite) { print uri; found = 1; exit }
        }
        # one-line format: deb [options] URI SUITE COMPONENTS...
        /^[ \t]*deb[ \t]/ {
            line = $0; sub(/\[[^]]*\]/, "", line)
            split(line, w, /[ \t]+/)
            i = (w[1] == "") ? 2 : 1
            candidate(w[i + 1], w[i + 2])
            next
        }
        # deb822 format: stanzas separated by blank lines
        /^[ \t]*$/ { if (types ~ /(^| )deb( |$)/) candidate(uris, suites); types = uris = suites = ""; next }
        /^Types:/  { types = $0;  sub(/^Types:[ \t]*/, "", types) }
        /^URIs:/   { uris = $0;   sub(/^URIs:[ \t]*/, "", uris); sub(/[ \t].*/, "", uris) }
        /^Suites:/ { suites = $0; sub(/^Suites:[ \t]*/, "", suites) }
        END { if (types ~ /(^| )deb( |$)/) candidate(uris, suites) }
    ' "${files[@]}"
}

mirror=${DEBIAN_MIRROR:-$(find_mirror || true)}
[[ -n $mirror ]] || die "no Debian $suite mirror found in /etc/apt/sources.list*; set DEBIAN_MIRROR"

workdir=$(mktemp -d /tmp/uffd-migrate-base.XXXXXX)
cleanup() { rm -rf --one-file-system "$workdir"; }
trap cleanup EXIT
rootfs=$workdir/rootfs

start=$SECONDS
log "debootstrap --variant=minbase $suite from $mirror"
if ! debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror" \
        >"$workdir/debootstrap.log" 2>&1; then
    tail -n 30 "$workdir/debootstrap.log" >&2
    [[ -f $rootfs/debootstrap/debootstrap.log ]] && tail -n 30 "$rootfs/debootstrap/debootstrap.log" >&2
    die "debootstrap failed"
fi

# Keep the image small: downloaded packages and apt lists are not needed at run time.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/tmp/*

log "docker import $image"
tar --numeric-owner -C "$rootfs" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    - "$image" >/dev/null
log "built $image in $((SECONDS - start))s"
