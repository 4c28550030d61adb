# xlbake: finetune -> extract -> resize, each stage a file target, so make reruns only what is out of date.
#   make demo                        the whole chain on the built-in tiny model and dataset (CPU, minutes)
#   make finetune RUN=runs/x CONFIG=configs/finetune/a100-80gb.yaml
#   make extract RUN=runs/x DIM=64   reruns only the extraction
#   make resize RUN=runs/x RANK=16
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A pinned torch: on this CPU machine it resolves to the local CPU build, on a CUDA Linux box PyPI's default
# build is the CUDA one. Another build: make install TORCH_SPEC="torch==2.13.0 --index-url <wheel index>".
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev

RUN ?= runs/demo
CONFIG ?= configs/finetune/tiny-cpu.yaml
DIM ?= 128
CONV_DIM ?= 0
RANK ?= 16
SET ?=
EXTRACT_ARGS ?=
RESIZE_ARGS ?=

TUNED := $(RUN)/tuned.fp32.safetensors
LORA := $(RUN)/lora-dim$(DIM).safetensors
RESIZED := $(RUN)/lora-dim$(DIM)-rank$(RANK).safetensors
STAMP := $(VENV)/.installed

.PHONY: install test lint clean finetune extract resize demo bench

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --dist loadgroup tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

finetune: $(TUNED)
extract: $(LORA)
resize: $(RESIZED)

$(TUNED): $(CONFIG) | $(STAMP)
	$(PY) -m finetune --config $(CONFIG) --set run_dir=$(RUN) $(SET)

$(LORA): $(TUNED) | $(STAMP)
	$(PY) -m extract --base $$($(PY) -m finetune.base_of $(RUN)) --tuned $(TUNED) --dim $(DIM) \
		--conv-dim $(CONV_DIM) --out $@ --force $(EXTRACT_ARGS)

$(RESIZED): $(LORA) | $(STAMP)
	$(PY) -m resize --lora $(LORA) --rank $(RANK) --out $@ --force $(RESIZE_ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks
