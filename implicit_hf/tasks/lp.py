"""Linear programs as token-regression problems (the LP distribution of arXiv 2510.03638).

An instance is ``min cᵀy  s.t.  A_ub y <= b_ub,  A_eq y = b_eq,  l <= y <= u`` with ``m`` constraint
rows (each an equality with probability ``equality_prob``, else ``<=``) and ``n`` variables:

* ``A``: exactly ``nonzeros`` nonzero entries at random positions, values ``N(0, 1)``;
* ``c ~ 0.01 U(-1, 1)``, ``b ~ U(-1, 1)``;
* bounds: two ``N(0, 10²)`` draws per variable, sorted into ``(l, u)``.

Instances are solved with HiGHS (`scipy.optimize.linprog`); infeasible ones are dropped and redrawn.

Sequence form: one token per constraint (the first ``m`` tokens), then one per variable (``n``
tokens); ``position_ids`` are all zero (the problem is permutation-invariant and zero positions
make RoPE the identity). The constraint matrix enters as edge features ``[A_ij, 1{A_ij != 0}]`` on
both constraint→variable and variable→constraint pairs (zeros elsewhere), which the model turns
into a learned per-head attention bias.

Token features (``input_features``; every entry is O(1) on this distribution):

=====  =========================  ===================  ======================================
col    constraint token i         variable token j     note
=====  =========================  ===================  ======================================
0      1                          0                    token type: constraint
1      0                          1                    token type: variable
2      b_i / B_SCALE              0                    B_SCALE = 1, b ~ U(-1, 1)
3      1{row i is =}              0
4      1{row i is <=}             0
5      0                          c_j / C_SCALE        C_SCALE = 0.01, so c_j * 100 ~ U(-1, 1)
6      0                          l_j / Y_SCALE        Y_SCALE = 10 (bounds ~ N(0, 10²))
7      0                          u_j / Y_SCALE
8      0                          g_j / Y_SCALE        derived feature
9      (A_i g - b_i) / R_SCALE    0                    derived feature, R_SCALE = 30
=====  =========================  ===================  ======================================

Edge features: ``[A_ij / A_SCALE, 1{A_ij != 0}]`` with ``A_SCALE = 1`` (``A_ij ~ N(0, 1)``).

``g`` is the solution of the box-only LP (no rows): ``g_j = l_j`` if ``c_j > 0`` else ``u_j``. About
three quarters of the variables of an optimal vertex sit at ``g_j``, and ``A_i g - b_i`` says
which rows ``g`` violates (so which variables must move); ``derived_features=False`` drops both
columns (``F = 8``).

Targets: ``labels[b, m + j, 0] = y*_j / Y_SCALE`` at variable tokens, NaN at constraint tokens and
padding (ignored by the regression loss); `decode` multiplies by ``Y_SCALE`` again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import datasets
import numpy as np
import torch
from scipy.optimize import linprog

from ..checks import Fraction, at_least
from .base import Example, TaskAdapter, check_one_per_row, list_feature, row_generators

B_SCALE = 1.0  # b ~ U(-1, 1) already
C_SCALE = 0.01  # c ~ 0.01 U(-1, 1): c / C_SCALE ~ U(-1, 1)
Y_SCALE = 10.0  # bounds ~ N(0, 10²), so l / 10, u / 10 and the solution y / 10 are O(1)
R_SCALE = 30.0  # A_i g - b_i has std ~ 30 at the default sizes (about 10 N(0,1) * O(10) terms per row)
A_SCALE = 1.0  # A_ij ~ N(0, 1) already

BASE_FEATURES = 8
DERIVED_FEATURES = 2
EDGE_FEATURES = 2
CONSTRAINT, VARIABLE = 0, 1  # columns of the token-type one-hot

_MAX_DRAWS_PER_INSTANCE = 1000  # consecutive infeasible draws before build_dataset gives up
_PERTURB_RETRIES = 100  # noise redraws per instance before perturb gives up


class LinearProgramTask(TaskAdapter):
    """Predict the optimal solution of a random sparse LP, one regression output per variable token."""

    name = "lp"
    head = "token_regression"
    quality_metric = "relative_error"
    higher_is_better = False
    metric_name = "lp_metrics"

    def __init__(
        self,
        cache_dir: str | Path | None = None,
        num_constraints: Annotated[int, at_least(1)] = 10,
        num_variables: Annotated[int, at_least(1)] = 50,
        nonzeros: Annotated[int, at_least(0)] | None = None,
        equality_prob: Fraction = 0.3,
        derived_features: bool = True,
    ):
        super().__init__(cache_dir)
        nonzeros = 2 * num_variables if nonzeros is None else nonzeros
        if nonzeros > num_constraints * num_variables:
            raise ValueError(
                f"nonzeros ({nonzeros}) cannot exceed num_constraints * num_variables "
                f"({num_constraints * num_variables})"
            )
        self.num_constraints = int(num_constraints)
        self.num_variables = int(num_variables)
        self.nonzeros = int(nonzeros)
        self.equality_prob = float(equality_prob)
        self.derived_features = derived_features

    # ------------------------------------------------------------------ model

    @property
    def num_features(self) -> int:
        """Token feature size ``F`` (see the module docstring for the layout)."""
        return BASE_FEATURES + (DERIVED_FEATURES if self.derived_features else 0)

    def model_config(self) -> dict[str, Any]:
        return {
            "problem_type": "regression",
            "num_labels": 1,
            "is_causal": False,
            "input_features": self.num_features,
            "edge_features": EDGE_FEATURES,
        }

    # ------------------------------------------------------------------ data

    def dataset_path(self, split: str, n: int, seed: int) -> Path:
        """Where `build_dataset` caches ``(split, n, seed)``."""
        name = f"{split}-m{self.num_constraints}-n{self.num_variables}-nnz{self.nonzeros}-{n}-seed{seed}"
        if self.equality_prob != 0.3:  # keep the default's name short; other settings must not collide
            name += f"-eq{self.equality_prob:g}"
        return self.cache_dir / name

    def features(self):
        """The rows of `_row`: the LP (``A``, ``b``, ``c``, ``lower``, ``upper``, ``is_equality``), its ``solution``
        and ``objective``."""
        vector = list_feature(datasets.Value("float64"))
        return datasets.Features(
            {
                "A": list_feature(vector),
                "b": vector,
                "c": vector,
                "lower": vector,
                "upper": vector,
                "is_equality": list_feature(datasets.Value("bool")),
                "solution": vector,
                "objective": datasets.Value("float64"),
            }
        )

    def generate(self, rng: np.random.Generator, n: int, split: str) -> list[Example]:
        """``n`` solved instances (an infeasible draw is dropped and redrawn)."""
        return [self._draw_solved(rng) for _ in range(n)]

    def _draw_solved(self, rng: np.random.Generator) -> Example:
        m, n = self.num_constraints, self.num_variables
        for _ in range(_MAX_DRAWS_PER_INSTANCE):
            A = np.zeros((m, n))
            A.flat[rng.choice(m * n, size=self.nonzeros, replace=False)] = rng.standard_normal(self.nonzeros)
            c = 0.01 * rng.uniform(-1.0, 1.0, n)
            b = rng.uniform(-1.0, 1.0, m)
            bounds = np.sort(rng.normal(0.0, 10.0, (n, 2)), axis=1)
            is_eq = rng.random(m) < self.equality_prob
            solved = solve_lp(A, b, c, bounds[:, 0], bounds[:, 1], is_eq)
            if solved is not None:
                return _row(A, b, c, bounds[:, 0], bounds[:, 1], is_eq, *solved)
        raise RuntimeError(
            f"no feasible LP in {_MAX_DRAWS_PER_INSTANCE} draws (m={m}, n={n}, nonzeros={self.nonzeros}, "
            f"equality_prob={self.equality_prob})"
        )

    # ------------------------------------------------------------------ encode / decode

    def encode(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """Model inputs for rows of possibly different sizes, padded to the longest (mask 0).

        Returns ``input_features (B, T, F)``, ``edge_features (B, T, T, 2)`` (float32),
        ``attention_mask (B, T)``, ``position_ids (B, T)`` (long, zeros) and, when every row has a
        ``solution``, ``labels (B, T, 1)`` (``y / 10`` at variables, NaN elsewhere).
        """
        problems = [_arrays(example) for example in examples]
        lengths = [p["A"].shape[0] + p["A"].shape[1] for p in problems]
        batch, length = len(problems), max(lengths)
        features = np.zeros((batch, length, self.num_features), dtype=np.float32)
        edges = np.zeros((batch, length, length, EDGE_FEATURES), dtype=np.float32)
        mask = np.zeros((batch, length), dtype=np.int64)
        with_labels = all(example.get("solution") is not None for example in examples)
        labels = np.full((batch, length, 1), np.nan, dtype=np.float32)
        for k, p in enumerate(problems):
            A = p["A"]
            m, n = A.shape
            mask[k, : m + n] = 1
            rows, cols = slice(0, m), slice(m, m + n)
            features[k, rows, CONSTRAINT] = 1.0
            features[k, rows, 2] = p["b"] / B_SCALE
            features[k, rows, 3] = p["is_equality"]
            features[k, rows, 4] = ~p["is_equality"]
            features[k, cols, VARIABLE] = 1.0
            features[k, cols, 5] = p["c"] / C_SCALE
            features[k, cols, 6] = p["lower"] / Y_SCALE
            features[k, cols, 7] = p["upper"] / Y_SCALE
            if self.derived_features:
                greedy = np.where(p["c"] > 0, p["lower"], p["upper"])
                features[k, cols, 8] = greedy / Y_SCALE
                features[k, rows, 9] = (A @ greedy - p["b"]) / R_SCALE
            edges[k, rows, cols, 0] = A / A_SCALE
            edges[k, rows, cols, 1] = A != 0
            edges[k, cols, rows] = edges[k, rows, cols].transpose(1, 0, 2)
            if with_labels:
                solution = np.asarray(examples[k]["solution"], dtype=np.float64)
                if solution.shape != (n,):
                    raise ValueError(f"example {k}: solution has shape {solution.shape}, expected ({n},)")
                labels[k, cols, 0] = solution / Y_SCALE
        encoded = {
            "input_features": torch.from_numpy(features),
            "edge_features": torch.from_numpy(edges),
            "attention_mask": torch.from_numpy(mask),
            "position_ids": torch.zeros((batch, length), dtype=torch.long),
        }
        if with_labels:
            encoded["labels"] = torch.from_numpy(labels)
        return encoded

    def decode(self, logits: torch.Tensor, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Predicted solution ``y`` (length ``n_b``, float32, on the CPU) of every sample."""
        if logits.dim() == 2:
            logits = logits.unsqueeze(-1)
        is_variable = inputs["input_features"][..., VARIABLE] > 0.5
        if inputs.get("attention_mask") is not None:
            is_variable = is_variable & inputs["attention_mask"].bool()
        values = logits[..., 0].detach().float().cpu() * Y_SCALE
        is_variable = is_variable.cpu()
        return [values[k][is_variable[k]] for k in range(values.shape[0])]

    # ------------------------------------------------------------------ metrics

    def compute_metrics(self, predictions: list[torch.Tensor], examples: list[Example]) -> dict[str, float]:
        """``relative_error`` (headline), ``relative_error_max``, ``objective_gap``, ``constraint_violation``."""
        check_one_per_row(predictions, examples)
        fields = {name: [example[name] for example in examples] for name in ("c", "A", "b", "lower", "upper")}
        return self.load_metric().compute(
            predictions=[np.asarray(_numpy(p), dtype=np.float64) for p in predictions],
            references=[np.asarray(example["solution"], dtype=np.float64) for example in examples],
            is_equality=[example["is_equality"] for example in examples],
            **fields,
        )

    # ------------------------------------------------------------------ perturbations

    def perturb_rows(self, examples: list[Example], eps: float, seed: int) -> tuple[list[Example], torch.Tensor]:
        """Rows with Gaussian noise ``δ`` of norm exactly ``eps`` on (nonzeros of A, b, c, l, u), re-solved.

        ``δ`` is drawn in the raw units of the rows (the same units as ``||y(x+δ) - y(x)||`` of
        decoded solutions). The sparsity pattern and the row types stay; a draw with ``l > u`` or an
        infeasible perturbed LP is redrawn, up to 100 times per row, then `RuntimeError`.
        Deterministic in ``(examples, eps, seed)``.
        """
        generators = row_generators(seed, len(examples))
        perturbed = []
        for k, (example, rng) in enumerate(zip(examples, generators, strict=True)):
            p = _arrays(example)
            nonzero = np.flatnonzero(p["A"])
            m, n = p["A"].shape
            for _ in range(_PERTURB_RETRIES):
                delta = rng.standard_normal(nonzero.size + m + 3 * n)
                delta *= eps / np.linalg.norm(delta) if eps > 0 else 0.0
                parts = np.split(delta, np.cumsum([nonzero.size, m, n, n]))
                A = p["A"].copy()
                A.flat[nonzero] += parts[0]
                b, c, lower, upper = p["b"] + parts[1], p["c"] + parts[2], p["lower"] + parts[3], p["upper"] + parts[4]
                if np.any(lower > upper) or np.any(A.flat[nonzero] == 0):
                    continue
                solved = solve_lp(A, b, c, lower, upper, p["is_equality"])
                if solved is not None:
                    perturbed.append(_row(A, b, c, lower, upper, p["is_equality"], *solved))
                    break
            else:
                raise RuntimeError(
                    f"example {k}: no feasible perturbation of norm {eps} in {_PERTURB_RETRIES} draws "
                    "(l > u or the perturbed LP is infeasible); use a smaller eps"
                )
        return perturbed, torch.full((len(examples),), float(eps), dtype=torch.float64)


# ---------------------------------------------------------------------- helpers


def solve_lp(
    A: np.ndarray,
    b: np.ndarray,
    c: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    is_equality: np.ndarray,
) -> tuple[np.ndarray, float] | None:
    """``(solution, objective)`` of the LP with HiGHS, or ``None`` when it is infeasible, unbounded or fails."""
    eq = np.asarray(is_equality, dtype=bool)
    ub = ~eq
    result = linprog(
        c,
        A_ub=A[ub] if ub.any() else None,
        b_ub=b[ub] if ub.any() else None,
        A_eq=A[eq] if eq.any() else None,
        b_eq=b[eq] if eq.any() else None,
        bounds=np.stack([lower, upper], axis=1),
        method="highs",
    )
    if result.status != 0 or result.x is None:
        return None
    return np.asarray(result.x, dtype=np.float64), float(result.fun)


def _row(A, b, c, lower, upper, is_equality, solution, objective) -> Example:
    return {
        "A": A.tolist(),
        "b": np.asarray(b, dtype=np.float64).tolist(),
        "c": np.asarray(c, dtype=np.float64).tolist(),
        "lower": np.asarray(lower, dtype=np.float64).tolist(),
        "upper": np.asarray(upper, dtype=np.float64).tolist(),
        "is_equality": np.asarray(is_equality, dtype=bool).tolist(),
        "solution": solution.tolist(),
        "objective": float(objective),
    }


def _arrays(example: Example) -> dict[str, np.ndarray]:
    """The LP data of a row as float64 / bool arrays, checked for consistent sizes."""
    b = np.asarray(example["b"], dtype=np.float64).reshape(-1)
    c = np.asarray(example["c"], dtype=np.float64).reshape(-1)
    m, n = b.shape[0], c.shape[0]
    arrays = {
        "A": np.asarray(example["A"], dtype=np.float64).reshape(m, n),
        "b": b,
        "c": c,
        "lower": np.asarray(example["lower"], dtype=np.float64).reshape(-1),
        "upper": np.asarray(example["upper"], dtype=np.float64).reshape(-1),
        "is_equality": np.asarray(example["is_equality"], dtype=bool).reshape(-1),
    }
    if arrays["lower"].shape != (n,) or arrays["upper"].shape != (n,) or arrays["is_equality"].shape != (m,):
        shapes = {name: value.shape for name, value in arrays.items()}
        raise ValueError(f"inconsistent LP sizes: m={m}, n={n}, shapes {shapes}")
    return arrays


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().double().cpu().numpy()
    return np.asarray(x)
