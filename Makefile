# The two commands a fresh Debian/Ubuntu machine needs (each sets up everything it uses):
#   make demo   serve an offline sample DCOR (the mount of it follows with `dcorfs mount`)
#   make test   lint, type-check and run the whole test suite
VENV := .venv/bin

.PHONY: demo test check clean

demo:
	@scripts/bootstrap.sh devserver
	$(VENV)/dcorfs devserver --port 8765

test: check
	$(VENV)/pytest

check:
	@scripts/bootstrap.sh test
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .
	$(VENV)/mypy

clean:
	rm -rf .venv build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
