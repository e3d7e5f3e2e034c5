#!/usr/bin/env bash
# Start the API and the Gradio demo together (the Docker entrypoint; also runs outside Docker).
# The API loads its model in the background; the demo talks to it over HTTP.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${MEDVL_PYTHON:-python3}"
api_host="${MEDVL_HOST:-0.0.0.0}"
api_port="${MEDVL_PORT:-8000}"
"$py" -m medvl.http.server --host "$api_host" --port "$api_port" "$@" &
api_pid=$!
trap 'kill "$api_pid" 2>/dev/null || true' EXIT INT TERM
MEDVL_API_URL="${MEDVL_API_URL:-http://127.0.0.1:${api_port}}" \
  "$py" -m medvl.http.demo_ui --host "${MEDVL_UI_HOST:-0.0.0.0}" --port "${MEDVL_UI_PORT:-7860}" &
ui_pid=$!
# Exit (and stop the other) as soon as either process ends.
wait -n "$api_pid" "$ui_pid"
status=$?
kill "$api_pid" "$ui_pid" 2>/dev/null || true
exit "$status"
