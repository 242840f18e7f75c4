# ONE command to set up, ONE to test (README). .ci/run runs exactly these two.
.PHONY: setup test test-fast lint docs drift
setup:
	bash scripts/setup.sh

test: lint docs
	.venv/bin/python -m pytest -q

test-fast:
	.venv/bin/python -m pytest -q -m "not slow"

lint:
	.venv/bin/ruff check .

# The docs site (mkdocs.yml, docs/) into build/site (git-ignored), warnings as errors.
docs:
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet

drift:
	bash scripts/drift.sh
