#!/usr/bin/env bash
# Write docker/seccomp-uffd.json: Docker's default seccomp profile plus one
# rule that allows userfaultfd(2).
#
# Docker's default profile answers userfaultfd(2) with EPERM.  Rather than keep
# a hand-edited copy of moby's profile in this repository, the profile is
# generated from the one that matches the installed daemon: Debian ships it in
# golang-github-docker-docker-dev (profiles/seccomp/default.json), whose .deb
# is downloaded (not installed: it would pull in Go sources) and read with
# dpkg-deb.  DOCKER_DEFAULT_SECCOMP=PATH uses another copy of the default
# profile instead.
#
# Cached: an existing output that is newer than this script is kept.
#
# Usage: docker/make-seccomp-profile.sh [OUT]   (default docker/seccomp-uffd.json)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${1:-$here/seccomp-uffd.json}
member=./usr/share/gocode/src/github.com/docker/docker/profiles/seccomp/default.json
devpkg=golang-github-docker-docker-dev

log() { printf 'make-seccomp-profile: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

if [[ -s $out && $out -nt ${BASH_SOURCE[0]} && -z ${DOCKER_DEFAULT_SECCOMP:-} ]]; then
    log "$out is up to date"
    exit 0
fi

workdir=$(mktemp -d /tmp/uffd-seccomp.XXXXXX)
trap 'rm -rf "$workdir"' EXIT

default=${DOCKER_DEFAULT_SECCOMP:-}
if [[ -z $default && -f ${member#.} ]]; then
    default=${member#.}
fi
if [[ -z $default ]]; then
    # The arch-all dev package shares the daemon's version, less a binNMU suffix (+bN).
    version=$(dpkg-query -W -f='${Version}' docker.io 2>/dev/null | sed 's/+b[0-9]*$//' || true)
    (
        cd "$workdir"
        if [[ -n $version ]] && apt-get download -qq "$devpkg=$version" >/dev/null 2>&1; then
            exit 0
        fi
        log "no $devpkg matching docker.io ${version:-(not installed)}; taking the candidate"
        apt-get download -qq "$devpkg" >/dev/null 2>&1 \
            || { apt-get update -qq && apt-get download -qq "$devpkg" >/dev/null; }
    ) || die "cannot download $devpkg (Docker's default seccomp profile)"
    dpkg-deb --fsys-tarfile "$workdir"/"$devpkg"_*.deb | tar -xO "$member" >"$workdir/default.json" \
        || die "$devpkg has no $member"
    default=$workdir/default.json
fi

python3 - "$default" "$out.tmp" <<'EOF'
import json
import sys

src, dst = sys.argv[1], sys.argv[2]
with open(src) as f:
    profile = json.load(f)
if not profile.get("syscalls") or profile.get("defaultAction") == "SCMP_ACT_ALLOW":
    sys.exit(f"{src} does not look like Docker's default (deny-by-default) profile")
# Drop any earlier rule naming userfaultfd, then allow it unconditionally. The
# kernel still applies its own check: without CAP_SYS_PTRACE (which containers
# lack) and with vm.unprivileged_userfaultfd=0, only UFFD_USER_MODE_ONLY
# descriptors are granted.
for rule in profile["syscalls"]:
    rule["names"] = [n for n in rule["names"] if n != "userfaultfd"]
profile["syscalls"] = [r for r in profile["syscalls"] if r["names"]]
profile["syscalls"].append({
    "names": ["userfaultfd"],
    "action": "SCMP_ACT_ALLOW",
    "args": [],
    "comment": "uffd-migrate: postcopy migration resolves page faults with userfaultfd",
    "includes": {},
    "excludes": {},
})
with open(dst, "w") as f:
    json.dump(profile, f, indent=1)
    f.write("\n")
EOF
mv "$out.tmp" "$out"
log "wrote $out (Docker's default profile from $([[ $default == "$workdir"/* ]] && echo "$devpkg" || echo "$default") + userfaultfd)"
