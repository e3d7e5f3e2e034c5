#!/usr/bin/env bash
# The demo's browser test (tests/test_demo_browser.py) drives Debian's chromium through its
# chromedriver. Install both when missing and this runs as root (CI does, through `make test`);
# otherwise say how, and the test skips (it fails instead when CI is set).
set -euo pipefail
command -v chromium >/dev/null && command -v chromedriver >/dev/null && exit 0
if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
  echo "installing chromium and chromium-driver for the demo's browser test" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
else
  echo "note: the browser test needs chromium and chromium-driver (sudo apt-get install chromium chromium-driver)" >&2
fi
