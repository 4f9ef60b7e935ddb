"""Training-step time of an implicit causal LM per gradient mode and per stabiliser, against an unrolled Llama.

The implicit model has no prelude or coda: ``--layers`` core layers looped ``--loops`` times; the
reference is a transformers ``LlamaForCausalLM`` of ``loops * layers`` layers (equal effective depth,
same width, sdpa attention). A step is forward, loss, backward and an AdamW step on one batch of
``--batch`` x ``--seq`` tokens; every setting is timed interleaved with the Llama step (alternating
which goes first) after a warm-up, and the medians of ``--repeats`` are compared:
``ratio = implicit step / Llama step``.

Settings: each gradient mode (``unroll``, ``truncated`` with ``gradient_steps``, ``jfb``, ``phantom``,
``ift``) with the plain task loss; then, on ``--stabiliser-mode``, each stabiliser alone:
``jacobian_penalty`` and ``fixed_point_penalty`` (one more core evaluation at the last iterate; the
Jacobian also a double backward), ``deep_supervision`` at half the loops, and distillation from a
frozen teacher (the Llama itself: its forward is part of the step).

Usage: python benchmarks/bench_train_step.py [--threads 1] [--out benchmarks/results/train_step.json]
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import environment, median, resolve_device, seed_everything, synchronize, write_report
from transformers import LlamaConfig, LlamaForCausalLM

from implicit_hf import ImplicitConfig, ImplicitForCausalLM
from implicit_hf.training.objective import Objective

MODES = ("unroll", "truncated", "jfb", "phantom", "ift")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2, help="core layers")
    parser.add_argument("--loops", type=int, default=8)
    parser.add_argument("--gradient-steps", type=int, default=2, help="truncated / phantom differentiable steps")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stabiliser-mode", default="truncated", choices=MODES)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/train_step.json")
    return parser.parse_args(argv)


def implicit_model(args, gradient: str, device) -> ImplicitForCausalLM:
    config = ImplicitConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        num_prelude_layers=0,
        num_core_layers=args.layers,
        num_coda_layers=0,
        num_loops=args.loops,
        gradient=gradient,
        gradient_steps=args.gradient_steps,
        attn_implementation="sdpa",
    )
    return ImplicitForCausalLM(config).to(device).train()


def llama_model(args, device) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=ImplicitConfig(hidden_size=args.hidden).intermediate_size,
        num_attention_heads=args.heads,
        num_hidden_layers=args.loops * args.layers,
        use_cache=False,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).to(device).train()


def step_function(model, batch, objective: Objective | None, loops: int | None):
    """One optimizer step of ``model`` on ``batch`` (the objective's extras when given)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        if objective is None:
            loss = model(**batch).loss
        else:
            outputs = model(**batch, num_loops=loops, **objective.forward_kwargs(loops))
            loss, _ = objective(outputs, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_pair(first, second, repeats: int, device) -> tuple[list[float], list[float]]:
    """Interleaved timings of two step functions (alternating order), after one warm-up each."""
    first(), second()
    times: tuple[list[float], list[float]] = ([], [])
    for repeat in range(repeats):
        order = ((0, first), (1, second)) if repeat % 2 == 0 else ((1, second), (0, first))
        for index, fn in order:
            synchronize(device)
            began = time.perf_counter()
            fn()
            synchronize(device)
            times[index].append(time.perf_counter() - began)
    return times


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    seed_everything(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    batch = {"input_ids": ids, "labels": ids}
    llama = llama_model(args, device)
    llama_step = step_function(llama, batch, None, None)
    teacher = llama_model(args, device).eval().requires_grad_(False)
    settings = [(mode, mode, Objective()) for mode in MODES]
    stabilised = args.stabiliser_mode
    settings += [
        (f"{stabilised}+jacobian_penalty", stabilised, Objective(jacobian_penalty=0.1)),
        (f"{stabilised}+fixed_point_penalty", stabilised, Objective(fixed_point_penalty=0.1)),
        (f"{stabilised}+deep_supervision", stabilised, Objective(deep_supervision=(args.loops // 2,))),
        (f"{stabilised}+distill", stabilised, Objective(teacher=teacher, distill_weight=0.5)),
    ]
    rows = []
    for name, gradient, objective in settings:
        seed_everything(0)
        model = implicit_model(args, gradient, device)
        implicit_times, llama_times = time_pair(
            step_function(model, batch, objective, args.loops), llama_step, args.repeats, device
        )
        row = {
            "setting": name,
            "gradient": gradient,
            "implicit_s": median(implicit_times),
            "llama_s": median(llama_times),
            "ratio": median(implicit_times) / median(llama_times),
        }
        rows.append(row)
        print(f"{name:>32}: implicit {row['implicit_s'] * 1e3:8.1f} ms  llama {row['llama_s'] * 1e3:8.1f} ms  "
              f"ratio {row['ratio']:.2f}")  # fmt: skip
    report = {
        "benchmark": "train_step",
        "description": __doc__.splitlines()[0],
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "llama_layers": args.loops * args.layers,
        "rows": rows,
        "environment": environment(device),
    }
    path = write_report(report, args.out)
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
