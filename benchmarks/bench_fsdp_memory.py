"""Per-process parameter + optimizer memory under FSDP against DDP, 2 CPU processes.

Trains the same recipe (a causal implicit LM on the ``text`` task: hidden 256, 8 heads, prelude 1 /
core 2 / coda 1, 4 loops, AdamW, 4 steps) twice with ``accelerate launch --num_processes 2`` and
``ACCELERATE_USE_CPU=true``: with ``configs/accelerate/ddp.yaml`` (every process holds the whole model
and optimizer) and with ``configs/accelerate/fsdp.yaml`` (torch's ``fully_shard`` on CPU processes).
The figure is the training run's own ``state_bytes_per_process`` (metrics.json): the bytes of the
largest process's parameters and optimizer states after the last step, counted tensor by tensor
(a DTensor's local shard under FSDP), so it is exact rather than an allocator reading. Target:
FSDP / DDP <= 0.6. The two runs' final weights are compared too (they train the same global batch).

Usage: python benchmarks/bench_fsdp_memory.py [--out benchmarks/results/fsdp_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from _common import ROOT, environment, write_report
from safetensors.torch import load_file

TARGET = 0.6
RECIPE = {
    "task": "text",
    "task_kwargs": {"seq_len": 32},
    "model": {
        "hidden_size": 256,
        "num_attention_heads": 8,
        "num_prelude_layers": 1,
        "num_core_layers": 2,
        "num_coda_layers": 1,
        "num_loops": 4,
    },
    "train_size": 64,
    "eval_size": 0,
    "per_device_batch_size": 4,
    "max_steps": 4,
    "learning_rate": 1.0e-3,
    "checkpoint_every": 0,
    "eval_every": 0,
    "log_every": 1,
    "tracker": "none",
    "seed": 0,
}


def train(config: str, folder: Path) -> dict:
    """One 2-process run under ``configs/accelerate/{config}.yaml``; its metrics.json."""
    recipe = folder / f"{config}.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "output_dir": str(folder / config)}))
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", IMPLICIT_HF_CACHE=str(folder / "cache"))
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs" / "accelerate" / f"{config}.yaml"),
        "--num_processes",
        "2",
        "-m",
        "implicit_hf.training",
        str(recipe),
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{config} run failed:\n{done.stderr[-4000:]}")
    return json.loads((folder / config / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fsdp_memory.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        runs = {config: train(config, folder) for config in ("ddp", "fsdp")}
        ddp, fsdp = (load_file(folder / c / "model" / "model.safetensors") for c in ("ddp", "fsdp"))
        weight_diff = max(float((ddp[k] - fsdp[k]).abs().max()) for k in ddp)
    ratio = runs["fsdp"]["state_bytes_per_process"] / runs["ddp"]["state_bytes_per_process"]
    report = {
        "benchmark": "fsdp_memory",
        "recipe": RECIPE,
        "processes": 2,
        "state_bytes_per_process": {c: m["state_bytes_per_process"] for c, m in runs.items()},
        "sharding": {c: m["sharding"] for c, m in runs.items()},
        "fsdp_over_ddp": ratio,
        "target": TARGET,
        "meets_target": ratio <= TARGET,
        "max_weight_difference_ddp_vs_fsdp": weight_diff,
        "environment": environment(torch.device("cpu")),
    }
    write_report(report, args.out)
    print(json.dumps({k: report[k] for k in ("state_bytes_per_process", "fsdp_over_ddp", "meets_target")}))


if __name__ == "__main__":
    main()
