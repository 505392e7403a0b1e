# One command each on a fresh clone: `make demo`, `make test` (both install into .venv first if needed).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU machines: install the CPU torch build *before* megatron-core, else pip resolves a multi-GB CUDA torch.
CPU_TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
# `make test` runs two pytest-xdist workers (the suite keeps one of the two cores idle on its own: subprocess
# start-ups, servers, daemons); each test file is one group (tests/conftest.py). PYTEST_WORKERS=0: one process.
PYTEST_WORKERS ?= 2

.PHONY: install test test-fast demo demo-convert lint format bench bench-gpu gpu-smoke clean sglang-venv slurm-packages

install: $(STAMP)

# On a CUDA machine the venv sees the system's packages (--system-site-packages): the image's CUDA torch,
# TransformerEngine and SGLang, which are built against it and cannot be pip-installed here.
$(STAMP): pyproject.toml
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		test -x $(BIN)/python || $(PYTHON) -m venv --system-site-packages $(VENV); \
		echo "CUDA machine: keeping the system's (CUDA) torch, TE and SGLang"; \
	else \
		test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); \
		$(BIN)/pip install -q "$(CPU_TORCH)"; \
	fi
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# A real sglang 0.5.23 server for the tests, in a venv of its own (it pins torch 2.14.1 / transformers 5.19.0).
SGLANG_VENV := .venv-sglang
SGLANG_STAMP := $(SGLANG_VENV)/.installed-0.5.23

sglang-venv: $(SGLANG_STAMP)

$(SGLANG_STAMP): tools/sglang_cpu/build_venv.sh
	PYTHON=$(PYTHON) bash tools/sglang_cpu/build_venv.sh $(SGLANG_VENV)

# Debian's slurm-wlm + munge for the real-Slurm tests (tests/test_slurm_real.py): apt-get as root, a no-op when
# installed; without root/apt the tests skip. Not a prerequisite of `test`: it installs system packages.
slurm-packages:
	bash tools/slurm/install_packages.sh

test: install sglang-venv
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup -m "not dist and not e2e and not slow and not slurm" $(PYTEST_ARGS)

demo: install
	$(BIN)/python tools/demo.py

demo-convert: install
	$(BIN)/python tools/demo_convert.py

lint: install
	$(BIN)/ruff check spin_megatron tools tests bench
	$(BIN)/ruff format --check spin_megatron tools tests bench

format: install
	$(BIN)/ruff format spin_megatron tools tests bench
	$(BIN)/ruff check --fix spin_megatron tools tests bench

bench: install
	$(BIN)/python bench/logprob.py
	$(BIN)/python bench/weight_sync.py

# GPU targets install nothing and need no package index (a lent GPU machine has none): they run .venv's python
# when it exists (`make install` on a machine with an index), else the image's python3, with the repository and
# the carried wheels (.whl/, those the image lacks, unpacked into GPU_SITE) on PYTHONPATH.
GPU_SITE ?= /tmp/spin-site
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
# .gpucheck/ (the carried tokenizer and GSM8K rows) is the data where it exists
GPU_ENV = PYTHONPATH=$(GPU_SITE):$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} \
	$(if $(wildcard .gpucheck),SPIN_SHARED_DATA=$(CURDIR)/.gpucheck)

.PHONY: gpu-check-prepare gpu-check gpu-site
# the carried wheels the image lacks, into GPU_SITE (never the image's environment, never from an index)
gpu-site:
	@if [ -d .whl ]; then \
		W=$$($(GPU_PYTHON) tools/gpu_check_prepare.py --not-in-image .whl) || exit 1; \
		[ -z "$$W" ] || $(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --target $(GPU_SITE) $$W; \
	fi

# SPIN_REQUIRE_TE=1 / SPIN_REQUIRE_SGLANG=1: a missing TE / SGLang fails the GPU tests instead of skipping them
gpu-smoke: gpu-site
	$(GPU_ENV) $(GPU_PYTHON) -m pytest -m gpu -v $(PYTEST_ARGS)

bench-gpu: gpu-site
	$(GPU_ENV) $(GPU_PYTHON) bench/mfu_gpu.py

# The GPU proof (tools/gpu_check.py): prepare on a CPU machine with an index (wheels and data into .whl/ and
# .gpucheck/, under 20 MB), run on the GPU machine
gpu-check-prepare: install
	$(BIN)/python tools/gpu_check_prepare.py

gpu-check: gpu-site
	$(GPU_ENV) $(GPU_PYTHON) tools/gpu_check.py --out gpu_check_out

clean:
	rm -rf $(VENV) $(SGLANG_VENV) .pytest_cache .ruff_cache

# TRL comparison in its own venv (.venv-bench): TRL is not a dependency of the project. CPU torch first, else pip
# resolves a CUDA build; trl pinned because OnlineDPOTrainer lives in trl.experimental (unstable API).
BENCH_VENV := .venv-bench
TRL_VERSION ?= 1.16.0
.PHONY: bench-trl bench-scaling

$(BENCH_VENV)/.installed: pyproject.toml
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q "$(CPU_TORCH)"
	$(BENCH_VENV)/bin/pip install -q -e . "trl==$(TRL_VERSION)"
	touch $@

bench-trl: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python bench/step_vs_trl.py

bench-scaling: install
	$(BIN)/python bench/scaling.py
