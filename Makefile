PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision are pinned to the builds this machine class ships (pip takes them from local disk).
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

.PHONY: setup browser demo test test-all bench clean
# Browser tests drive the OS's Chromium (Debian packages chromium + chromium-driver) through Playwright;
# nothing is downloaded by Playwright itself. Installed with apt-get where missing (sudo only if not root).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(BIN)/carlos-ray: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

setup: $(BIN)/carlos-ray browser

browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; else \
		$(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver; \
	fi

demo: setup
	$(BIN)/carlos-ray demo --workdir demo_out

test: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

test-all: setup  # also the slow end-to-end tests (e.g. a non-editable install run from outside the checkout)
	$(BIN)/python -m pytest -q tests

bench: setup
	mkdir -p bench_results
	$(BIN)/python benchmarks/bench_consistency.py --out bench_results/consistency.json
	$(BIN)/python benchmarks/bench_query.py --out bench_results/query.json
	$(BIN)/python benchmarks/bench_rank.py --out bench_results/rank.json
	$(BIN)/python benchmarks/bench_index.py --out bench_results/index.json
	$(BIN)/python benchmarks/bench_serve.py --out bench_results/serve.json
	$(BIN)/python benchmarks/bench_commit.py --out bench_results/commit.json

clean:
	rm -rf demo_out bench_results .pytest_cache
