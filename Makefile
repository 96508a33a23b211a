# The commands of the README: `make test`, `make demo` and `make study`. All set up .venv first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# DeepSpeed JIT-builds its CPU ops (shm comm) on first use; kept with this .venv, so that another
# environment's build of them (torch's default cache is per user) never forces a rebuild here.
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions

.PHONY: setup test demo study lint bench gpu-check clean

setup: $(STAMP)

# Without an NVIDIA driver, pin torch first so pip takes the CPU build and never pulls the CUDA
# wheels; with one, the resolver picks torch with CUDA. flash-attn (the `gpu` extra) compiles
# against the installed torch, so it is left to `pip install -e '.[gpu]' --no-build-isolation`.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if ! (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1); then \
		$(PY) -m pip install -q 'torch==2.13.0'; \
	fi
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check .

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
	rm -rf $(VENV) runs/demo runs/study
