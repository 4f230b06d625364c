#!/usr/bin/env bash
# Runs the README's first command as a newcomer does: a fresh virtualenv, a non-editable
# `pip install .`, then `meshctl demo` and the single-sidecar example, from the repository root.
# Exits non-zero, saying why, if the demo served 50 requests or fewer, failed any, or the example
# did not answer curl through its sidecar. scripts/test.sh runs it before the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'newcomer: %s\n' "$*" >&2; }
fail() { log "FAILED: $*"; exit 1; }

PYTHON="${PYTHON:-python3}"
work="$(mktemp -d -t meshctl-newcomer-XXXXXX)"
sidecar_pid=""
cleanup() {
    if [ -n "$sidecar_pid" ] && kill -0 "$sidecar_pid" 2>/dev/null; then
        kill -TERM "$sidecar_pid" 2>/dev/null || true
        wait "$sidecar_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

log "fresh virtualenv in $work/venv"
"$PYTHON" -m venv "$work/venv"
# The newcomer's shell after `. venv/bin/activate`: this venv's python, pip and meshctl first.
export PATH="$work/venv/bin:$PATH" VIRTUAL_ENV="$work/venv"
unset PYTHONPATH

log "pip install . (non-editable; builds the Rust engine in release)"
started=$SECONDS
pip install --quiet --disable-pip-version-check . || fail "pip install . failed"
log "installed in $((SECONDS - started))s: $(command -v meshctl)"

# --- the README's first command: meshctl demo, from the repository root ----------------------
log "meshctl demo --duration 20"
status=0
meshctl demo --duration 20 >"$work/demo.log" 2>&1 || status=$?
sed 's/^/  demo | /' "$work/demo.log" >&2
[ "$status" = 0 ] || fail "meshctl demo exited with status $status"
summary="$(grep -E '^traffic: [0-9]+ productpage requests, [0-9]+ failed' "$work/demo.log" || true)"
[ -n "$summary" ] || fail "meshctl demo printed no traffic summary"
requests="$(sed -E 's/^traffic: ([0-9]+) .*/\1/' <<<"$summary")"
failed="$(sed -E 's/.*, ([0-9]+) failed.*/\1/' <<<"$summary")"
[ "$requests" -gt 50 ] || fail "meshctl demo sent $requests requests (more than 50 expected)"
[ "$failed" = 0 ] || fail "meshctl demo: $failed of $requests requests failed"
log "demo: $requests requests, $failed failed"

# --- the single-sidecar example, answering curl through the sidecar ---------------------------
log "meshctl run --bootstrap examples/sidecar.yaml -- python examples/app.py"
meshctl run --bootstrap examples/sidecar.yaml -- python examples/app.py >"$work/sidecar.log" 2>&1 &
sidecar_pid=$!
for _ in $(seq 1 100); do
    grep -q "sidecar ready" "$work/sidecar.log" && break
    kill -0 "$sidecar_pid" 2>/dev/null || { cat "$work/sidecar.log" >&2; fail "meshctl run exited before it was ready"; }
    sleep 0.1
done
answer=""
for _ in $(seq 1 50); do  # the app may still be binding its port when the sidecar is ready
    answer="$(curl -sS -i --max-time 5 http://localhost:15001/ 2>&1)" && grep -q "^HTTP/1.1 200" <<<"$answer" && break
    sleep 0.1
done
sed 's/^/  curl | /' <<<"$answer" >&2
grep -q "^HTTP/1.1 200" <<<"$answer" || fail "curl through the sidecar did not get 200"
grep -q "hello from examples/app.py: GET /" <<<"$answer" || fail "the answer did not come from examples/app.py"
kill -TERM "$sidecar_pid"
status=0
wait "$sidecar_pid" || status=$?
sidecar_pid=""
sed 's/^/  run | /' "$work/sidecar.log" >&2
[ "$status" = 0 ] || fail "meshctl run exited with status $status after SIGTERM"
log "single sidecar: curl got 200 from examples/app.py through the sidecar; SIGTERM gave exit 0"
log "passed"
