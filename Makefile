# xlbake: finetune -> extract -> resize, each stage a file target, so make reruns only what is out of date.
#   make demo                                    the whole chain on the built-in tiny model and dataset (CPU, minutes)
#   make finetune extract resize CONCEPT=kafka   one concept (concepts/kafka.yaml, or a path) into runs/kafka/
#   make all [CONCEPTS="a b"] [JOBS=2] [GPUS=0,1]  every concept (default: concepts/*.yaml); a failed one does not
#                                                stop the others; summary in runs/summary.md and runs/summary.json
#   make finetune RUN=runs/x CONFIG=configs/finetune/a100-80gb.yaml SET="train.epochs=50 optim.unet_lr=2e-6"
#   make extract RUN=runs/x DIM=64               reruns only the extraction (one file per rank: RUN/lora-dim64...)
#   make resize RUN=runs/x RANK="8 16" SIZE=50MB  RUN/lora-dim128-rank8, -rank16 and -50MB .safetensors
#   make extract-epochs RUN=runs/x DIM=64         a LoRA from every saved checkpoint (checkpoint.every_epochs with
#                                                checkpoint.keep_fp32: true): RUN/epochs/lora-<tag>-dim64.safetensors
#   make grid-epochs RUN=runs/x DIM=64 PROMPTS=prompts.txt [GRID_ARGS="--weight 0.8"]  those LoRAs side by side
#                                                (and the final one) in RUN/epochs/grid-dim64.png
# Without CONFIG or CONCEPT a run folder uses its own config (RUN/config.resolved.yaml; SET applies on top of it).
# extract/resize never train: they need a finished finetune, and one made with the config given, if any.
# What reruns (make -n shows it, make -q tests it, neither changes anything): the finetune when its resolved config
# (preset + concept + SET, as `python -m finetune --dry-run` prints it) or a dataset file changed, but a finished or
# started finetune is started over only with FORCE=1 (else make stops and lists what changed); an extraction when
# the finetune or CONV_DIM/EXTRACT_ARGS changed; a resize when its input LoRA or RESIZE_ARGS changed. The
# RUN/.finetune.config, RUN/.extract.options and RUN/.resize.options stamps hold those inputs; a stage's recipe
# rewrites its stamp when they changed. An interrupted finetune (Ctrl-C) resumes from its saved state.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A pinned torch: on this CPU machine it resolves to the local CPU build, on a CUDA Linux box PyPI's default
# build is the CUDA one. Another build: make install TORCH_SPEC="torch==2.13.0 --index-url <wheel index>".
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,test
STAMP := $(VENV)/.installed

# One run: CONCEPT=name (concepts/name.yaml, or a path to a concept YAML) sets RUN and the finetune arguments from
# the concept, and the defaults of DIM, CONV_DIM, RANK, SIZE, EXTRACT_ARGS and RESIZE_ARGS (the command line wins).
CONCEPT ?=
RUNS ?= runs
ifneq ($(strip $(CONCEPT)),)
CONCEPT_FILE := $(if $(findstring /,$(CONCEPT))$(filter %.yaml %.yml,$(CONCEPT)),$(CONCEPT),concepts/$(CONCEPT).yaml)
RUN ?= $(RUNS)/$(basename $(notdir $(CONCEPT_FILE)))
CONCEPT_MK := $(RUN)/.concept.mk
ifneq ($(wildcard $(PY)),)
CONCEPT_OUT := $(shell $(PY) -m xlbake.batch.concepts make-vars $(CONCEPT_FILE) --out $(CONCEPT_MK) >&2)
ifneq ($(.SHELLSTATUS),0)
$(error $(CONCEPT_FILE): the concept cannot be used (see the message above))
endif
endif
include $(CONCEPT_MK)
endif

RUN ?= $(RUNS)/demo
CONFIG ?= configs/finetune/tiny-cpu.yaml
DIM ?= 128
CONV_DIM ?= 0
RANK ?= 16
SIZE ?=
SET ?=
FORCE ?=
EXTRACT_ARGS ?=
RESIZE_ARGS ?=
PROMPTS ?=
GRID_ARGS ?=
# How the training runs; several GPUs for one run: FINETUNE="$(VENV)/bin/accelerate launch --config_file F -m finetune"
FINETUNE ?= $(PY) -m finetune
# make all: the concepts (default: every concepts/*.yaml), concepts at once, and a GPU pool (one concept per GPU).
CONCEPTS ?=
JOBS ?=
GPUS ?=

comma := ,
DIMS := $(subst $(comma), ,$(DIM))
RANKS := $(subst $(comma), ,$(RANK))
SIZES := $(subst $(comma), ,$(SIZE))
# Ranks are checked while the Makefile is read: a bad RANK would otherwise fail only after the finetune and extract.
strip_digits = $(subst 0,,$(subst 1,,$(subst 2,,$(subst 3,,$(subst 4,,$(subst 5,,$(subst 6,,$(subst 7,,$(subst 8,,$(subst 9,,$(1)))))))))))
$(foreach v,DIM CONV_DIM RANK,$(foreach r,$(subst $(comma), ,$($(v))),$(if $(call strip_digits,$(r)),\
	$(error $(v)=$($(v)): ranks are whole numbers, like $(v)=16 or $(v)="8 16"))))
# The finetune's config: the concept's, else CONFIG when given, else the run's own recorded one, else the default.
GIVEN_CONFIG := $(CONCEPT_FILE)$(filter-out file default undefined,$(origin CONFIG))
RECORDED := $(if $(GIVEN_CONFIG),,$(wildcard $(RUN)/config.resolved.yaml))
FT_ARGS := $(if $(CONCEPT_FILE),$(CONCEPT_FINETUNE_ARGS),--config $(or $(RECORDED),$(CONFIG))) \
	$(foreach s,$(SET),--set '$(s)') --set run_dir=$(RUN)
FT_STAMP := $(RUN)/.finetune.config
EX_STAMP := $(RUN)/.extract.options
RS_STAMP := $(RUN)/.resize.options
EX_OPTIONS := $(strip extract conv_dim=$(CONV_DIM) $(EXTRACT_ARGS))
RS_OPTIONS := $(strip resize $(RESIZE_ARGS))

TUNED := $(RUN)/tuned.fp32.safetensors
LORAS := $(foreach d,$(DIMS),$(RUN)/lora-dim$(d).safetensors)
RESIZED := $(foreach d,$(DIMS),$(foreach r,$(RANKS),$(RUN)/lora-dim$(d)-rank$(r).safetensors) \
	$(foreach s,$(SIZES),$(RUN)/lora-dim$(d)-$(s).safetensors))

# What the finetune does is decided while the Makefile is read, writing nothing (so make -n / make -q see the real
# state): extract/resize alone never train; a finished or started run with another config needs FORCE=1.
TRAIN := $(filter finetune demo $(TUNED),$(MAKECMDGOALS))
FT_DECIDE = $(PY) -m xlbake.batch.concepts stamp $(FT_STAMP) $(1) $(if $(TRAIN),,--extract-only) \
	$(if $(RECORDED),$(if $(SET),,--as-recorded)) $(if $(FORCE),--force) -- $(PY) -m finetune $(FT_ARGS) --dry-run
ifneq ($(filter finetune extract resize demo $(RUN)/%,$(MAKECMDGOALS)),)
ifneq ($(wildcard $(PY)),)
FT_ACTION := $(shell $(call FT_DECIDE,--check))
ifneq ($(.SHELLSTATUS),0)
$(error $(RUN): stopped (see the message above))
endif
endif
endif
shell_quote = '$(subst ','\'',$(1))'

.PHONY: install test test-real lint clean finetune extract resize demo all bench extract-epochs grid-epochs

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --dist loadgroup tests

# Not part of `test`: a random-weight SDXL base 1.0 single file (7 GB, kept in .cache/real-check), one finetune step
# of TE1 under bf16 with checkpointing, extract, checks. Needs ~25 GB of RAM and ~10 minutes on 2 cores; offline.
test-real: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.real_check

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

finetune: $(TUNED)
extract: $(LORAS)
resize: $(RESIZED)

demo: finetune extract resize
	@echo "Demo outputs in $(RUN)/:"
	@for f in $(TUNED) $(LORAS) $(RESIZED); do printf '  %-48s %8s\n' "$$f" "$$(du -h "$$f" | cut -f1)"; done
	@echo "Kept-energy reports beside each LoRA (*.report.json, *.report.png); the finetune's loss curve: $(RUN)/loss.png"

all: | $(STAMP)
	$(PY) -m xlbake.batch.cli $(or $(CONCEPTS),--all) --runs-dir $(RUNS) $(if $(JOBS),--jobs $(JOBS)) $(if $(GPUS),--gpus $(GPUS))

ifdef CONCEPT_FILE
$(CONCEPT_MK): | $(STAMP)
	mkdir -p $(RUN) && $(PY) -m xlbake.batch.concepts make-vars $(CONCEPT_FILE) --out $@
endif

# A stage's stamp is rewritten by a recipe when its content should change (its rule is then forced), so that
# make -n changes nothing and the stages after it rerun; a fresh clone (no .venv while the Makefile was read)
# decides the finetune in its recipe.
.PHONY: changed
changed: ;
ifneq ($(file < $(EX_STAMP)),$(EX_OPTIONS))
$(EX_STAMP): changed
endif
ifneq ($(file < $(RS_STAMP)),$(RS_OPTIONS))
$(RS_STAMP): changed
endif
$(EX_STAMP):
	mkdir -p $(RUN) && printf '%s\n' $(call shell_quote,$(EX_OPTIONS)) > $@
$(RS_STAMP):
	mkdir -p $(RUN) && printf '%s\n' $(call shell_quote,$(RS_OPTIONS)) > $@

ifneq ($(FT_ACTION),done)
ifneq ($(FT_ACTION),)
$(TUNED): changed
endif
endif
$(TUNED): | $(STAMP)
	flags="$$($(call FT_DECIDE))" && $(FINETUNE) $(FT_ARGS) $$flags

$(LORAS): $(RUN)/lora-dim%.safetensors: $(TUNED) $(EX_STAMP) | $(STAMP)
	base="$$($(PY) -m xlbake.batch.base_of $(RUN))" && $(PY) -m extract --base "$$base" --tuned $(TUNED) --dim $* \
		--conv-dim $(CONV_DIM) --out $@ --force $(EXTRACT_ARGS)

# One rule per resized file: lora-dim{D}-rank{R} from lora-dim{D}, and lora-dim{D}-{SIZE} for a size budget.
define resize_rule
$(RUN)/lora-dim$(1)-$(2).safetensors: $(RUN)/lora-dim$(1).safetensors $(RS_STAMP) | $(STAMP)
	$$(PY) -m resize --lora $$< $(3) --out $$@ --force $$(RESIZE_ARGS)
endef
$(foreach d,$(DIMS),$(foreach r,$(RANKS),$(eval $(call resize_rule,$(d),rank$(r),--rank $(r)))))
$(foreach d,$(DIMS),$(foreach s,$(SIZES),$(eval $(call resize_rule,$(d),$(s),--size $(s)))))

# Epoch checkpoints: `python -m finetune.epochs RUN` lists TAG=PATH of every fp32 checkpoint (only for these goals).
ifneq ($(filter extract-epochs grid-epochs,$(MAKECMDGOALS)),)
ifneq ($(wildcard $(PY)),)
EPOCH_SOURCES := $(shell $(PY) -m finetune.epochs $(RUN))
ifneq ($(.SHELLSTATUS),0)
$(error $(RUN): no checkpoint to extract a LoRA from (see the message above))
endif
endif
endif
epoch_tag = $(firstword $(subst =, ,$(1)))
epoch_loras = $(foreach s,$(EPOCH_SOURCES),$(RUN)/epochs/lora-$(call epoch_tag,$(s))-dim$(1).safetensors)
define epoch_rule
$(RUN)/epochs/lora-$(1)-dim$(2).safetensors: $(3) $(EX_STAMP) | $(STAMP)
	mkdir -p $$(@D) && base="$$$$($(PY) -m xlbake.batch.base_of $(RUN))" && $(PY) -m extract --base "$$$$base" \
		--tuned $(3) --dim $(2) --conv-dim $(CONV_DIM) --out $$@ --force $$(EXTRACT_ARGS)
endef
$(foreach s,$(EPOCH_SOURCES),$(foreach d,$(DIMS),\
	$(eval $(call epoch_rule,$(call epoch_tag,$(s)),$(d),$(patsubst $(call epoch_tag,$(s))=%,%,$(s))))))

extract-epochs: $(foreach d,$(DIMS),$(call epoch_loras,$(d)))

# One grid per DIM: a column per epoch's LoRA (then the final LoRA, if extracted) on the base, a row per prompt.
grid-epochs: extract-epochs
	@test -n "$(PROMPTS)" || { echo "grid-epochs: give PROMPTS=file (one prompt a line, kohya options allowed)" >&2; exit 1; }
	base="$$($(PY) -m xlbake.batch.base_of $(RUN))" && $(foreach d,$(DIMS),$(VENV)/bin/xlbake grid --model "$$base" \
		$(foreach l,$(call epoch_loras,$(d)) $(wildcard $(RUN)/lora-dim$(d).safetensors),--lora $(l)) \
		--prompts-file $(PROMPTS) --out $(RUN)/epochs/grid-dim$(d).png --force $(GRID_ARGS) &&) true

bench: $(STAMP)
	$(PY) -m benchmarks
