"""PNG plots of a loop-count sweep (matplotlib, Agg backend; no display needed).

Every function takes the report `implicit_hf.eval.harness.run_eval` writes to ``results.json``
(``task``, ``model``, ``records``, ``baselines``) and a path. Loop axes are log2-scaled; the model's
training loop count is a vertical dotted line and each explicit baseline a horizontal dashed line
labelled with its name on the quality plots.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator  # noqa: E402

from .records import run_name  # noqa: E402

LOOPS_LABEL = "core iterations t (loops, log2 scale)"
FILES = {
    "quality": "quality_vs_loops.png",
    "lipschitz": "lipschitz_vs_loops.png",
    "residual": "residual_vs_loops.png",
    "compute": "quality_vs_compute.png",
}
WIDTH_FILE = "quality_vs_width.png"  # only for a sweep over trajectory counts
_DPI = 120


def _finite(values: list) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _column(records: list[dict], key: str) -> list[float]:
    return [math.nan if r.get(key) is None else float(r[key]) for r in records]


def _loops_axis(ax, loops: list[int], extra: list[int] = ()) -> None:
    """log2 x axis with integer tick labels at the powers of two spanning ``loops``."""
    ax.set_xscale("log", base=2)
    values = [*loops, *extra]
    low, high = min(values), max(values)
    ticks = [2**k for k in range(int(math.floor(math.log2(low))), int(math.ceil(math.log2(high))) + 1)]
    if len(loops) <= 8:
        ticks = sorted(set(ticks) | set(loops))
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(low / 2**0.25, high * 2**0.25)
    ax.set_xlabel(LOOPS_LABEL)


def _log_y(ax, values: list[float]) -> bool:
    """Log y axis when there are positive finite values; linear (with a note) otherwise."""
    positive = [v for v in _finite(values) if v > 0]
    if positive:
        ax.set_yscale("log", nonpositive="mask")
        return True
    ax.text(0.5, 0.5, "no positive values: linear scale", transform=ax.transAxes, ha="center", alpha=0.6)
    return False


def _auto_quality_scale(ax, values: list[float]) -> None:
    """Log y for a strictly positive quality spanning more than two decades (e.g. an error going to 0)."""
    finite = _finite(values)
    if finite and min(finite) > 0 and max(finite) / min(finite) > 100:
        ax.set_yscale("log")


def _quality_label(report: dict) -> str:
    task = report["task"]
    direction = "higher" if task["higher_is_better"] else "lower"
    return f"{task['quality_metric']} (task units; {direction} is better)"


def _title(report: dict, what: str) -> str:
    model = run_name(report["model"]["model_dir"])
    solver, n = report["model"].get("solver", "?"), report["run"]["n"]
    return f"{report['task']['name']}: {what}\n{model} ({solver}, {n} held-out samples)"


def _train_line(ax, report: dict) -> None:
    loops = report["model"].get("train_loops")
    if loops:
        ax.axvline(loops, color="0.35", linestyle=":", linewidth=1.5, label=f"training loops ({loops})")


def _baselines(report: dict) -> list[dict]:
    return report.get("baselines") or []


def _baseline_lines(ax, report: dict) -> None:
    for k, baseline in enumerate(_baselines(report)):
        label = f"explicit baseline: {baseline['name']}" if baseline.get("name") else "explicit baseline"
        ax.axhline(baseline["record"]["quality"], color=f"C{3 + k}", linestyle="--", linewidth=1.5, label=label)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def plot_quality_vs_loops(report: dict, path: str | Path) -> Path:
    records = report["records"]
    loops = [r["loops"] for r in records]
    quality = _column(records, "quality")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    stderr = _column(records, "stderr") if any(r.get("stderr") is not None for r in records) else None
    ax.errorbar(loops, quality, yerr=stderr, marker="o", markersize=4, capsize=3, label="implicit model")
    _baseline_lines(ax, report)
    _train_line(ax, report)
    _loops_axis(ax, loops, [report["model"].get("train_loops") or loops[0]])
    _auto_quality_scale(ax, quality + [b["record"]["quality"] for b in _baselines(report)])
    ax.set_ylabel(_quality_label(report))
    ax.set_title(_title(report, f"{report['task']['quality_metric']} vs loop count"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, Path(path))


def plot_tasks_vs_loops(
    loops: list[int],
    series: dict[str, list[float]],
    metric: str,
    higher_is_better: bool,
    model: dict[str, Any],
    path: str | Path,
    stderr: dict[str, list[float | None]] | None = None,
) -> Path:
    """One metric of several tasks against the loop count, a line per task (e.g. accuracy at hops 4, 8, 16);
    ``stderr`` (per task, per count) draws error bars."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, values in series.items():
        errors = (stderr or {}).get(name)
        yerr = None if errors is None else [math.nan if e is None else float(e) for e in errors]
        ax.errorbar(
            loops,
            [math.nan if v is None else float(v) for v in values],
            yerr=yerr,
            marker="o",
            markersize=4,
            capsize=3,
            label=name,
        )
    train = model.get("train_loops")
    if train:
        ax.axvline(train, color="0.35", linestyle=":", linewidth=1.5, label=f"training loops ({train})")
    _loops_axis(ax, loops, [train or loops[0]])
    ax.set_ylabel(f"{metric} ({'higher' if higher_is_better else 'lower'} is better)")
    ax.set_title(
        f"{metric} vs loop count, one line per task\n{run_name(model['model_dir'])} ({model.get('solver', '?')})"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def plot_lipschitz_vs_loops(report: dict, path: str | Path) -> Path:
    records = report["records"]
    loops = [r["loops"] for r in records]
    worst = _column(records, "lipschitz")
    mean = _column(records, "lipschitz_mean")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(loops, worst, marker="o", markersize=4, label="max over samples")
    ax.plot(loops, mean, marker=".", linestyle="--", label="mean over samples")
    _train_line(ax, report)
    _loops_axis(ax, loops, [report["model"].get("train_loops") or loops[0]])
    _log_y(ax, worst + mean)
    run = report["run"]  # a generative task's text probe names its own ratio
    ax.set_ylabel(run.get("lipschitz_label") or "empirical Lipschitz ||Δy|| / ||δ|| (output units per input unit)")
    what = run.get("lipschitz_title") or f"empirical Lipschitz constant vs loop count (||δ|| ≈ {run['perturb_eps']:g})"
    ax.set_title(_title(report, what))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, Path(path))


def plot_residual_vs_loops(report: dict, path: str | Path) -> Path:
    records = report["records"]
    loops = [r["loops"] for r in records]
    mean = _column(records, "rel_residual_mean")
    worst = _column(records, "rel_residual_max")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(loops, mean, marker="o", markersize=4, label="mean over samples")
    ax.plot(loops, worst, marker=".", linestyle="--", label="max over samples")
    tol = report["run"].get("tol")
    if tol:
        ax.axhline(tol, color="C2", linestyle="-.", linewidth=1, label=f"halting tolerance ({tol:g})")
    _train_line(ax, report)
    _loops_axis(ax, loops, [report["model"].get("train_loops") or loops[0]])
    _log_y(ax, mean + worst)
    ax.set_ylabel("relative residual ||f(z) − z|| / ||f(z)|| (dimensionless)")
    ax.set_title(_title(report, "fixed-point residual vs loop count"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, Path(path))


def plot_quality_vs_compute(report: dict, path: str | Path) -> Path:
    """Two panels: quality against wall-clock seconds and against estimated FLOPs per sample."""
    records = report["records"]
    quality = _column(records, "quality")
    baselines = _baselines(report)
    n = report["run"]["n"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    panels = (
        ("seconds", f"wall-clock time for {n} samples (s, log scale; linear in t)"),
        ("flops", "estimated forward FLOPs per sample (FLOP, log scale)"),
    )
    for ax, (key, xlabel) in zip(axes, panels, strict=True):
        cost = _column(records, key)
        ax.plot(cost, quality, marker="o", markersize=4, label="implicit model (one point per loop count)")
        for record, x, y in zip(records, cost, quality, strict=True):
            t = record["loops"]
            if t & (t - 1) == 0 and math.isfinite(x) and math.isfinite(y):  # label the powers of two
                ax.annotate(f"t={t}", (x, y), textcoords="offset points", xytext=(3, 4), fontsize=7)
        _baseline_lines(ax, report)
        for k, baseline in enumerate(baselines):
            ax.plot(
                [baseline["record"][key]],
                [baseline["record"]["quality"]],
                marker="*",
                markersize=12,
                color=f"C{3 + k}",
                linestyle="none",
                label=f"{baseline.get('name') or 'explicit baseline'} cost ({baseline['loops']} loop(s))",
            )
        if any(v > 0 for v in _finite(cost)):
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    _auto_quality_scale(axes[0], quality + [b["record"]["quality"] for b in baselines])
    axes[0].set_ylabel(_quality_label(report))
    axes[0].set_title("quality vs wall-clock time")
    axes[1].set_title("quality vs estimated FLOPs")
    fig.suptitle(_title(report, "quality vs compute").replace("\n", " — "))
    return _save(fig, Path(path))


def plot_quality_vs_width(report: dict, path: str | Path) -> Path:
    """Quality against core evaluations per input (loops x trajectories, log2), one line per trajectory count K:
    whether spending compute in width (more trajectories) beats spending it in depth (more loops)."""
    width = report["width"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    quality, compute = [], []
    for k, count in enumerate(width["trajectories"]):
        records = [r for r in width["records"] if r["trajectories"] == count]
        x, y = _column(records, "compute"), _column(records, "quality")
        ax.plot(x, y, marker="o", markersize=4, color=f"C{k}", label=f"K = {count}")
        quality += y
        compute += [int(v) for v in x]
    _baseline_lines(ax, report)
    _loops_axis(ax, sorted(set(compute)))
    ax.set_xlabel("core evaluations per input: loops x trajectories (log2 scale)")
    _auto_quality_scale(ax, quality)
    ax.set_ylabel(_quality_label(report))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, title=f"select={width['select']}, noise={width['trajectory_noise']:g}")
    ax.set_title(_title(report, "quality vs loops x trajectories"))
    return _save(fig, Path(path))


def plot_all(report: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Every plot into ``out_dir`` (the Lipschitz plot only when the probe ran, the residual plot only when
    residuals were measured); returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [plot_quality_vs_loops(report, out_dir / FILES["quality"])]
    if any(r.get("lipschitz") is not None for r in report["records"]):
        paths.append(plot_lipschitz_vs_loops(report, out_dir / FILES["lipschitz"]))
    if any(r.get("rel_residual_mean") is not None for r in report["records"]):  # generation measures none
        paths.append(plot_residual_vs_loops(report, out_dir / FILES["residual"]))
    paths.append(plot_quality_vs_compute(report, out_dir / FILES["compute"]))
    if report.get("width"):
        paths.append(plot_quality_vs_width(report, out_dir / WIDTH_FILE))
    return paths
