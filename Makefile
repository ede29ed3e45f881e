# Set-up and the two jobs of the README. `make test` and `make demo` work on a fresh machine with Python 3.11.
PYTHON ?= python3.11
VENV ?= .venv
# The CPU wheel of this machine; on a GPU machine use e.g. `make TORCH=torch test` to keep a CUDA build.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
# accelerate launch gives each process one CPU thread unless told otherwise; a single process takes every core.
LAUNCH := $(BIN)/accelerate launch --num_processes 1 --num_cpu_threads_per_process $(shell nproc)

.PHONY: setup chromium lint test demo study distill-seeds claims synthetic synthetic-sparse-core variants variants-synthetic \
	variants-jumprelu variants-penalized variants-lm dynamics-lm-jumprelu dynamics-lm-penalized thresholds-lm worlds \
	convergence \
	dynamics scorers browser paper-scale bench gpu-check clean

$(VENV)/.ready: pyproject.toml requirements/no-deps.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev,embedded,eval]"
	$(BIN)/pip install --quiet --no-deps -r requirements/no-deps.txt
	touch $@

# The virtual environment: torch, the package with its extras, and the packages pinned without their dependencies.
setup: $(VENV)/.ready

# The feature browser's test opens its pages in a real headless Chromium: Debian's package, installed if missing.
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

# Style is ruff's (pyproject.toml: 120 columns, pycodestyle, pyflakes, import order, bugbear, pyupgrade).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The suite (CONTRIBUTING.md, "Tests"), as CI runs it after `lint`.
test: setup chromium
	$(BIN)/python -m pytest

# Every report in reports/ is written there by one target below (docs/results.md says what each shows).
SYNTHETIC := $(BIN)/python scripts/synthetic.py configs/synthetic.json
DYNAMICS := $(BIN)/python scripts/core_dynamics.py
DEMO := runs/smollm2-135m-l15
DEMO_REPORT := reports/demo-smollm2-135m
SAEBENCH := --saebench_evals core sparse_probing_sae_probes meta_structure absorption --meta_structure_steps 500

# The README's main job: the embedded default's distillation (~26 min on 2 CPU cores), its report in reports/.
demo: setup
	$(LAUNCH) scripts/distill.py configs/smollm2-135m.json
	mkdir -p $(DEMO_REPORT) && cp -r $(DEMO)/report.md $(DEMO)/state.json $(DEMO)/figures $(DEMO_REPORT)/

# The paper's claims on the demo's core: every variant and the random-core control at k 16/32/64, 3 seeds (~4 h).
study: demo
	$(LAUNCH) scripts/study.py configs/smollm2-135m.json --study_dir runs/study --results_dir reports/study-smollm2-135m \
		--variants dense_core sparse_core matryoshka random_dense_core random_sparse_core --matryoshka_ks 128 $(SAEBENCH)

# The demo's distillation from seeds 1 and 2 too, each with its own cycle 0 and cycles (the demo is seed 0).
distill-seeds: demo
	ln -sfn smollm2-135m-l15 runs/smollm2-135m-l15-seed0
	for seed in 1 2; do $(LAUNCH) scripts/distill.py configs/smollm2-135m.json --seed $$seed \
		--output_dir runs/smollm2-135m-l15-seed$$seed --model_repo local/dmsae-smollm2-135m-l15-seed$$seed || exit 1; done

# The paper's claims where SAEs train: each seed's own core, on its distillation's control slice, both controls.
claims: distill-seeds
	$(LAUNCH) scripts/study.py configs/smollm2-135m.json --distillation_dir "runs/smollm2-135m-l15-seed{seed}" \
		--on_control_slice true --study_dir runs/claims --results_dir reports/claims-smollm2-135m \
		--variants dense_core sparse_core matryoshka random_dense_core random_sparse_core trained_dense_core \
		trained_sparse_core --matryoshka_ks 128 256 $(SAEBENCH)

# The ground-truth benchmark (configs/synthetic.json: 3 seeds, dense-core cycles; ~13 min on 2 CPU cores).
synthetic: setup
	$(SYNTHETIC) --results_dir reports/synthetic

# The same benchmark with sparse-core cycles (~13 min).
synthetic-sparse-core: setup
	$(SYNTHETIC) --sparsity sparse_core --output_dir runs/synthetic-sparse-core-cycles \
		--results_dir reports/synthetic-sparse-core-cycles

# The core modes beyond the paper in the benchmark's world: the three targets below (~1 h 30).
variants: variants-synthetic variants-jumprelu variants-penalized

VARIANTS_COMPARED := dense_core sparse_core matryoshka penalized_core jumprelu_core learned_linear_core \
	random_dense_core random_penalized_core random_jumprelu_core
WIDE := --matryoshka_ks 24 48 96
SYNTHETIC_CORES := --study_source synthetic --distillation_dir "runs/synthetic-variants/seed{seed}/distillation" \
	--budgets 250000 1000000 5000000 --seeds 0 1 --cores distilled random_init --ablations paper

# Every core mode's transfers beside the paper's, Matryoshka up to k 96 for matched L0 (~25 min).
variants-synthetic: setup
	$(SYNTHETIC) --output_dir runs/synthetic-variants --results_dir reports/synthetic-variants \
		--variants $(VARIANTS_COMPARED) $(WIDE)

# The distillation with a JumpReLU core (its cycles and cores; ~30 min), then that core's dynamics (~8 min).
variants-jumprelu: variants-synthetic
	$(SYNTHETIC) --sparsity jumprelu_core --output_dir runs/synthetic-jumprelu-cycles $(WIDE) \
		--results_dir reports/synthetic-jumprelu-cycles --variants jumprelu_core random_jumprelu_core matryoshka
	$(DYNAMICS) configs/synthetic.json $(SYNTHETIC_CORES) --sparsity jumprelu_core \
		--study_dir runs/synthetic/core-dynamics-jumprelu --results_dir reports/core-dynamics-synthetic-jumprelu

# The penalized core's transfers at 10x and 100x the default coefficient, its dynamics and distillation at 0.1.
variants-penalized: variants-synthetic
	for coef in 0.1 1.0; do $(SYNTHETIC) --output_dir runs/synthetic-penalized-coef$$coef $(WIDE) \
		--results_dir reports/synthetic-penalized-coef$$coef --core_sparsity_coef $$coef \
		--variants penalized_core random_penalized_core matryoshka || exit 1; done
	$(DYNAMICS) configs/synthetic.json $(SYNTHETIC_CORES) --sparsity penalized_core --core_sparsity_coef 0.1 \
		--study_dir runs/synthetic/core-dynamics-penalized-coef0.1 \
		--results_dir reports/core-dynamics-synthetic-penalized-coef0.1
	$(SYNTHETIC) --sparsity penalized_core --core_sparsity_coef 0.1 --output_dir runs/synthetic-penalized-cycles \
		--results_dir reports/synthetic-penalized-cycles --variants penalized_core random_penalized_core matryoshka $(WIDE)

LM_CORES := --budgets 996352 --seeds 0 1 --cores distilled random_init --ablations paper

# The learned dense block and Matryoshka at k 256 added to `make study`, then the LM's JumpReLU and penalized cores.
variants-lm: study dynamics-lm-jumprelu dynamics-lm-penalized
	$(LAUNCH) scripts/study.py configs/smollm2-135m.json --study_dir runs/study --results_dir reports/study-smollm2-135m \
		--variants dense_core sparse_core matryoshka random_dense_core random_sparse_core learned_linear_core \
		--matryoshka_ks 128 256 $(SAEBENCH)

# The JumpReLU core's dynamics on the demo's core at three coefficients (~8 min each after the first's harvest).
dynamics-lm-jumprelu: demo
	for coef in 0.01 0.001 0.0001; do $(DYNAMICS) configs/smollm2-135m.json $(LM_CORES) --sparsity jumprelu_core \
		--core_sparsity_coef $$coef --study_dir runs/smollm2-135m-l15/core-dynamics-jumprelu-coef$$coef \
		--results_dir reports/core-dynamics-smollm2-jumprelu-coef$$coef || exit 1; done

# The penalized core's dynamics on the demo's core at two coefficients (~8 min each).
dynamics-lm-penalized: demo
	for coef in 0.01 0.03; do $(DYNAMICS) configs/smollm2-135m.json $(LM_CORES) --sparsity penalized_core \
		--core_sparsity_coef $$coef --study_dir runs/smollm2-135m-l15/core-dynamics-penalized-coef$$coef \
		--results_dir reports/core-dynamics-smollm2-penalized-coef$$coef || exit 1; done

# The negative result behind core_threshold_learning_rate: JumpReLU thresholds at the SAE's rate, 5e-4 (~8 min each).
thresholds-lm: demo
	for coef in 0.01 0.05 0.2; do $(DYNAMICS) configs/smollm2-135m.json $(LM_CORES) --sparsity jumprelu_core \
		--core_sparsity_coef $$coef --core_threshold_learning_rate 5e-4 \
		--study_dir runs/smollm2-135m-l15/core-dynamics-jumprelu-threshold-lr5e-4-coef$$coef \
		--results_dir reports/core-dynamics-smollm2-jumprelu-threshold-lr5e-4-coef$$coef || exit 1; done

# Which budget makes the embedded default's SAEs train: the sweep of configs/convergence.json (~3 h, resumable). Its
# settings are changes to the budget the embedded default had before it (pinned here: lr 5e-4, one pass, 100k window).
convergence: setup
	$(BIN)/python scripts/convergence.py configs/smollm2-135m.json --sweep configs/convergence.json --save_steps 500 \
		--learning_rate 0.0005 --num_train_epochs 1 --dead_tokens_threshold 100000 \
		--study_dir runs/convergence --results_dir reports/convergence --seeds 0 1 --ks 16 64 \
		--variants matryoshka random_dense_core

# The benchmark over 10 worlds drawn from stated ranges, 2 seeds each (configs/worlds.json; ~55 min).
worlds: setup
	$(BIN)/python scripts/worlds.py configs/worlds.json

# The core's dynamics against Fig. 3 on the demo's core, then on the benchmark's (~1 h 30).
dynamics: demo synthetic
	$(DYNAMICS) configs/smollm2-135m.json --budgets 200000 500000 996352 --seeds 0 1 --ablation_seeds 0 \
		--results_dir reports/core-dynamics-smollm2
	$(DYNAMICS) configs/synthetic.json --study_source synthetic --budgets 250000 1000000 5000000 --seeds 0 1 \
		--results_dir reports/core-dynamics-synthetic

# The scorers compared: in the benchmark's world against the useful features, then on the demo's last cycle (~35 min).
scorers: demo
	$(BIN)/python scripts/scorers.py configs/synthetic.json --study_source synthetic --study_dir runs/scorers \
		--results_dir reports/scorers-synthetic
	$(BIN)/python scripts/scorers.py configs/smollm2-135m.json --study_source lm --results_dir reports/scorers-smollm2

SCREENSHOT := chromium --headless --no-sandbox --disable-gpu --window-size=1280,900 --screenshot

# The demo's feature browser, and the screenshots of its index and first latent in reports/browser (Chromium).
browser: demo chromium
	$(BIN)/python scripts/browse.py configs/smollm2-135m.json --model $(DEMO)/cycle2 --site_dir runs/browser \
		--cores $(DEMO)/distilled-core
	mkdir -p reports/browser
	$(SCREENSHOT)=reports/browser/index.png runs/browser/index.html
	$(SCREENSHOT)=reports/browser/latent.png runs/browser/latents/0.html

# The paper config at its real shapes (Gemma-2-2B's architecture, random weights) through every stage (~45 min).
paper-scale: setup
	$(BIN)/python scripts/paper_scale.py
	$(BIN)/python scripts/bench.py --paper_memory --out reports/memory-paper-scale.json

# Step speed against SAELens, dictionary_learning and the encoder limit, and a distillation's stages (~16 min).
bench: setup
	$(BIN)/python scripts/bench.py --out reports/bench.json | tee reports/bench.txt

# On a GPU machine (`make TORCH=torch setup`): the device tests and the steps' speed on CUDA up to 65 536 latents.
gpu-check: setup
	$(BIN)/python -m pytest --device cuda tests/test_kernels.py tests/test_modeling.py tests/test_trainer.py
	$(BIN)/python scripts/bench.py --device cuda --parts steps --sizes 4096 16384 65536 --out reports/bench-cuda.json

# Everything this Makefile built: the environment and every run (reports/ stays).
clean:
	rm -rf $(VENV) runs
