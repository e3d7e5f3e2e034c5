#!/usr/bin/env bash
# The deployment tests (tests/test_deploy.py) run real tools: Debian's prometheus (promtool) and
# haproxy, and kubernetes-validate + checkov in a venv of their own (.venv-deploy: checkov's
# dependencies must not move the project's pins). Installs what is missing; as root for apt.
# Without them the tests skip, and fail under CI.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null || ! command -v haproxy >/dev/null; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    echo "installing prometheus and haproxy for the deployment tests" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus haproxy >/dev/null
  else
    echo "note: the deployment tests need prometheus and haproxy (sudo apt-get install prometheus haproxy)" >&2
  fi
fi
# Chosen together: kubernetes-validate bundles the schemas up to Kubernetes 1.37.
if [[ ! -x .venv-deploy/bin/checkov || ! -x .venv-deploy/bin/kubernetes-validate ]]; then
  echo "installing kubernetes-validate and checkov into .venv-deploy" >&2
  python3 -m venv .venv-deploy
  .venv-deploy/bin/pip install -q kubernetes-validate==1.37.0 checkov==3.3.30 > .venv-deploy/install.log 2>&1 \
    || { cat .venv-deploy/install.log >&2; exit 1; }
fi
