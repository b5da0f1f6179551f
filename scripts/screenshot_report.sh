#!/usr/bin/env bash
# Render a run's report.html in headless Chromium and save a PNG screenshot.
#
#   scripts/screenshot_report.sh RUN_DIR OUT.png
#
# RUN_DIR is a `cdelta run` / `cdelta eval` directory (or a report.html file). If
# RUN_DIR/report.html does not exist yet it is written first with
# `$PYTHON -m cdelta.report RUN_DIR` (PYTHON defaults to the repo's .venv, else python3).
# Environment: CHROMIUM (browser binary; default: chromium, chromium-browser or
# google-chrome on PATH), WINDOW_SIZE (default 1400,6000), TIMEOUT (seconds, default 120).
# Chromium runs with a throw-away profile, no network services, and no sandbox (for
# containers running as root). Exit status 0 only if OUT.png was written.
set -euo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: $0 RUN_DIR OUT.png" >&2
    exit 2
fi
target=$1
out=$2

if [[ -d "$target" ]]; then
    report="$target/report.html"
    if [[ ! -f "$report" ]]; then
        repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
        python=${PYTHON:-}
        if [[ -z "$python" ]]; then
            if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python=python3; fi
        fi
        "$python" -m cdelta.report "$target" >/dev/null
    fi
else
    report=$target
fi
if [[ ! -f "$report" ]]; then
    echo "error: $report does not exist" >&2
    exit 1
fi

browser=${CHROMIUM:-}
if [[ -z "$browser" ]]; then
    for candidate in chromium chromium-browser google-chrome; do
        if command -v "$candidate" >/dev/null 2>&1; then browser=$candidate; break; fi
    done
fi
if [[ -z "$browser" ]]; then
    echo "error: no chromium found; install it (Debian: apt-get install -y chromium) or set CHROMIUM" >&2
    exit 1
fi

profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
url="file://$(cd "$(dirname "$report")" && pwd)/$(basename "$report")"
out_abs="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"
rm -f "$out_abs"

timeout "${TIMEOUT:-120}" "$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync --hide-scrollbars \
    --user-data-dir="$profile" --screenshot="$out_abs" --window-size="${WINDOW_SIZE:-1400,6000}" "$url" \
    >"$profile/chromium.log" 2>&1 || true

if [[ ! -s "$out_abs" ]]; then
    echo "error: chromium wrote no screenshot; its log:" >&2
    cat "$profile/chromium.log" >&2
    exit 1
fi
echo "$out_abs"
