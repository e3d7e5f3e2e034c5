# make test      - set up .venv on first use, lint, run the test suite (what CI runs)
# make pipeline  - run the whole pipeline on the tiny profile
# make lint      - ruff on the code, hadolint on the Dockerfile
.PHONY: test lint pipeline clean-outputs

test: lint
	@py=$$(scripts/ensure_venv.sh) && $$py -m pytest -q

lint:
	@py=$$(scripts/ensure_venv.sh) && $$py -m ruff check medvl scripts api bench tests \
	  && if [ -f Dockerfile ]; then $$(dirname $$py)/hadolint Dockerfile; fi

pipeline:
	./run_pipeline.sh

clean-outputs:
	rm -rf models datasets benchmarks logs docs/BUILD_LOG.md
