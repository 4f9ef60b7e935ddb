"""Anderson's settings probed on other problems than the benchmark's: evaluations to the relative residual 1e-4 of
Anderson (memory m, regularization r, damping d) over Picard's, on `benchmarks/bench_solvers.py`'s problem built
with probe seeds 1-4 (the benchmark uses seed 0). Usage: python results/solvers/probes/anderson_settings.py OUT.json"""

import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
from bench_solvers import build_problem  # noqa: E402

from implicit_hf.modeling.solvers import anderson, picard  # noqa: E402

torch.set_num_threads(1)
SEEDS, TOL, MAX_ITER = (1, 2, 3, 4), 1e-4, 500
MEMORIES, REGULARIZATIONS, DAMPINGS = (3, 5, 6, 8, 10), (1e-4, 1e-6), (1.0, 0.8, 0.6)


def evaluations(solve, seed: int) -> int:
    problem = build_problem(seed, batch=8, seq=32, hidden=128, heads=4, scale=7.0)
    with torch.no_grad():
        _, stats = solve(problem.evaluate, torch.zeros_like(problem.x), MAX_ITER, tol=TOL)
    assert bool(stats.converged.all()), f"seed {seed}: not every sample converged"
    return int(stats.steps.sum())


rows = []
picard_evals = {seed: evaluations(picard, seed) for seed in SEEDS}
for memory, regularization, damping in itertools.product(MEMORIES, REGULARIZATIONS, DAMPINGS):
    ratios = []
    for seed in SEEDS:

        def solve(f, z0, max_iter, tol, m=memory, r=regularization, d=damping):
            return anderson(f, z0, max_iter, tol=tol, memory=m, regularization=r, damping=d)

        ratios.append(evaluations(solve, seed) / picard_evals[seed])
    setting = {"memory": memory, "regularization": regularization, "damping": damping}
    rows.append({**setting, "ratios": ratios, "mean": sum(ratios) / len(ratios)})
    print(rows[-1], flush=True)
Path(sys.argv[1]).write_text(json.dumps({"seeds": SEEDS, "picard_evals": picard_evals, "rows": rows}, indent=1))
