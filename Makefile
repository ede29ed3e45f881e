# Set-up and the two jobs of the README. `make test` and `make demo` work on a fresh machine with Python 3.11.
PYTHON ?= python3.11
VENV ?= .venv
# The CPU wheel of this machine; on a GPU machine use e.g. `make TORCH=torch test` to keep a CUDA build.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
# accelerate launch gives each process one CPU thread unless told otherwise; a single process takes every core.
LAUNCH := $(BIN)/accelerate launch --num_processes 1 --num_cpu_threads_per_process $(shell nproc)

.PHONY: setup chromium lint test demo study synthetic variants variants-lm worlds dynamics scorers paper-scale bench gpu-check clean

$(VENV)/.ready: pyproject.toml requirements/no-deps.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev,embedded,eval]"
	$(BIN)/pip install --quiet --no-deps -r requirements/no-deps.txt
	touch $@

setup: $(VENV)/.ready

# The feature browser's test opens its pages in a real headless Chromium: Debian's package, installed if missing.
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

# Style is ruff's (pyproject.toml: 120 columns, pycodestyle, pyflakes, import order, bugbear, pyupgrade).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup chromium
	$(BIN)/python -m pytest

demo: setup
	$(LAUNCH) scripts/distill.py configs/smollm2-135m.json

# The paper's claims on the embedded default (docs/results.md): the demo's distillation, then its distilled core
# transferred at k 16, 32, 64 in every variant (dense and sparse core, Matryoshka, the random-init control in both
# modes; Matryoshka also at k 128) over 3 seeds, with SAEBench's offline evals, compared at matched measured L0.
# Runs under runs/study; results, report and figures in reports/study-smollm2-135m, which `make study` continues from
# (commit them: a finished seed is never trained again).
study: demo
	$(LAUNCH) scripts/study.py configs/smollm2-135m.json --study_dir runs/study \
		--results_dir reports/study-smollm2-135m \
		--saebench_evals core sparse_probing_sae_probes meta_structure absorption --meta_structure_steps 500

# The ground-truth benchmark (configs/synthetic.json: 3 seeds; about 13 min on 2 CPU cores), into runs/synthetic.
synthetic: setup
	$(BIN)/python scripts/synthetic.py configs/synthetic.json

# The core variants beyond the paper (penalized, JumpReLU, the learned dense linear block, their random-core
# controls) beside the paper's, in the benchmark's world, with Matryoshka up to k 96 for the comparison at matched
# measured L0 (docs/results.md), into runs/synthetic-variants (about 25 min on 2 CPU cores); then the distillation
# itself with a JumpReLU core (its cycles' carry-over and cores), into runs/synthetic-jumprelu-cycles (about 30 min);
# then the JumpReLU core's dynamics, into runs/synthetic/core-dynamics-jumprelu (about 8 min); then the penalized
# core's transfers at 10x and 100x the default coefficient, into runs/synthetic-penalized-coef* (about 10 min each),
# its dynamics and its own distillation at 0.1, into runs/synthetic/core-dynamics-penalized-coef0.1 and
# runs/synthetic-penalized-cycles.
# Copy each one's results.json, report.md and figures/ to reports/.
VARIANTS_COMPARED := dense_core sparse_core matryoshka penalized_core jumprelu_core learned_linear_core \
	random_dense_core random_penalized_core random_jumprelu_core
PENALIZED_COEFS := 0.1 1.0
variants: setup
	$(BIN)/python scripts/synthetic.py configs/synthetic.json --output_dir runs/synthetic-variants \
		--variants $(VARIANTS_COMPARED) --matryoshka_ks 24 48 96
	$(BIN)/python scripts/synthetic.py configs/synthetic.json --sparsity jumprelu_core \
		--output_dir runs/synthetic-jumprelu-cycles --variants jumprelu_core random_jumprelu_core matryoshka \
		--matryoshka_ks 24 48 96
	$(BIN)/python scripts/core_dynamics.py configs/synthetic.json --study_source synthetic --sparsity jumprelu_core \
		--budgets 250000 1000000 5000000 --cores distilled random_init --ablations paper \
		--distillation_dir "runs/synthetic-variants/seed{seed}/distillation" \
		--study_dir runs/synthetic/core-dynamics-jumprelu
	for coef in $(PENALIZED_COEFS); do \
		$(BIN)/python scripts/synthetic.py configs/synthetic.json --output_dir runs/synthetic-penalized-coef$$coef \
			--core_sparsity_coef $$coef --variants penalized_core random_penalized_core matryoshka \
			--matryoshka_ks 24 48 96 || exit 1; \
	done
	$(BIN)/python scripts/core_dynamics.py configs/synthetic.json --study_source synthetic --sparsity penalized_core \
		--core_sparsity_coef 0.1 --budgets 250000 1000000 5000000 --cores distilled random_init --ablations paper \
		--distillation_dir "runs/synthetic-variants/seed{seed}/distillation" \
		--study_dir runs/synthetic/core-dynamics-penalized-coef0.1
	$(BIN)/python scripts/synthetic.py configs/synthetic.json --sparsity penalized_core --core_sparsity_coef 0.1 \
		--output_dir runs/synthetic-penalized-cycles --variants penalized_core random_penalized_core matryoshka \
		--matryoshka_ks 24 48 96

# The learned dense block on the embedded default: `make study` extended by it and by the Matryoshka SAE at k 256,
# which the block's L0 (its rank, 121, + k) needs (only their models train; results in reports/study-smollm2-135m);
# then the JumpReLU core's dynamics on the demo's core at three coefficients and the penalized core's at two, into
# runs/smollm2-135m-l15/core-dynamics-{jumprelu,penalized}-coef* (about 8 min each after the first's harvest; copy
# results.json, report.md and figures/ to reports/). The JumpReLU core's LM transfers wait for a coefficient at which it neither stays dense nor switches off
# (docs/results.md).
VARIANTS_LM := dense_core sparse_core matryoshka random_dense_core random_sparse_core learned_linear_core
JUMPRELU_LM_COEFS := 0.01 0.001 0.0001
PENALIZED_LM_COEFS := 0.01 0.03
variants-lm: study
	$(LAUNCH) scripts/study.py configs/smollm2-135m.json --study_dir runs/study \
		--results_dir reports/study-smollm2-135m --variants $(VARIANTS_LM) --matryoshka_ks 128 256 \
		--saebench_evals core sparse_probing_sae_probes meta_structure absorption --meta_structure_steps 500
	for coef in $(JUMPRELU_LM_COEFS); do \
		$(BIN)/python scripts/core_dynamics.py configs/smollm2-135m.json --sparsity jumprelu_core \
			--core_sparsity_coef $$coef --budgets 996352 --cores distilled random_init --ablations paper \
			--study_dir runs/smollm2-135m-l15/core-dynamics-jumprelu-coef$$coef || exit 1; \
	done
	for coef in $(PENALIZED_LM_COEFS); do \
		$(BIN)/python scripts/core_dynamics.py configs/smollm2-135m.json --sparsity penalized_core \
			--core_sparsity_coef $$coef --budgets 996352 --cores distilled random_init --ablations paper \
			--study_dir runs/smollm2-135m-l15/core-dynamics-penalized-coef$$coef || exit 1; \
	done

# The ground-truth benchmark over a family of worlds (configs/worlds.json: 10 worlds drawn from stated ranges, 2 seeds
# each, screened by a plain Matryoshka SAE), into runs/worlds; results and report in reports/worlds, which `make
# worlds` continues from (commit them); about 55 min on 2 CPU cores. A larger family: docs/results.md.
worlds: setup
	$(BIN)/python scripts/worlds.py configs/worlds.json

# The core's dynamics against Fig. 3 (distilled, random-init and no core; 3 budgets × 2 seeds; one ablation per
# hypothesis): on the demo's distilled core (200k, 500k and 996 352 tokens: every usable row of the corpus's training
# split; ablations at 500k, seed 0), then on the synthetic benchmark's (250k, 1M, 5M rows; ablations at 1M, 2 seeds),
# into runs/…/core-dynamics; reports/core-dynamics-* hold the results (about 1 h 30 on 2 CPU cores).
dynamics: demo synthetic
	$(BIN)/python scripts/core_dynamics.py configs/smollm2-135m.json --budgets 200000 500000 996352 \
		--ablation_seeds 0
	$(BIN)/python scripts/core_dynamics.py configs/synthetic.json --study_source synthetic \
		--budgets 250000 1000000 5000000

# The scorers compared (GxA and latent ablation, each as q-quantile and mean, and integrated gradients): a
# distillation per scorer and seed in the synthetic benchmark's world, its cores against the useful features; then
# the demo's last cycle scored by each on the first 512 positions of its attribution split, against GxA; into
# reports/scorers-*, which `make scorers` continues from (commit them; about 35 min on 2 CPU cores).
scorers: demo
	$(BIN)/python scripts/scorers.py configs/synthetic.json --study_dir runs/scorers \
		--results_dir reports/scorers-synthetic
	$(BIN)/python scripts/scorers.py configs/smollm2-135m.json --study_source lm --results_dir reports/scorers-smollm2

# The paper config at its real shapes (Gemma-2-2B's architecture with random weights, 65 536 latents) through every
# stage on this machine, and the real run's projected cost, into reports/paper-scale (about 45 min on 2 CPU cores;
# builds runs/gemma-2-2b-random, 10 GB, once).
paper-scale: setup
	$(BIN)/python scripts/paper_scale.py

# Training-step speed against SAELens, dictionary_learning and the encoder limit, harvest and attribution speed, and
# a distillation's stages (about 16 min on 2 CPU cores), into reports/bench.json.
bench: setup
	$(BIN)/python scripts/bench.py --out reports/bench.json

# On a GPU machine (set up with e.g. `make TORCH=torch setup`): the device tests (the sparse kernels against the
# reference, bf16, the frozen rows, the Trainer's steps without a host sync) and the training steps' speed on CUDA,
# up to 65 536 latents, into reports/bench-cuda.json.
gpu-check: setup
	$(BIN)/python -m pytest --device cuda tests/test_kernels.py tests/test_modeling.py tests/test_trainer.py
	$(BIN)/python scripts/bench.py --device cuda --parts steps --sizes 4096 16384 65536 --out reports/bench-cuda.json

clean:
	rm -rf $(VENV) runs
