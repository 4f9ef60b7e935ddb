"""A tiny training run of a task through the real training loop (recipe file -> `implicit_hf.training.loop.main`).

The task tests call `train_tiny` and assert on the losses it returns; data is generated into a fresh
``IMPLICIT_HF_CACHE`` under the test's ``tmp_path``.
"""

import json

import yaml

from implicit_hf.training import loop as train_mod

TINY_MODEL = {
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_prelude_layers": 0,
    "num_core_layers": 1,
    "num_coda_layers": 0,
    "gradient": "unroll",
}
TINY_RECIPE = {
    "train_size": 64,
    "eval_size": 16,
    "per_device_batch_size": 16,
    "learning_rate": 3e-3,
    "warmup_steps": 5,
    "log_every": 10,
    "eval_every": 0,
    "checkpoint_every": 0,
    "tracker": "none",
}


def train_tiny(tmp_path, monkeypatch, task: str, model: dict, **recipe) -> tuple[list[float], train_mod.TrainResult]:
    """Train ``task`` with the tiny model updated by ``model`` and the tiny recipe by ``recipe``.

    Returns the logged training losses and the run's `TrainResult`.
    """
    monkeypatch.setenv("IMPLICIT_HF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    full = {
        **TINY_RECIPE,
        "task": task,
        "model": {**TINY_MODEL, **model},
        "output_dir": str(tmp_path / "out"),
        **recipe,
    }
    path = tmp_path / f"{task}.yaml"
    path.write_text(yaml.safe_dump(full))
    result = train_mod.main([str(path)])
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    return [record["train/loss"] for record in log if "train/loss" in record], result
