"""Halting on state tracking: the loops generate(tol=...) spends per answer at each step count, against the
accuracy of a fixed loop count (the answer is one generated token; the prompt halts together in prefill).

    python results/state_tracking/halting.py MODEL_DIR OUT.json [--steps 4,8,16,32] [--tols 1e-3,1e-4]
"""

import argparse
import json
import time
from pathlib import Path

import torch

from implicit_hf.eval.generative import greedy_completions, recorded_loop_steps
from implicit_hf.tasks.models import load_model, task_for_model

MAX_LOOPS = 128


def answers_at(model, task, rows, loops: int, tol: float | None) -> dict:
    prompts = [task.prompt(row) for row in rows]
    began = time.perf_counter()
    with recorded_loop_steps(model) as steps:
        texts = greedy_completions(
            model, task.tokenizer, prompts, loops, batch_size=100, tol=tol if tol is not None else 0
        )
    seconds = time.perf_counter() - began
    correct = [text.strip() == row["completion"].strip() for text, row in zip(texts, rows, strict=True)]
    per_answer = torch.cat(steps).double()
    return {
        "loops": loops,
        "tol": tol,
        "exact_match": sum(correct) / len(correct),
        "loops_per_answer": float(per_answer.mean()),
        "loops_per_answer_max": int(per_answer.max()),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", default="4,8,16,32")
    parser.add_argument("--tols", default="1e-2,1e-3,1e-4")
    parser.add_argument("--n", type=int, default=500)
    args = parser.parse_args()
    task, kwargs = task_for_model(args.model, None, None)
    model = load_model(args.model, task.head)
    results = []
    for steps in (int(s) for s in args.steps.split(",")):
        task, _ = task_for_model(args.model, None, {**kwargs, "steps": steps})
        rows = list(task.build_dataset("test", args.n, 0))
        fixed = answers_at(model, task, rows, MAX_LOOPS, None)
        halted = [answers_at(model, task, rows, MAX_LOOPS, float(tol)) for tol in args.tols.split(",")]
        results.append({"steps": steps, "fixed": fixed, "halting": halted})
        print(steps, fixed, *halted, sep="\n  ")
    args.out.write_text(
        json.dumps({"model": Path(args.model).parent.name, "max_loops": MAX_LOOPS, "results": results}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
