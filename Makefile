# make test      - set up .venv on first use, lint, run the test suite (what CI runs); as root it
#                  installs chromium + chromium-driver for the demo's browser test when missing,
#                  and prometheus, haproxy (apt) and kubernetes-validate, checkov (.venv-deploy)
#                  for the deployment tests, and postgresql (apt) for the review store's tests
# make pipeline  - run the whole pipeline on the tiny profile
# make lint      - ruff on the code, the import contracts of the package's layers, hadolint
#                  on the Dockerfile
.PHONY: test lint pipeline clean-outputs

# An interpreter of one's own (MEDVL_PYTHON) has no editable install: the repository goes on its
# PYTHONPATH, as run_pipeline.sh does, so the scripts the tests start import the package.
# --durations: the slowest tests, printed where CI shows them (CI must stay under 35 minutes).
test: lint
	@scripts/ensure_browser.sh
	@scripts/ensure_deploy_tools.sh
	@scripts/ensure_database.sh
	@py=$$(scripts/ensure_venv.sh) && if [ -n "$${MEDVL_PYTHON:-}" ]; then \
	  export PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}"; fi && $$py -m pytest -q --durations=20

lint:
	@py=$$(scripts/ensure_venv.sh) && $$py -m ruff check medvl scripts api bench tests \
	  && $$(dirname $$py)/lint-imports --no-cache \
	  && if [ -f Dockerfile ]; then $$(dirname $$py)/hadolint Dockerfile; fi

pipeline:
	./run_pipeline.sh

clean-outputs:
	rm -rf models datasets benchmarks logs docs/BUILD_LOG.md
