# ONE command to set up, ONE to test (README). .ci/run runs exactly these two.
.PHONY: setup test test-fast
setup:
	bash scripts/setup.sh

test:
	.venv/bin/python -m pytest -q

test-fast:
	.venv/bin/python -m pytest -q -m "not slow"
