"""The GPU checks, in one short run: what CPU tests cannot show, ready for a lent GPU machine.

With CUDA (default ``--device cuda``; a few minutes on one GPU, hidden 512, sequence 256):

* ``bf16_training``: one training step per gradient mode under bf16 autocast: finite loss, finite
  non-zero gradients;
* ``attention``: sdpa (and flash-attention 2 when ``flash_attn`` is installed) against eager on the same
  weights: bf16 logits within tolerance;
* ``memory``: peak CUDA memory of one training step at 64 against 4 loops for jfb, phantom and ift
  (``max_memory_allocated`` above the resting memory; target <= 1.1x);
* ``cache``: cached and uncached greedy decoding give the same tokens;
* ``decode_speed``: tokens/s of cached greedy decoding against a transformers Llama of equal effective
  depth (the same layer applications per token), as in ``bench_decode.py``;
* ``multi_gpu``: with 2 or more GPUs, the same recipe under ``configs/accelerate/ddp.yaml`` and
  ``fsdp.yaml`` on 2 GPUs, final weights compared (skipped, and said so, with fewer).

Without CUDA, ``--device cpu`` runs the same code in a reduced mode (tiny sizes, fp32 attention
tolerances, saved-activation bytes instead of CUDA memory, no multi-GPU step), which the test suite
runs so that this script cannot rot. Writes a JSON report; exits 1 if a check failed.

Usage: python benchmarks/gpu_check.py [--device cuda|cpu] [--out benchmarks/results/gpu_check.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from _common import ROOT, SavedTensorMeter, environment, median, parameter_storages, timed, write_report
from bench_decode import decode
from transformers import LlamaConfig, LlamaForCausalLM

from implicit_hf import ImplicitConfig, ImplicitForCausalLM
from implicit_hf.modeling.configuration_implicit import GRADIENTS

SIZES = {
    "full": {"hidden": 512, "heads": 8, "kv_heads": 4, "intermediate": 1376, "vocab": 8192, "batch": 8, "seq": 256},
    "reduced": {"hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 128, "vocab": 128, "batch": 2, "seq": 16},
}
MEMORY_LOOPS = {"full": (4, 64), "reduced": (4, 16)}
MEMORY_TARGET = 1.1
LAYERS = {"prelude": 1, "core": 2, "coda": 1}


def width(size: dict, attention: str = "sdpa") -> dict:
    return {
        "vocab_size": size["vocab"],
        "hidden_size": size["hidden"],
        "intermediate_size": size["intermediate"],
        "num_attention_heads": size["heads"],
        "num_key_value_heads": size["kv_heads"],
        "attn_implementation": attention,
        "pad_token_id": 0,
        "eos_token_id": None,
        "bos_token_id": None,
    }


def implicit_model(size: dict, device, attention: str = "sdpa", **settings) -> ImplicitForCausalLM:
    torch.manual_seed(0)
    config = ImplicitConfig(
        num_prelude_layers=LAYERS["prelude"],
        num_core_layers=LAYERS["core"],
        num_coda_layers=LAYERS["coda"],
        solver="picard",
        tol=None,
        **{"num_loops": 4, **settings},
        **width(size, attention),
    )
    return ImplicitForCausalLM(config).to(device)


def tokens(size: dict, device, length: int | None = None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(1, size["vocab"], (size["batch"], length or size["seq"]), generator=generator).to(device)


def bf16_training(size: dict, device) -> dict:
    """One bf16-autocast training step per gradient mode: finite loss and finite, non-zero gradients."""
    results = {}
    for mode in GRADIENTS:
        model = implicit_model(size, device, gradient=mode, gradient_steps=2).train()
        ids = tokens(size, device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        loss = loss.detach()
        finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all()) for g in grads)
        norm = float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])))
        results[mode] = {"loss": float(loss), "grad_norm": norm, "passed": finite and norm > 0}
    return {"modes": results, "passed": all(r["passed"] for r in results.values())}


def attention(size: dict, device) -> dict:
    """sdpa (and flash-attention 2 when installed, on CUDA) against eager on the same weights."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tolerance = 5e-2 if dtype == torch.bfloat16 else 1e-4
    ids = tokens(size, device)
    with torch.no_grad():
        reference = implicit_model(size, device, "eager").to(dtype).eval()(ids).logits.float()
        implementations = ["sdpa"]
        if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
            implementations.append("flash_attention_2")
        results = {}
        for name in implementations:
            logits = implicit_model(size, device, name).to(dtype).eval()(ids).logits.float()
            difference = float((logits - reference).abs().max() / reference.abs().max())
            results[name] = {"max_relative_difference": difference, "passed": difference <= tolerance}
    return {
        "dtype": str(dtype),
        "tolerance": tolerance,
        "against_eager": results,
        "passed": all(r["passed"] for r in results.values()),
    }


def step_memory(model, ids: torch.Tensor, loops: int, device) -> int:
    """Bytes one training step holds beyond the resting model: CUDA's peak, or on CPU the saved activations."""
    model.zero_grad(set_to_none=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        model(ids, labels=ids, num_loops=loops).loss.backward()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with SavedTensorMeter(exclude=parameter_storages(model)) as meter:
        loss = model(ids, labels=ids, num_loops=loops).loss
    loss.backward()
    return meter.bytes


def memory(size: dict, device, mode_name: str) -> dict:
    """Training memory at many against few loops for the constant-memory gradient modes."""
    few, many = MEMORY_LOOPS[mode_name]
    ids = tokens(size, device)
    results = {}
    for mode in ("jfb", "phantom", "ift"):
        model = implicit_model(size, device, gradient=mode, gradient_steps=2).train()
        step_memory(model, ids, few, device)  # warm-up: lazy allocations, gradient buffers
        low, high = step_memory(model, ids, few, device), step_memory(model, ids, many, device)
        ratio = high / low
        results[mode] = {f"bytes_at_{few}": low, f"bytes_at_{many}": high, "ratio": ratio,
                         "passed": ratio <= MEMORY_TARGET}  # fmt: skip
    measure = "cuda max_memory_allocated" if device.type == "cuda" else "saved activation bytes"
    return {"measure": measure, "loops": [few, many], "target": MEMORY_TARGET, "modes": results,
            "passed": all(r["passed"] for r in results.values())}  # fmt: skip


def cache(size: dict, device) -> dict:
    model = implicit_model(size, device).eval()
    prompt = tokens(size, device, 8)
    cached, uncached = (decode(model, prompt, 16, use) for use in (True, False))
    return {"new_tokens": 16, "passed": bool(torch.equal(cached, uncached))}


def decode_speed(size: dict, device, repeats: int) -> dict:
    """Cached greedy tokens/s: the implicit LM at 4 loops against a Llama with the same layer applications."""
    loops = 4
    implicit = implicit_model(size, device, num_loops=loops).eval()
    depth = LAYERS["prelude"] + loops * LAYERS["core"] + LAYERS["coda"]
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(num_hidden_layers=depth, **width(size))).to(device).eval()
    prompt, new = tokens(size, device, 32), 64
    seconds = {"implicit": [], "llama": []}
    for model in (implicit, llama):
        decode(model, prompt, 4)  # warm-up
    for repeat in range(repeats):
        for name in ("implicit", "llama") if repeat % 2 == 0 else ("llama", "implicit"):
            model = implicit if name == "implicit" else llama
            elapsed, _ = timed(lambda m=model: decode(m, prompt, new), device)
            seconds[name].append(elapsed)
    rate = {name: size["batch"] * new / median(values) for name, values in seconds.items()}
    return {"loops": loops, "effective_depth": depth, "tokens_per_s": rate, "ratio": rate["implicit"] / rate["llama"]}


def multi_gpu(device) -> dict:
    """The same recipe under ddp.yaml and fsdp.yaml on 2 GPUs; their final weights compared."""
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        return {"skipped": f"needs 2 GPUs; {torch.cuda.device_count() if device.type == 'cuda' else 0} visible"}
    from safetensors.torch import load_file

    recipe = {
        "task": "text",
        "task_kwargs": {"seq_len": 64},
        "model": {"hidden_size": 256, "num_attention_heads": 8, "num_prelude_layers": 1, "num_core_layers": 2,
                  "num_coda_layers": 1, "num_loops": 4},
        "train_size": 128, "eval_size": 0, "per_device_batch_size": 8, "max_steps": 10, "seed": 0,
        "checkpoint_every": 0, "eval_every": 0, "log_every": 1, "tracker": "none",
    }  # fmt: skip
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for config in ("ddp", "fsdp"):
            path = Path(tmp) / f"{config}.yaml"
            path.write_text(yaml.safe_dump({**recipe, "output_dir": str(Path(tmp) / config)}))
            command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                       str(ROOT / "configs" / "accelerate" / f"{config}.yaml"), "--num_processes", "2",
                       "-m", "implicit_hf.training", str(path)]  # fmt: skip
            done = subprocess.run(command, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True)
            results[config] = {"returncode": done.returncode, "stderr_tail": done.stderr[-1500:]}
            if done.returncode == 0:
                results[config]["metrics"] = json.loads((Path(tmp) / config / "metrics.json").read_text())
        if all(r["returncode"] == 0 for r in results.values()):
            ddp, fsdp = (load_file(Path(tmp) / c / "model" / "model.safetensors") for c in ("ddp", "fsdp"))
            results["max_weight_difference"] = max(float((ddp[k] - fsdp[k]).abs().max()) for k in ddp)
    passed = all(results[c]["returncode"] == 0 for c in ("ddp", "fsdp")) and results["max_weight_difference"] < 1e-3
    return {**results, "passed": passed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (the real check) or cpu (reduced mode)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    parser.add_argument("--repeats", type=int, default=3, help="timed decoding runs per model (median)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible; run with --device cpu for the reduced mode")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cuda or cpu; got {args.device!r}")
    mode = "full" if device.type == "cuda" else "reduced"
    size = SIZES[mode]
    checks = {
        "bf16_training": bf16_training(size, device),
        "attention": attention(size, device),
        "memory": memory(size, device, mode),
        "cache": cache(size, device),
        "decode_speed": decode_speed(size, device, args.repeats),
        "multi_gpu": multi_gpu(device),
    }
    failed = [name for name, check in checks.items() if check.get("passed") is False]
    report = {"benchmark": "gpu_check", "mode": mode, "sizes": size, "checks": checks, "failed": failed,
              "environment": environment(device)}  # fmt: skip
    write_report(report, args.out)
    for name, check in checks.items():
        print(f"{name:14s} {'skipped: ' + check['skipped'] if 'skipped' in check else check.get('passed', 'measured')}")
    print(f"decode ratio (implicit / llama tokens/s): {checks['decode_speed']['ratio']:.3f}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
