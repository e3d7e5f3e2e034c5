#!/usr/bin/env bash
# Create .venv, install requirements.txt and the package itself (editable: medvl, api, bench and
# the medvl-* commands) on first use, or when requirements.txt or pyproject.toml changed.
# Prints the path of the Python to use. MEDVL_PYTHON, if set, is used as is (no venv).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${MEDVL_PYTHON:-}" ]]; then
  echo "$MEDVL_PYTHON"
  exit 0
fi
venv="$root/.venv"
stamp="$venv/.requirements.sha256"
want="$(cat "$root/requirements.txt" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [[ ! -x "$venv/bin/python" || ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  py="$(command -v python3 || true)"
  [[ -n "$py" ]] || { echo "error: python3 (>= 3.10) is needed to create .venv" >&2; exit 1; }
  "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { echo "error: $py is older than Python 3.10" >&2; exit 1; }
  echo "setting up $venv (first run: installs requirements.txt, a few minutes)" >&2
  [[ -x "$venv/bin/python" ]] || "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
  "$venv/bin/python" -m pip install --quiet -r "$root/requirements.txt" >&2
  "$venv/bin/python" -m pip install --quiet --no-deps -e "$root" >&2
  echo "$want" > "$stamp"
fi
echo "$venv/bin/python"
