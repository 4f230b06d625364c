#!/usr/bin/env bash
# Builds Jaeger (the OTLP collector and query API the tracing tests send spans to) from the Go
# module in tests/jaeger, once: the binary is cached by version, and its path is printed.
set -euo pipefail
cd "$(dirname "$0")/../tests/jaeger"
if [ -d /usr/local/go/bin ]; then
    export PATH="$PATH:/usr/local/go/bin"
fi
version="$(go list -m -f '{{.Version}}' github.com/jaegertracing/jaeger)"
cache="${MESHCTL_TOOL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/meshctl}/jaeger-$version"
if [ ! -x "$cache/jaeger" ]; then
    mkdir -p "$cache"
    printf 'build-jaeger.sh: go build jaeger %s into %s (takes minutes, once)\n' "$version" "$cache" >&2
    # Built to a temporary name and moved: an interrupted build leaves no half binary behind.
    go build -o "$cache/jaeger.partial" github.com/jaegertracing/jaeger/cmd/jaeger
    mv "$cache/jaeger.partial" "$cache/jaeger"
fi
printf '%s\n' "$cache/jaeger"
