"""Halting on the healed SmolLM2: cached greedy decoding at a fixed loop count against `generate(tol=...)`
(per-token halting, at most the largest count). Prompts: the first 16 tokens of the
first 16 held-out text windows; 32 new tokens each, one prompt at a time. Reports mean loops per
decoded token (from each forward pass's `loop_stats`), tokens/s, and how many prompts decode to the
same tokens as at the fixed count. Usage: python halting.py MODEL_DIR OUT.json"""

import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM

import implicit_hf  # noqa: F401  (registers the Auto classes)
from implicit_hf.tasks.text import TextTask

model_dir, out_path = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
windows = TextTask(tokenizer=model_dir, seq_len=64).build_dataset("test", 100, seed=0)["input_ids"][:16]
prompts = [torch.tensor([w[:16]]) for w in windows]
steps: list[float] = []
model.register_forward_hook(lambda module, args, output: steps.append(output.loop_stats.steps.float().mean().item()))


def decode(**settings) -> dict:
    steps.clear()
    start = time.perf_counter()
    with torch.no_grad():
        outputs = [model.generate(p, max_new_tokens=32, do_sample=False, **settings)[0, 16:] for p in prompts]
    seconds = time.perf_counter() - start
    tokens = sum(len(o) for o in outputs)
    return {
        "settings": settings,
        "tokens": [o.tolist() for o in outputs],
        "tokens_per_s": tokens / seconds,
        "mean_loops_per_token": sum(steps[1:]) / max(len(steps) - 1, 1),
        "first_pass_loops": steps[0],
    }


runs = [decode(num_loops=k) for k in (3, 6, 24)]
runs += [decode(num_loops=24, tol=tol) for tol in (1e-2, 1e-3, 3e-4, 1e-4)]
reference = {r["settings"]["num_loops"]: r["tokens"] for r in runs if "tol" not in r["settings"]}
summary = []
for r in runs:
    same = sum(a == b for a, b in zip(r["tokens"], reference[24], strict=True))
    # decoded tokens equal to the 24-loop ones, up to each prompt's first difference
    prefix = sum(
        next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
        for a, b in zip(r["tokens"], reference[24], strict=True)
    )
    summary.append(
        {
            **{k: v for k, v in r.items() if k != "tokens"},
            "same_greedy_as_24_loops": f"{same}/{len(prompts)}",
            "tokens_before_first_difference": f"{prefix}/{sum(len(a) for a in reference[24])}",
        }
    )
    print(summary[-1])
json.dump(summary, open(out_path, "w"), indent=1)
