"""Summary of the addition sweeps: exact match vs loops at every test length, implicit vs explicit.

Reads results/addition/implicit_d*/results.json (written by `implicit-hf eval ... --baseline ...`) and writes
summary.csv and summary_exact_match.png next to this file:

    .venv/bin/python results/addition/summarize.py
"""

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent


def main() -> None:
    reports = sorted(
        (json.loads(path.read_text()) for path in HERE.glob("implicit_d*/results.json")),
        key=lambda report: report["task"]["task_kwargs"]["digits"],
    )
    rows = []
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for k, report in enumerate(reports):
        digits = report["task"]["task_kwargs"]["digits"]
        loops = [r["loops"] for r in report["records"]]
        exact = [r["metrics"]["exact_match"] for r in report["records"]]
        ax.plot(loops, exact, marker="o", markersize=4, color=f"C{k}", label=f"implicit, {digits} digits")
        base = report.get("baseline")
        if base:
            ax.axhline(base["record"]["metrics"]["exact_match"], color=f"C{k}", linestyle="--", linewidth=1)
        for record in report["records"]:
            rows.append(
                {
                    "digits": digits,
                    "model": "implicit",
                    "loops": record["loops"],
                    "exact_match": record["metrics"]["exact_match"],
                    "digit_accuracy": record["metrics"]["digit_accuracy"],
                    "lipschitz_max": record["lipschitz"],
                    "rel_residual_mean": record["rel_residual_mean"],
                }
            )
        if base:
            rows.append(
                {
                    "digits": digits,
                    "model": "explicit_stack8",
                    "loops": base["loops"],
                    "exact_match": base["record"]["metrics"]["exact_match"],
                    "digit_accuracy": base["record"]["metrics"]["digit_accuracy"],
                    "lipschitz_max": base["record"]["lipschitz"],
                    "rel_residual_mean": base["record"]["rel_residual_mean"],
                }
            )
    train_loops = reports[0]["model"]["train_loops"]
    ax.axvline(train_loops, color="0.35", linestyle=":", label=f"training loops ({train_loops}; random 8..16)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["loops"] for report in reports for r in report["records"]}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("core iterations t (loops, log2 scale)")
    ax.set_ylabel("exact match (whole sum right)")
    ax.set_title("addition, trained on 1..8 digits: implicit (solid) vs 8-layer explicit stack (dashed)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "summary_exact_match.png", dpi=120)
    with (HERE / "summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
