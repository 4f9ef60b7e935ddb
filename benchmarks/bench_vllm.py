"""Serving speed: greedy tokens/s of vLLM against Hugging Face ``generate`` on the same implicit checkpoint.

A checkpoint of ``--hidden`` width (head_dim 64, which vLLM's CPU attention needs) is written, both
generate ``--new-tokens`` tokens greedily for the same ``--batch`` prompts of different lengths at each
loop count, and the outputs are compared token for token (where they part, HF's logit gap between the
two tokens on the shared prefix is recorded). HF: one batched, left-padded
``generate`` with the KV cache (median of ``--repeats`` runs). vLLM: runs in its own environment
(``make vllm-env``; ``--vllm-python``), one engine per loop count, timed after a warm-up.

Usage: python benchmarks/bench_vllm.py [--loops 2,8] [--out benchmarks/results/vllm.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from _common import ROOT, environment, median, write_report

from implicit_hf import ImplicitConfig, ImplicitForCausalLM


def first_difference(a: list[list[int]], b: list[list[int]]) -> list[int | None]:
    """Per prompt, the first generated position where the two disagree (None: identical)."""
    return [
        next((i for i, (x, y) in enumerate(zip(p, q, strict=True)) if x != y), None) for p, q in zip(a, b, strict=True)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loops", default="2,8")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--out", default="benchmarks/results/vllm.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loops = [int(k) for k in args.loops.split(",")]
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, args.vocab, (8 + 4 * k,), generator=generator).tolist() for k in range(args.batch)]

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        torch.manual_seed(0)
        config = ImplicitConfig(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            num_attention_heads=args.hidden // 64,
            num_key_value_heads=max(1, args.hidden // 128),
            head_dim=64,
            num_prelude_layers=1,
            num_core_layers=2,
            num_coda_layers=1,
            num_loops=loops[0],
            initializer_range=0.05,
            max_position_embeddings=256,
            pad_token_id=0,
            eos_token_id=1,
        )
        model = ImplicitForCausalLM(config).eval()
        model.save_pretrained(work / "ckpt")
        # vLLM runs with ignore_eos (it may pick EOS and go on); HF's equivalent is generating without an EOS
        # (min_new_tokens would instead forbid EOS and pick the runner-up)
        model.generation_config.eos_token_id = None
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast

        vocab = {f"t{i}": i for i in range(args.vocab)}
        tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t2"))
        PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="t0", eos_token="t1").save_pretrained(
            work / "ckpt"
        )

        request = work / "request.json"
        request.write_text(json.dumps({"prompts": prompts, "max_new_tokens": args.new_tokens, "loops": loops}))
        began = time.perf_counter()
        run = subprocess.run(
            [
                args.vllm_python,
                "-m",
                "implicit_hf.integrations.vllm_generate",
                str(work / "ckpt"),
                str(request),
                str(work / "vllm.json"),
            ],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if run.returncode != 0:
            raise SystemExit(run.stderr[-4000:])
        served = json.loads((work / "vllm.json").read_text())
        vllm_wall = time.perf_counter() - began

        length = max(len(p) for p in prompts)
        input_ids = torch.zeros(len(prompts), length, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for k, prompt in enumerate(prompts):
            input_ids[k, length - len(prompt) :] = torch.tensor(prompt)
            attention_mask[k, length - len(prompt) :] = 1
        runs = []
        for count in loops:
            seconds, tokens = [], None
            for _ in range(args.repeats):
                with torch.no_grad():
                    start = time.perf_counter()
                    out = model.generate(
                        input_ids,
                        attention_mask=attention_mask,
                        max_new_tokens=args.new_tokens,
                        do_sample=False,
                        num_loops=count,
                        pad_token_id=0,
                    )
                    seconds.append(time.perf_counter() - start)
                tokens = out[:, length:].tolist()
            hf_rate = args.batch * args.new_tokens / median(seconds)
            differences = first_difference(tokens, served[str(count)]["tokens"])
            # Where the two part ways: how far apart HF's own logits for the two tokens are on the shared prefix
            # (a near tie means float rounding between the two implementations decided, not a defect).
            gaps = []
            for k, position in enumerate(differences):
                if position is None:
                    continue
                prefix = prompts[k] + tokens[k][:position]
                with torch.no_grad():
                    logits = model(torch.tensor([prefix]), num_loops=count, use_cache=False).logits[0, -1]
                gap = float(logits[tokens[k][position]] - logits[served[str(count)]["tokens"][k][position]])
                gaps.append({"prompt": k, "position": position, "hf_logit_gap": gap})
            vllm_rate = served[str(count)]["tokens_per_s"]
            runs.append(
                {
                    "num_loops": count,
                    "hf_tokens_per_s": hf_rate,
                    "vllm_tokens_per_s": vllm_rate,
                    "vllm_over_hf": vllm_rate / hf_rate,
                    "outputs_equal": tokens == served[str(count)]["tokens"],
                    "first_difference": differences,
                    "logit_gaps_at_differences": gaps,
                }
            )
            print(
                f"K={count}: HF {hf_rate:.1f} tok/s, vLLM {vllm_rate:.1f} tok/s, equal={runs[-1]['outputs_equal']}, "
                f"first difference per prompt {runs[-1]['first_difference']}"
            )
    report = {
        "benchmark": "greedy decoding tokens/s, vLLM (CPU backend) vs Hugging Face generate, same checkpoint",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "environment": environment(torch.device("cpu")),
        "vllm_process_wall_s": vllm_wall,
        "runs": runs,
    }
    print("wrote", write_report(report, args.out))


if __name__ == "__main__":
    main()
