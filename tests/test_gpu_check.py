"""benchmarks/gpu_check.py in its reduced CPU mode: the same checks a lent GPU runs, so the script cannot rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_in_reduced_mode_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "reduced" and report["failed"] == []
    checks = report["checks"]
    assert set(checks["bf16_training"]["modes"]) == {"unroll", "truncated", "jfb", "phantom", "ift"}
    assert all(mode["grad_norm"] > 0 for mode in checks["bf16_training"]["modes"].values())
    assert set(checks["memory"]["modes"]) == {"jfb", "phantom", "ift"} and checks["memory"]["loops"] == [4, 16]
    assert checks["cache"]["passed"] and checks["attention"]["against_eager"]["sdpa"]["passed"]
    assert checks["decode_speed"]["tokens_per_s"]["implicit"] > 0
    assert "needs 2 GPUs" in checks["multi_gpu"]["skipped"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the full check runs instead")
def test_gpu_check_refuses_cuda_without_a_gpu(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path / "r.json")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "--device cpu" in done.stderr
