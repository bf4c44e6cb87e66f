# The two commands a fresh Debian/Ubuntu machine needs (each sets up everything it uses):
#   make demo   mount an offline sample DCOR (devserver + dcorfs) at /tmp/dcorfs-demo
#   make test   lint, type-check and run the whole test suite
#   make test-fast   the tiers without FUSE (tests/unit, tests/layers), for quick iterations
VENV := .venv/bin

.PHONY: demo test test-fast check bench clean

demo:
	@scripts/bootstrap.sh devserver
	$(VENV)/dcorfs demo $${DEMO_MOUNT:-/tmp/dcorfs-demo}

test: check
	$(VENV)/pytest --durations=15

test-fast: check
	$(VENV)/pytest tests/unit tests/layers -m "not fuse and not slow" -n 2 --dist loadfile

check:
	@scripts/bootstrap.sh test
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .
	$(VENV)/mypy

bench:
	@scripts/bootstrap.sh test
	$(VENV)/python benchmarks/run.py --events 20000,100000 --repeat 3 --latency 20 --json bench.json

clean:
	rm -rf .venv build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
