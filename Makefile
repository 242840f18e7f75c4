# ONE command to set up, ONE to test (README). .ci/run runs exactly these two.
.PHONY: setup test test-fast lint drift
setup:
	bash scripts/setup.sh

test: lint
	.venv/bin/python -m pytest -q

test-fast:
	.venv/bin/python -m pytest -q -m "not slow"

lint:
	.venv/bin/ruff check .

drift:
	bash scripts/drift.sh
