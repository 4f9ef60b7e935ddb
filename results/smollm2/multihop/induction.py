"""In-context copying before any multihop fine-tune: does a model still look tokens up in its context?
32 sequences of 24 random token ids, each written twice; the loss on the second copy (the first token
of it excluded) is near zero for a model with working induction heads and near ln(vocabulary) for one
without. Usage: python induction.py OUT.json MODEL_DIR:LOOPS[,LOOPS...] [MODEL_DIR:LOOPS ...]"""

import json
import sys

import torch
import torch.nn.functional as F

LENGTH, COUNT = 24, 32


def repeated_sequences() -> torch.Tensor:
    """``COUNT`` rows of ``LENGTH`` random token ids (seed 0), each row written twice."""
    half = torch.randint(1000, 20000, (COUNT, LENGTH), generator=torch.Generator().manual_seed(0))
    return torch.cat([half, half], dim=1)


def copy_losses(logits: torch.Tensor, input_ids: torch.Tensor) -> dict[str, float]:
    """Mean next-token loss on the first copy and on the second (the repeated part)."""
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")
    return {"first_copy": nll[:, : LENGTH - 1].mean().item(), "second_copy": nll[:, LENGTH:].mean().item()}


def main(out_path: str, specs: list[str]) -> None:
    from transformers import AutoModelForCausalLM

    import implicit_hf  # noqa: F401  (registers the Auto classes)

    input_ids, results = repeated_sequences(), {}
    for spec in specs:
        model_dir, counts = spec.rsplit(":", 1)
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        results[model_dir] = {}
        for k in (int(c) for c in counts.split(",")):
            with torch.no_grad():
                results[model_dir][k] = copy_losses(model(input_ids, num_loops=k).logits, input_ids)
            print(model_dir, k, results[model_dir][k], flush=True)
    with open(out_path, "w") as f:
        json.dump({"length": LENGTH, "count": COUNT, "losses": results}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
