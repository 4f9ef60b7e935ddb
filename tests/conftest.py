"""Shared test settings and the tiny-model fixtures.

Each tiny-model fixture hands over a builder of `tiny_models` (same name, documented there): call it with
overrides for the settings a test needs, e.g. ``tiny_causal_lm(num_loops=4)``. The builders are deterministic
by seed, so session scope is safe and lets module-scoped fixtures use them too.
"""

import pytest
import tiny_models
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    """The tests' tensors are tiny: one thread is faster and does not fight other processes for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_config(**overrides)``: an `ImplicitConfig` of the tiny sizes."""
    return tiny_models.tiny_config


@pytest.fixture(scope="session")
def tiny_model_of():
    """``tiny_model_of(model_class, seed=0, **overrides)``: a tiny implicit model with any head, in eval mode."""
    return tiny_models.tiny_model_of


@pytest.fixture(scope="session")
def tiny_causal_lm():
    """``tiny_causal_lm(seed=0, **overrides)``: a tiny implicit causal LM, in eval mode."""
    return tiny_models.tiny_causal_lm


@pytest.fixture(scope="session")
def tiny_task_model():
    """``tiny_task_model(task, seed=0, **overrides)``: the tiny model of a task's head and sizes, in eval mode."""
    return tiny_models.tiny_task_model


@pytest.fixture(scope="session")
def tiny_checkpoint():
    """``tiny_checkpoint(path, tokenizer=None, seed=0, **overrides)``: a tiny causal LM saved (with its tokenizer)."""
    return tiny_models.tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_source():
    """``tiny_source(model_type, seed=0, **overrides)``: a small Llama-family model for `convert` to read."""
    return tiny_models.tiny_source
