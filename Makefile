# The commands of the README: `make test`, `make demo` and `make study`. All set up .venv first,
# from the committed lock (locks/), so that an upstream release cannot break them.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch that the lock was resolved with (the GPU lock takes the same version).
TORCH_VERSION := 2.13.0
HAS_GPU := $(shell nvidia-smi >/dev/null 2>&1 && echo 1)
LOCK := locks/$(if $(HAS_GPU),gpu,cpu).txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# DeepSpeed JIT-builds its CPU ops (shm comm) on first use; kept with this .venv, so that another
# environment's build of them (torch's default cache is per user) never forces a rebuild here.
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions

.PHONY: setup test demo study lint bench gpu-check lock clean

setup: $(STAMP)

# Exactly the locked versions. Without an NVIDIA driver, torch goes first so that pip takes the CPU
# build and never pulls the CUDA wheels; with one, the same version with CUDA. flash-attn (the `gpu`
# extra, pinned in locks/gpu.txt) compiles against the installed torch, so it is left to
# `pip install -c locks/gpu.txt -e '.[gpu]' --no-build-isolation`.
$(STAMP): pyproject.toml $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(if $(HAS_GPU),,$(PY) -m pip install -q -c $(LOCK) torch)
	$(PY) -m pip install -q -c $(LOCK) -e '.[dev]'
	@touch $(STAMP)

# Re-resolve both locks to the newest versions pyproject.toml allows, in a scratch environment.
# Then `make test`, and commit the locks with the suite's result (README, "Upgrading").
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q 'torch==$(TORCH_VERSION)'
	.lock-venv/bin/pip install -q -e '.[dev]'
	{ echo "# make lock, $$(date -u +%F): the CPU set make test passed with; pip install -c this file."; \
	  .lock-venv/bin/pip freeze --all --exclude-editable | grep -v '^pip==' | sed 's/+cpu$$//'; \
	} > locks/cpu.txt.tmp && mv locks/cpu.txt.tmp locks/cpu.txt
	fa=$$(.lock-venv/bin/pip index versions flash-attn 2>/dev/null | sed -n 's/^flash-attn (\(.*\))$$/\1/p'); \
	test -n "$$fa" || { echo "make lock: no flash-attn version found" >&2; exit 1; }; \
	{ echo "# make lock, $$(date -u +%F): the CPU lock's versions (torch with CUDA) and the gpu extra."; \
	  echo "# flash-attn cannot be resolved without a CUDA build: pinned to the newest release."; \
	  grep -v '^#' locks/cpu.txt; echo "flash-attn==$$fa"; \
	} > locks/gpu.txt.tmp && mv locks/gpu.txt.tmp locks/gpu.txt
	rm -rf .lock-venv

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

demo: setup
	$(PY) launch/demo.py

study: setup
	$(PY) launch/study.py --config configs/study-cpu.yaml

bench: setup
	$(PY) launch/bench_throughput.py --preset cpu

# Every GPU-only check (cuda tests, gpt2 benchmarks, kernel report) into runs/gpu-check/report.md.
gpu-check: setup
	$(PY) launch/gpu_check.py

clean:
	rm -rf $(VENV) .lock-venv runs/demo runs/study
