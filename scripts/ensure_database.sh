#!/usr/bin/env bash
# The review store's tests (tests/test_review_store.py) run it on a real PostgreSQL: Debian's
# postgresql, started by the tests in a folder of their own (initdb + pg_ctl, tests/conftest.py).
# Installs it when missing; as root for apt. Without it those tests skip, and fail under CI.
set -euo pipefail
if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    echo "installing postgresql for the review store's tests" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  else
    echo "note: the review store's tests need PostgreSQL (sudo apt-get install postgresql)" >&2
  fi
fi
