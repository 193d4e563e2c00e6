# The two README commands: `make demo` and `make test`. Both create .venv and install everything when needed.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.raygpt-installed
export DS_ACCELERATOR ?= cpu
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: demo demo-chat test test-avx2 install sandbox clean

install: $(STAMP) sandbox

# The code sandbox's backend (bubblewrap, evaluation/code_exec.py) and the system Python it runs programs with. Where
# it cannot be installed (no root, no apt), code tasks are refused with one line; nothing else needs it.
sandbox:
	@if ! command -v bwrap >/dev/null || ! test -x /usr/bin/python3; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
	  ( $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap python3-minimal >/dev/null ) \
	    || echo "note: could not install bubblewrap (apt-get install bubblewrap); code tasks will be refused"; \
	fi

# llama-cpp-python (the `llamacpp` extra) compiles llama.cpp from its sdist: portable AVX2 code rather than this CPU's
# (pip caches the wheel it builds, and a cache may move between machines of one kind), without the vision library.
LLAMA_CMAKE := -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

# Torch first (the CPU wheel), then DeepSpeed built against it, then the project in editable mode.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt --no-build-isolation deepspeed==0.19.8
	CMAKE_ARGS="$(LLAMA_CMAKE)" $(PIP) install --quiet -c constraints.txt -e '.[dev,llamacpp]'
	$(BIN)/python -m evaluation.lm_eval_plugin install  # lets plain `lm_eval --model raygpt` find our model
	touch $(STAMP)

demo: $(STAMP) sandbox
	$(BIN)/raygpt run configs/demo.yaml

# The demo's base model fine-tuned into a GSM8K assistant, evaluated before and after (~10 minutes on 2 cores).
demo-chat: $(STAMP) sandbox
	$(BIN)/raygpt run configs/demo_chat.yaml

test: $(STAMP) sandbox
	$(BIN)/python -m pytest tests

# The tests that depend on CPU kernels (marked `kernels`) again with the ISA forced down to AVX2 (bf16 emulated), so
# that a regression only an AVX2 machine would show fails on any machine. .ci/run runs it after `make test`.
AVX2 := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
test-avx2: $(STAMP) sandbox
	$(AVX2) $(BIN)/python -c "import torch; c = torch.backends.cpu.get_cpu_capability(); assert c == 'AVX2', c"
	$(AVX2) $(BIN)/python -m pytest -m kernels tests

clean:
	rm -rf $(VENV) runs
