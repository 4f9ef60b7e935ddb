"""Per-layer statistics of SmolLM2-135M-Instruct on held-out text windows: the residual stream's RMS
after each layer and the cosine similarity of each layer's input and output (1 - cos: how much a layer
changes the stream). Guides which layers to tie into the core and which to drop."""

import json
import sys

import torch
from transformers import AutoModelForCausalLM

from implicit_hf.tasks.text import TextTask

full = sys.argv[1]  # the conversion that drops nothing (outputs/smollm2_full)
model = AutoModelForCausalLM.from_pretrained(full)
task = TextTask(tokenizer=full, seq_len=64)
ids = torch.tensor(task.build_dataset("validation", 32, seed=0)["input_ids"])
states = []
layers = [*model.model.prelude, *model.model.core, *model.model.coda]
hooks = [
    layer.register_forward_hook(lambda m, i, o: states.append((i[0], o[0] if isinstance(o, tuple) else o)))
    for layer in layers
]
with torch.no_grad():
    model(ids)
rows = []
for index, (before, after) in enumerate(states):
    cos = torch.nn.functional.cosine_similarity(before, after, dim=-1).mean().item()
    rows.append({"layer": index, "rms_out": after.pow(2).mean().sqrt().item(), "one_minus_cos": 1 - cos})
    print(f"{index:2d} rms {rows[-1]['rms_out']:8.3f}  1-cos {rows[-1]['one_minus_cos']:.4f}")
json.dump(rows, open(sys.argv[2], "w"), indent=1)
