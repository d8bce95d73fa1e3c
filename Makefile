# Every target works alone on a fresh machine that has only Python: the venv is made on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test demo demo-train demo-eval lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile

# The demo (docs/demo.md). `make demo`: a gallery from the shipped weights/demo, scored by the evaluator.
demo: $(STAMP)
	$(BIN)/python -m bench.demo

# The full evaluation: 100 random prompts per group (seen, held-out, image-to-video, extension).
demo-eval: $(STAMP)
	$(BIN)/python -m bench.demo --full --per-group 100

# The recipe of weights/demo, from nothing: render the synthetic world, train the VAE (stills, then whole
# 17-frame clips from that export, then the decoder's motion between latent frames and then its small moving
# shapes in two stages, all three with the encoder frozen; latent statistics come from stage 2), cache latents and text
# embeddings, train the DiT,
# ship its export. Each stage prints its time. On a machine shared with other
# jobs, OMP_NUM_THREADS=1 make demo-train is faster (OpenMP threads spin waiting for busy cores).
# The DiT trains in five stages: recipe-dit.yaml from nothing, then recipe-dit-finish.yaml and
# recipe-dit-finish-2.yaml layered over it (warm restarts at lower rates, each from the previous export),
# then stage 3's export resized to 1x2x2 patches (dit.resize) and trained on by recipe-dit-fine.yaml, then
# stage 4's export given the self-conditioning input (dit.resize --self-cond) and trained on by
# recipe-dit-selfcond.yaml. DIT_STEPS overrides stage 1's steps (34500), DIT_FINISH_STEPS those of stages 2
# and 3 (10000 each; 0 skips them and stages 4-5, and ships stage 1), DIT_FINE_STEPS stage 4's (25000; 0 ships
# stage 3), DIT_SELFCOND_STEPS stage 5's (8000; 0 ships stage 4). VAE_FINE_STEPS sets
# VAE stage 5's steps (1200; 0 ships stage 4's decoder, whose latents are the same). The shipped weights: all
# stages, about 4 h 25 min on a 2-core CPU, estimated (DiT stage 4 alone 2 h 1 min, DiT stage 5 44 min, VAE
# stage 5 14 min 31 s, timed);
# `make demo-train DIT_STEPS=11500 DIT_FINISH_STEPS=0 VAE_FINE_STEPS=0` takes about 36 min and follows prompts less well.
DEMO := outputs/demo
DIT_STAGE_2 := --config configs/demo/recipe-dit.yaml --config configs/demo/recipe-dit-finish.yaml
DIT_STAGE_3 := $(DIT_STAGE_2) --config configs/demo/recipe-dit-finish-2.yaml
DIT_STAGE_4 := $(DIT_STAGE_3) --config configs/demo/recipe-dit-fine.yaml
demo-train: SHELL := /bin/bash
demo-train: $(STAMP)
	rm -rf $(DEMO)/synth $(DEMO)/vae $(DEMO)/vae-clips $(DEMO)/vae-decoder $(DEMO)/vae-sharpen \
		$(DEMO)/vae-sharpen-2 $(DEMO)/cache \
		$(DEMO)/dit $(DEMO)/dit-finish $(DEMO)/dit-finish-2 $(DEMO)/dit-1x2x2 $(DEMO)/dit-fine \
		$(DEMO)/dit-sc-init $(DEMO)/dit-sc
	time $(BIN)/python -m data.synthetic --out $(DEMO)/synth --clips 1500 --images 400 --heldout 0 \
		--frames 17 --size 64 --seed 0
	time $(BIN)/python train.py --config configs/demo/recipe-vae.yaml
	time $(BIN)/python train.py --config configs/demo/recipe-vae-clips.yaml
	time $(BIN)/python train.py --config configs/demo/recipe-vae-decoder.yaml
	time $(BIN)/python train.py --config configs/demo/recipe-vae-sharpen.yaml
ifeq ($(VAE_FINE_STEPS),0)
	mkdir -p $(DEMO)/vae-sharpen-2/export && cp -r $(DEMO)/vae-sharpen/export/vae $(DEMO)/vae-sharpen-2/export/vae
else
	time $(BIN)/python train.py --config configs/demo/recipe-vae-sharpen.yaml --config configs/demo/recipe-vae-sharpen-2.yaml \
		$(if $(VAE_FINE_STEPS),steps=$(VAE_FINE_STEPS))
endif
	time $(BIN)/python -m data.cache --manifest $(DEMO)/synth/manifest.csv \
		--vae $(DEMO)/vae-sharpen-2/export/vae --out $(DEMO)/cache --buckets demo --decode-workers 1
	time $(BIN)/python train.py --config configs/demo/recipe-dit.yaml $(if $(DIT_STEPS),steps=$(DIT_STEPS))
ifeq ($(DIT_FINISH_STEPS),0)
	rm -rf weights/demo && mkdir -p weights && cp -r $(DEMO)/dit/export weights/demo
else
	time $(BIN)/python train.py $(DIT_STAGE_2) $(if $(DIT_FINISH_STEPS),steps=$(DIT_FINISH_STEPS))
	time $(BIN)/python train.py $(DIT_STAGE_3) $(if $(DIT_FINISH_STEPS),steps=$(DIT_FINISH_STEPS))
ifeq ($(DIT_FINE_STEPS),0)
	rm -rf weights/demo && mkdir -p weights && cp -r $(DEMO)/dit-finish-2/export weights/demo
else
	$(BIN)/python -m dit.resize $(DEMO)/dit-finish-2/export --patch-size 1 2 2 --out $(DEMO)/dit-1x2x2
	time $(BIN)/python train.py $(DIT_STAGE_4) $(if $(DIT_FINE_STEPS),steps=$(DIT_FINE_STEPS))
ifeq ($(DIT_SELFCOND_STEPS),0)
	rm -rf weights/demo && mkdir -p weights && cp -r $(DEMO)/dit-fine/export weights/demo
else
	$(BIN)/python -m dit.resize $(DEMO)/dit-fine/export --self-cond --out $(DEMO)/dit-sc-init
	time $(BIN)/python train.py $(DIT_STAGE_4) --config configs/demo/recipe-dit-selfcond.yaml \
		$(if $(DIT_SELFCOND_STEPS),steps=$(DIT_SELFCOND_STEPS))
	rm -rf weights/demo && mkdir -p weights && cp -r $(DEMO)/dit-sc/export weights/demo
endif
endif
endif
	# Shipped in float16 (8 MB instead of 17): the pipeline loads it into float32 models.
	$(BIN)/python -c "import sys; from safetensors.torch import load_file, save_file; \
		[save_file({k: v.half() for k, v in load_file(f).items()}, f) for f in sys.argv[1:]]" \
		weights/demo/dit/model.safetensors weights/demo/vae/model.safetensors
	du -sh weights/demo

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m bench.vae
	$(BIN)/python -m bench.dit
	$(BIN)/python -m bench.sampling
	$(BIN)/python -m bench.data

clean:
	rm -rf $(VENV) outputs .pytest_cache
