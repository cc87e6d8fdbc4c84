# The two commands of the README: `make run` (the embedded default cell) and `make test`.
.PHONY: setup setup-test run test lint bench

setup:
	@bash scripts/setup.sh

setup-test:
	@bash scripts/setup.sh test

run: setup
	.venv/bin/python launch.py $(ARGS)

test: setup-test
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)

lint: setup-test
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

bench: setup
	.venv/bin/python -m mmflow.bench --geometry llava-1.5
	.venv/bin/python -m mmflow.bench --geometry llava-next
