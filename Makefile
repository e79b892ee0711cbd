# Set-up and the main jobs. Everything a fresh machine needs is installed here.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CLI    := $(VENV)/bin/codeaccel

# llama.cpp's native build crashes on the Intel Xeon VMs in ggml's AMX kernels, so it is built
# without GGML_NATIVE, with the SIMD extensions this CPU reports (/proc/cpuinfo): AVX2 everywhere,
# AVX-512 (+VNNI, BF16) where the CPU has it. A fixed AVX-512 build dies with SIGILL on the AMD
# EPYC VMs without it (Zen 3). The flags in use are kept in $(VENV)/.llama-cmake-args; when they
# change (another CPU), llama-cpp-python is rebuilt.
CPU_FLAGS := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
cpu_has    = $(filter $(1),$(CPU_FLAGS))
on_if      = $(if $(call cpu_has,$(1)),ON,OFF)
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
                    -DGGML_AVX512=$(call on_if,avx512f) -DGGML_AVX512_VNNI=$(call on_if,avx512_vnni) \
                    -DGGML_AVX512_BF16=$(call on_if,avx512_bf16)
# the flags for this CPU, in a file rewritten only when they change (so it dates the last change)
LLAMA_FLAGS := build/llama-cmake-args

.PHONY: install demo serve test test-unit test-realmodel llama-tools clean FORCE

install: $(VENV)/.installed

$(LLAMA_FLAGS): FORCE
	@mkdir -p $(@D)
	@echo '$(LLAMA_CMAKE_ARGS)' | cmp -s - $@ || echo '$(LLAMA_CMAKE_ARGS)' > $@

FORCE:

$(VENV)/.installed: pyproject.toml Makefile $(LLAMA_FLAGS)
	# bubblewrap (Debian): the sandbox's read-only filesystem and pid namespace; needs root to install.
	@command -v bwrap >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; \
	  else echo "warning: bubblewrap is missing: the sandbox runs without filesystem isolation (docs/sandbox.md)"; fi; }
	# PostgreSQL (Debian): the shared accepted-completion store's tests start a server of their own.
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	  else echo "warning: PostgreSQL is missing: its store's tests are skipped"; fi; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip wheel setuptools
	# torch first and pinned: the CPU wheel; an unpinned torch pulls GBs of CUDA packages.
	$(PY) -m pip install --quiet torch==2.13.0
	# built for this CPU; rebuilt (not taken from pip's wheel cache) when the flags differ from the last build
	@if ! cmp -s $(LLAMA_FLAGS) $(VENV)/.llama-cmake-args; then \
	  echo "building llama-cpp-python 0.3.36 with $(LLAMA_CMAKE_ARGS)"; \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip install --quiet \
	    --force-reinstall --no-cache-dir --no-deps llama-cpp-python==0.3.36 && \
	  $(PY) -m pip install --quiet llama-cpp-python==0.3.36 && \
	  cp $(LLAMA_FLAGS) $(VENV)/.llama-cmake-args; \
	fi
	$(PY) -m pip install --quiet -e ".[llama,hf,models,serve,endpoint,replicas,personalization,dev]"
	$(CLI) models fetch all
	touch $@

# The main job: plain decoding and the best lossless method measured (speculative: the request's own
# text first, then the bundled 0.5B draft), interleaved on the same 20 HumanEval problems; the table
# shows both rows, the speed-up and how many outputs are identical to plain decoding.
DEMO_METHODS ?= autoregressive,speculative
demo: install
	$(CLI) bench humaneval --limit 20 --model qwen2.5-coder-1.5b-instruct --engine llama.cpp \
		--method $(DEMO_METHODS) --share-prefill --no-resume --out runs/demo

# The completion server on the bundled 1.5B (OpenAI and llama.cpp APIs, continuous batching) on
# http://127.0.0.1:8080; settings: `codeaccel serve --help` or CODEACCEL_SERVE_* variables.
SERVE_ARGS ?= --model qwen2.5-coder-1.5b-instruct --parallel 8
serve: install
	$(CLI) serve $(SERVE_ARGS)

test: install
	$(PY) -m pytest

test-unit: install
	$(PY) -m pytest -m "not realmodel"

test-realmodel: install
	$(PY) -m pytest -m realmodel

# llama.cpp's own C++ tools (llama-speculative-simple, llama-bench, llama-server, llama-batched-bench), built
# from the llama.cpp tree vendored in the same llama-cpp-python sdist, with the same CPU flags; into
# build/llama.cpp/bin, where the llama.cpp-* peers find them (or $CODEACCEL_LLAMA_TOOLS). The sdist comes from
# PyPI (pip download); CMake fetches nothing: no prebuilt web UI download, no tests (they fetch models).
# Optional: not part of install, test or demo.
LLAMA_SRC   := build/llama_cpp_python-0.3.36/vendor/llama.cpp
LLAMA_TOOLS := llama-speculative-simple llama-bench llama-server llama-batched-bench

llama-tools:
	@test -x $(PY) || { echo "error: $(PY) is missing: run \`make install\` first"; exit 1; }
	$(PY) -m pip download --quiet --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d build/sdist
	test -f $(LLAMA_SRC)/CMakeLists.txt || tar -xzf build/sdist/llama_cpp_python-0.3.36.tar.gz -C build
	cmake -S $(LLAMA_SRC) -B build/llama.cpp $(LLAMA_CMAKE_ARGS) -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
		-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_BUILD_TESTS=OFF
	cmake --build build/llama.cpp -j 2 --target $(LLAMA_TOOLS)

clean:
	rm -rf $(VENV) .pytest_cache
