"""Table and plot of results/smollm2/multihop: lm-eval accuracy against loops for every hop count, the
fine-tuned implicit SmolLM2 (implicit/) against the fine-tuned 30-layer original (original/, a dashed line),
with the estimated forward FLOPs per token of each point (`implicit_hf.eval.estimate_flops` at the mean
prompt length of the hop count). Usage: python summarise.py RESULTS_DIR LM_EVAL_DATA_DIR"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from implicit_hf import ImplicitConfig  # noqa: E402
from implicit_hf.eval import estimate_flops  # noqa: E402

results, data = Path(sys.argv[1]), Path(sys.argv[2])


def accuracies(folder: Path) -> dict[int, dict[int, tuple[float, float]]]:
    """``{hops: {loops: (acc, stderr)}}`` of an `implicit-hf lm-eval` results.json."""
    report = json.loads((folder / "results.json").read_text())
    table: dict[int, dict[int, tuple[float, float]]] = {}
    for run in report["runs"]:
        for task, metrics in run["tasks"].items():
            hops = int(task.removeprefix("multihop_hops"))
            table.setdefault(hops, {})[run["loops"]] = (metrics["acc"], run["stderr"][task]["acc"])
    return table


def config_of(folder: Path) -> ImplicitConfig:
    model_dir = json.loads((folder / "results.json").read_text())["model"]["model_dir"]
    return ImplicitConfig.from_pretrained(model_dir)


def flops_per_token(config: ImplicitConfig, tokens: int, loops: int) -> float:
    return estimate_flops(config, tokens, loops, head_outputs=config.vocab_size) / tokens


implicit, original = accuracies(results / "implicit"), accuracies(results / "original")
implicit_config, original_config = config_of(results / "implicit"), config_of(results / "original")
implicit_dir = json.loads((results / "implicit/results.json").read_text())["model"]["model_dir"]
tokenizer = AutoTokenizer.from_pretrained(implicit_dir)
prompt_tokens = {}
for hops in implicit:
    prompts = [json.loads(line)["prompt"] for line in (data / f"multihop_hops{hops}.jsonl").read_text().splitlines()]
    prompt_tokens[hops] = round(sum(len(tokenizer(p)["input_ids"]) for p in prompts) / len(prompts))

loops = sorted(next(iter(implicit.values())))
lines = [
    "| hops | prompt tokens | " + " | ".join(f"{k} loops" for k in loops) + " | original (30 layers) |",
    "|---" * (len(loops) + 3) + "|",
]
for hops in sorted(implicit):
    cells = " | ".join(f"{implicit[hops][k][0]:.3f}" for k in loops)
    lines.append(f"| {hops} | {prompt_tokens[hops]} | {cells} | {original[hops][1][0]:.3f} |")
tokens = prompt_tokens[min(prompt_tokens)]
lines += [
    "",
    f"GFLOPs per token (forward, {tokens}-token prompt): "
    + ", ".join(f"{k} loops {flops_per_token(implicit_config, tokens, k) / 1e9:.3f}" for k in loops)
    + f"; original {flops_per_token(original_config, tokens, 1) / 1e9:.3f}",
]
(results / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))

fig, axes = plt.subplots(1, len(implicit), figsize=(3.2 * len(implicit), 3.4), sharey=True)
for ax, hops in zip(axes, sorted(implicit), strict=True):
    acc = [implicit[hops][k][0] for k in loops]
    err = [implicit[hops][k][1] for k in loops]
    ax.errorbar(loops, acc, yerr=err, marker="o", capsize=2, label="implicit (LoRA)")
    ax.axhline(original[hops][1][0], linestyle="--", color="k", label="original 30 layers (LoRA)")
    ax.axhline(0.1, linestyle=":", color="grey", label="chance")
    original_flops = flops_per_token(original_config, prompt_tokens[hops], 1)
    for k, a in zip(loops, acc, strict=True):
        ratio = flops_per_token(implicit_config, prompt_tokens[hops], k) / original_flops
        ax.annotate(f"{ratio:.2f}", (k, a), textcoords="offset points", xytext=(0, 6), fontsize=6, ha="center")
    ax.set_xscale("log", base=2)
    ax.set_title(f"{hops} hops" + (" (trained)" if hops <= 4 else " (beyond training)"), fontsize=9)
    ax.set_xlabel("loops")
axes[0].set_ylabel("lm-eval acc (held-out)")
axes[0].legend(fontsize=6)
fig.suptitle("multihop, SmolLM2-135M: accuracy vs loops (labels: FLOPs per token / original's)", fontsize=9)
fig.tight_layout()
fig.savefig(results / "accuracy_vs_loops.png", dpi=120)
