# Sourced by scripts/test and scripts/demo: what building uffd-migrate needs on a fresh machine
# (Python 3 with venv, a C compiler, OpenSSL's headers), installed with apt when we are root,
# else named with the command that installs it.  `prog` is the calling script's name.

# apt_install PACKAGE...: installs quietly (refreshing the package lists once if needed); 1 if it cannot.
apt_install() {
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 1
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "$@" >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "$@" >/dev/null 2>&1; }
}

# need WHAT TEST PACKAGE: when the shell test TEST fails, installs PACKAGE or exits with a hint.
need() {
    local what=$1 test=$2 package=$3
    eval "$test" && return 0
    echo "$prog: installing $package ($what, once)..." >&2
    apt_install "$package" && eval "$test" && return 0
    echo "$prog: $what missing; hint: apt-get install $package" >&2
    exit 1
}

# need_build_tools: everything `pip install -e .` needs to build the native module.
need_build_tools() {
    need "Python 3" "command -v \"${PYTHON:-python3}\" >/dev/null" python3
    need "Python's venv module" "\"${PYTHON:-python3}\" -c 'import ensurepip' 2>/dev/null" python3-venv
    need "a C compiler" "command -v cc >/dev/null || command -v gcc >/dev/null" gcc
    need "OpenSSL's headers (TLS)" "[ -e /usr/include/openssl/ssl.h ]" libssl-dev
}
