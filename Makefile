# The two commands of the README: `make run` (the embedded default cell) and `make test` (everything,
# what CI runs). Set-up installs exactly requirements.lock and is skipped when nothing changed.
.PHONY: setup setup-test run test test-fast test-latest lock lint bench

# The unit tier: everything but the tests that run sweeps, train, benchmark or start Ray for real.
FAST = -m "not slow and not ray"

setup:
	@bash scripts/setup.sh

setup-test:
	@bash scripts/setup.sh test

run: setup
	.venv/bin/python launch.py $(ARGS)

test: setup-test
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)

test-fast: setup-test
	.venv/bin/python -m pytest -q $(FAST) $(PYTEST_ARGS)

# The newest versions pyproject.toml's ranges allow, in their own environment, on the unit tier:
# finds drift from the lock on purpose, not by surprise.
test-latest:
	@LATEST=1 VENV=.venv-latest bash scripts/setup.sh test
	.venv-latest/bin/python -m pip list --format=freeze | grep -iE '^(transformers|tokenizers|ray|hydra-core|wandb|pandas|pyarrow|accelerate)=='
	.venv-latest/bin/python -m pytest -q $(FAST) --deselect tests/test_lock.py::test_environment_is_the_lock $(PYTEST_ARGS)

lock:
	@bash scripts/lock.sh

lint: setup-test
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

bench: setup
	.venv/bin/python -m mmflow.bench --geometry llava-1.5
	.venv/bin/python -m mmflow.bench --geometry llava-next
