#!/usr/bin/env bash
# Start the API and the Gradio demo on a finished run, and screenshot each tab with headless
# Chromium (Debian's `chromium` package) into docs/screenshots/. Usage:
#   bench/screenshot_demo.sh [WORKDIR]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
wd="$(realpath "${1:-$root}")"
py="$("$root/scripts/ensure_venv.sh")"
out="$root/docs/screenshots"; mkdir -p "$out"
cd "$root"
"$py" -m medvl.http.server --workdir "$wd" --port 8765 --max-new-tokens 48 >/tmp/medvl_api.log 2>&1 & api=$!
MEDVL_API_URL=http://127.0.0.1:8765 "$py" -m medvl.http.demo_ui --port 7865 >/tmp/medvl_ui.log 2>&1 & ui=$!
trap 'kill $api $ui 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -fs http://127.0.0.1:8765/health >/dev/null && curl -fs http://127.0.0.1:7865 >/dev/null && break; sleep 1; done
"$py" "$root/bench/screenshot_tabs.py" http://127.0.0.1:7865 "$out" "$wd"
