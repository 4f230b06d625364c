#!/usr/bin/env bash
# Installs the peers, runs the load benchmarks (pytest-benchmark) and prints the results table.
# Not part of CI: takes ~10-15 minutes and both cores. Knobs: BENCH_ROUNDS, BENCH_SECONDS,
# BENCH_WARMUP_SECONDS, BENCH_NICE, MESHCTL (command that runs meshctl), BENCH_MTLS=0 (skip the mTLS
# mesh-path run); extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-bench-deps.sh || exit $?
PATH="$PATH:$(go env GOPATH 2>/dev/null || echo "$HOME/go")/bin"
# The report quotes the exact command, including any knob that was set.
knobs=""
for knob in BENCH_ROUNDS BENCH_SECONDS BENCH_WARMUP_SECONDS BENCH_NICE MESHCTL; do
    [ -n "${!knob:-}" ] && knobs+="$knob=${!knob} "
done
export PATH MESHCTL_BENCH=1 BENCH_COMMAND="${knobs}bash benchmarks/run.sh${*:+ $*}"
# The mTLS mesh-path run keeps its own shorter defaults unless the caller set these.
user_rounds="${BENCH_ROUNDS:-}" user_seconds="${BENCH_SECONDS:-}"
export BENCH_ROUNDS="${BENCH_ROUNDS:-5}" BENCH_SECONDS="${BENCH_SECONDS:-10}" BENCH_WARMUP_SECONDS="${BENCH_WARMUP_SECONDS:-2}"

mkdir -p benchmarks/results
rm -f benchmarks/results/raw.json
# Our own ini keeps the repository's pytest settings (trio mode, CI addopts) out of this run.
python3 -m pytest -c benchmarks/pytest.ini benchmarks \
    --benchmark-json=benchmarks/results/pytest-benchmark.json "$@"
status=$?

# The mTLS mesh path (two sidecars per peer, its own runner and table; ~3 minutes). BENCH_MTLS=0 skips it.
if [ "${BENCH_MTLS:-1}" != 0 ]; then
    echo
    BENCH_ROUNDS="${user_rounds:-3}" BENCH_SECONDS="${user_seconds:-5}" python3 -m benchmarks.mtls_mesh || status=$?
fi

echo
if [ -f benchmarks/results/raw.json ]; then
    python3 -m benchmarks.report benchmarks/results/raw.json --out benchmarks/results/latest.md
    echo "(written to benchmarks/results/latest.md)"
fi
exit $status
