"""In-context copying before any multihop fine-tune: does a model still look tokens up in its context?
32 sequences of 24 random token ids, each written twice; the loss on the second copy (the first token
of it excluded) is near zero for a model with working induction heads and near ln(vocabulary) for one
without. Usage: python induction.py OUT.json MODEL_DIR:LOOPS[,LOOPS...] [MODEL_DIR:LOOPS ...]"""

import json
import sys

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import implicit_hf  # noqa: F401  (registers the Auto classes)

LENGTH, COUNT = 24, 32
generator = torch.Generator().manual_seed(0)
half = torch.randint(1000, 20000, (COUNT, LENGTH), generator=generator)
input_ids = torch.cat([half, half], dim=1)


def copy_losses(model_dir: str, loops: list[int]) -> dict[int, dict[str, float]]:
    """Mean next-token loss on the first copy and on the second (the repeated part), per loop count."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    losses = {}
    for k in loops:
        with torch.no_grad():
            logits = model(input_ids, num_loops=k).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
        losses[k] = {"first_copy": nll[:, : LENGTH - 1].mean().item(), "second_copy": nll[:, LENGTH:].mean().item()}
        print(model_dir, k, losses[k], flush=True)
    return losses


out_path, specs = sys.argv[1], sys.argv[2:]
results = {}
for spec in specs:
    model_dir, counts = spec.rsplit(":", 1)
    results[model_dir] = copy_losses(model_dir, [int(c) for c in counts.split(",")])
with open(out_path, "w") as f:
    json.dump({"length": LENGTH, "count": COUNT, "losses": results}, f, indent=1)
