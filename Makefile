# Set-up and the main jobs. Everything a fresh machine needs is installed here.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CLI    := $(VENV)/bin/codeaccel

# llama.cpp's native build crashes on this CPU in ggml's AMX kernels; this portable
# AVX-512 build is verified to work (see DEVELOPERS.md).
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
                    -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON

.PHONY: install demo test test-unit test-realmodel clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	# bubblewrap (Debian): the sandbox's read-only filesystem and pid namespace; needs root to install.
	@command -v bwrap >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; \
	  else echo "warning: bubblewrap is missing: the sandbox runs without filesystem isolation (docs/sandbox.md)"; fi; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip wheel setuptools
	# torch first and pinned: the CPU wheel; an unpinned torch pulls GBs of CUDA packages.
	$(PY) -m pip install --quiet torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(PY) -m pip install --quiet llama-cpp-python==0.3.36
	$(PY) -m pip install --quiet -e ".[llama,hf,models,dev]"
	$(CLI) models fetch all
	touch $@

demo: install
	$(CLI) bench humaneval --limit 20 --model qwen2.5-coder-1.5b-instruct --engine llama.cpp

test: install
	$(PY) -m pytest

test-unit: install
	$(PY) -m pytest -m "not realmodel"

test-realmodel: install
	$(PY) -m pytest -m realmodel

clean:
	rm -rf $(VENV) .pytest_cache
