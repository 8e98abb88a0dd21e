PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision are pinned to the builds this machine class ships (pip takes them from local disk).
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

.PHONY: setup browser demo test test-all bench zoo clean world
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

# Re-train the shipped micro LoRA zoo (carlos_ray/world/zoo/) from its seeds: two 1-thread processes, ~30 min.
zoo: setup
	$(BIN)/python -m carlos_ray.world.zoo_train --jobs 2 --cache out/zoo_runs

bench: setup
	mkdir -p bench_results
	$(BIN)/python benchmarks/bench_consistency.py --out bench_results/consistency.json
	$(BIN)/python benchmarks/bench_query.py --out bench_results/query.json
	$(BIN)/python benchmarks/bench_rank.py --out bench_results/rank.json
	$(BIN)/python benchmarks/bench_index.py --out bench_results/index.json
	$(BIN)/python benchmarks/bench_serve.py --out bench_results/serve.json
	$(BIN)/python benchmarks/bench_commit.py --out bench_results/commit.json
	$(BIN)/python benchmarks/bench_zoo.py --out bench_results/zoo.json
	$(BIN)/python benchmarks/bench_eval.py --config conf/micro.yaml --heldout conf/prompts/micro_heldout_prompts.yaml --repeat --report bench_results/eval_report --out bench_results/eval.json
	$(BIN)/python benchmarks/bench_behavior.py --out bench_results/behavior.json
	$(BIN)/python benchmarks/bench_real_signatures.py --out bench_results/real_signatures.json
	$(BIN)/python benchmarks/bench_adaptive.py --config conf/micro.yaml --loras carlos_ray/world/zoo --seeds 8 --prompt-subset "" --workdir bench_results/adaptive_work --out bench_results/adaptive.json
	$(BIN)/python benchmarks/bench_adaptive_replay.py bench_results/adaptive_work/index_full

# Retrain the micro world's models (VAE + CLIP in parallel, then UNet + text encoders) into
# carlos_ray/world/weights/, then measure them against the pixel oracle. CI and `make demo` never run this.
world: setup
	$(BIN)/python -m carlos_ray.world.train all
	mkdir -p bench_results
	$(BIN)/python benchmarks/bench_world.py --out bench_results/world.json --grid bench_results/world_grid.png

clean:
	rm -rf demo_out bench_results .pytest_cache
