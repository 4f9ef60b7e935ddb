"""Cached greedy decoding speed: an implicit LM against a transformers Llama of the same effective depth.

Both models have the same width (hidden, heads, KV heads, intermediate size), sdpa attention, and
decode the same prompts greedily with a KV cache (``generate(..., use_cache=True)``) in eval mode:

* implicit: ``ImplicitForCausalLM`` with ``P`` prelude, ``C`` core and ``D`` coda layers, ``K`` loops,
  Picard without a tolerance (exactly ``K`` iterations per token), its cache one slot per
  (loop, core layer);
* llama: ``LlamaForCausalLM`` with ``P + K * C + D`` layers: the same layer applications per token.

The implicit model's ``min_new_tokens = max_new_tokens`` and no EOS, so both produce exactly as
many tokens. The two are timed interleaved (alternating which goes first) after one warm-up each;
tokens/s uses the median of ``--repeats`` runs. ``ratio = implicit tokens/s / llama tokens/s`` per
``K``, target >= 0.9.

Usage: python benchmarks/bench_decode.py [--loops 4,8] [--batch 1] [--out benchmarks/results/decode.json]
"""

from __future__ import annotations

import argparse

import torch
from _common import environment, median, resolve_device, seed_everything, timed, write_report
from transformers import LlamaConfig, LlamaForCausalLM

from implicit_hf import ImplicitConfig, ImplicitForCausalLM

TARGET = 0.9


def width(args) -> dict:
    return dict(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=2048,
        attn_implementation="sdpa",
        pad_token_id=0,
        eos_token_id=None,
        bos_token_id=None,
    )


def build_implicit(args, loops: int, device: torch.device) -> ImplicitForCausalLM:
    config = ImplicitConfig(
        num_prelude_layers=args.prelude,
        num_core_layers=args.core,
        num_coda_layers=args.coda,
        num_loops=loops,
        solver="picard",
        tol=None,
        **width(args),
    )
    return ImplicitForCausalLM(config).to(device).eval()


def build_llama(args, loops: int, device: torch.device) -> LlamaForCausalLM:
    config = LlamaConfig(num_hidden_layers=args.prelude + loops * args.core + args.coda, **width(args))
    return LlamaForCausalLM(config).to(device).eval()


def decode(model, prompt: torch.Tensor, new_tokens: int, use_cache: bool = True):
    """Exactly ``new_tokens`` greedy tokens after ``prompt`` (no EOS stop)."""
    with torch.no_grad():
        return model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=0,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loops", default="4,8", help="comma-separated loop counts K")
    parser.add_argument("--prelude", type=int, default=1)
    parser.add_argument("--core", type=int, default=2)
    parser.add_argument("--coda", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/decode.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    seed_everything(0)
    prompt = torch.randint(1, args.vocab, (args.batch, args.prompt), device=device)

    runs = []
    for loops in [int(k) for k in args.loops.split(",")]:
        seed_everything(0)
        models = {"implicit": build_implicit(args, loops, device), "llama": build_llama(args, loops, device)}
        seconds = {name: [] for name in models}
        for model in models.values():  # warm-up
            decode(model, prompt, 4)
        for repeat in range(args.repeats):
            order = list(models) if repeat % 2 == 0 else list(reversed(models))
            for name in order:
                elapsed, out = timed(lambda m=models[name]: decode(m, prompt, args.new_tokens), device)
                assert out.shape[1] == args.prompt + args.new_tokens, (name, out.shape)
                seconds[name].append(elapsed)
        tokens = args.batch * args.new_tokens
        rate = {name: tokens / median(values) for name, values in seconds.items()}
        run = {
            "num_loops": loops,
            "effective_depth": args.prelude + loops * args.core + args.coda,
            "tokens_per_s": rate,
            "seconds": seconds,
            "ratio": rate["implicit"] / rate["llama"],
            "target_met": rate["implicit"] / rate["llama"] >= TARGET,
        }
        runs.append(run)
        print(
            f"K={loops:3d} depth={run['effective_depth']:3d}: implicit {rate['implicit']:8.1f} tok/s, "
            f"llama {rate['llama']:8.1f} tok/s, ratio {run['ratio']:.3f}"
        )
    report = {
        "benchmark": "cached greedy decoding tokens/s, implicit vs Llama of equal effective depth and width",
        "target": f"ratio >= {TARGET}",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "environment": environment(device),
        "runs": runs,
    }
    print("wrote", write_report(report, args.out))


if __name__ == "__main__":
    main()
