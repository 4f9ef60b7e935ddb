"""Evaluation harness: loop parsing, one-trajectory sweep, Lipschitz probe, FLOPs, run_eval outputs and CLI."""

import csv
import json
import math

import pytest
import torch
from eval_toy_task import EvalToyTask, toy_model
from matplotlib.image import imread

from implicit_hf import ImplicitConfig, ImplicitForCausalLM
from implicit_hf.eval import estimate_flops, lipschitz_ratios, load_model, main, parse_loops, run_eval, sweep
from implicit_hf.eval.plots import FILES

# initializer_range=0.2 makes the untrained core a non-trivial map: quality differs from one loop
# count to the next, so comparing loop counts actually discriminates.
STRONG = dict(initializer_range=0.2)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return EvalToyTask(cache_dir=tmp_path_factory.mktemp("toy-cache"))


@pytest.fixture(scope="module")
def rows(task):
    return task.build_dataset("test", 12, 0).to_list()


def run_separately(model, task, rows, loops, batch_size, **forward):
    """Predictions and metrics of plain forwards at ``num_loops=loops`` (no trajectory)."""
    predictions = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            inputs = task.encode(rows[start : start + batch_size])
            model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            out = model(**model_inputs, num_loops=loops, **forward)
            assert out.trajectory is None
            predictions += task.decode(out.logits, inputs)
    return predictions, task.compute_metrics(predictions, rows)


# ---------------------------------------------------------------------------------------------- parse_loops


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("1,2,4,8", [1, 2, 4, 8]),
        ("1-8", [1, 2, 3, 4, 5, 6, 7, 8]),
        ("1-64:2", list(range(1, 64, 2))),
        ("1,2,4-8", [1, 2, 4, 5, 6, 7, 8]),
        (" 8, 1 ,2,2 ", [1, 2, 8]),
        ("4-4", [4]),
        ("1-8:3", [1, 4, 7]),
        ("2-8:2,3", [2, 3, 4, 6, 8]),
        ("64", [64]),
    ],
)
def test_parse_loops(spec, expected):
    assert parse_loops(spec) == expected


@pytest.mark.parametrize(
    "spec", ["", " ", "0", "0-4", "a", "1,,2", "8-1", "1-8:0", "-1", "1.5", "1-", "2:3", "1-4:2:2"]
)
def test_parse_loops_refuses_bad_input(spec):
    with pytest.raises(ValueError, match="allowed forms") as error:
        parse_loops(spec)
    assert repr(spec) in str(error.value)


# ---------------------------------------------------------------------------------------------- the sweep


@pytest.mark.parametrize("solver", ["picard", "anderson"])
def test_sweep_scores_every_loop_count_like_separate_runs(task, rows, solver):
    model = toy_model(task, num_loops=4, solver=solver, **STRONG)
    loops = [1, 2, 3, 5, 8]
    result = sweep(model, task, rows, loops, batch_size=5, perturb_eps=None, return_predictions=True)
    assert [r["loops"] for r in result["records"]] == loops
    assert result["max_loops"] == 8 and result["num_samples"] == len(rows)
    qualities = [r["quality"] for r in result["records"]]
    assert max(qualities) - min(qualities) > 1e-2  # the loop count matters for this model
    for record in result["records"]:
        if record["loops"] not in (1, 3, 5, 8):
            continue
        predictions, metrics = run_separately(model, task, rows, record["loops"], batch_size=5, tol=0)
        assert record["quality"] == pytest.approx(metrics["mse"], abs=1e-5)
        assert record["metrics"] == pytest.approx(metrics, abs=1e-5)
        for mine, theirs in zip(result["predictions"][record["loops"]], predictions, strict=True):
            torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
        assert record["steps_mean"] == record["loops"]
        assert record["lipschitz"] is None


def test_sweep_record_fields_and_residuals(task, rows):
    model = toy_model(task, num_loops=4, **STRONG)
    result = sweep(model, task, rows, "1,2,4", batch_size=8)
    traces = []
    with torch.no_grad():
        for start in (0, 8):  # same batches as the sweep: padded positions enter the solver's residual
            inputs = task.encode(rows[start : start + 8])
            inputs.pop("labels")
            traces.append(model(**inputs, num_loops=4, tol=0).loop_stats.rel_residual)
    trace = torch.cat(traces, dim=1)
    for record in result["records"]:
        assert set(record) >= {"loops", "metrics", "quality", "lipschitz", "rel_residual_mean", "rel_residual_max"}
        assert set(record) >= {"seconds", "flops", "steps_mean", "lipschitz_mean"}
        residual = trace[record["loops"] - 1]
        assert record["rel_residual_mean"] == pytest.approx(float(residual.mean()), rel=1e-4)
        assert record["rel_residual_max"] == pytest.approx(float(residual.max()), rel=1e-4)
        assert record["seconds"] == pytest.approx(result["seconds_total"] * record["loops"] / 4)
        assert record["lipschitz"] >= record["lipschitz_mean"] > 0
    flops = [r["flops"] for r in result["records"]]
    assert flops[0] < flops[1] < flops[2]


def test_sweep_keep_tol_matches_runs_with_the_model_tolerance(task, rows):
    model = toy_model(task, num_loops=4, tol=5e-2, **STRONG)
    result = sweep(model, task, rows, [2, 6, 12], batch_size=6, perturb_eps=None, keep_tol=True)
    assert result["tol"] == 5e-2
    for record in result["records"]:
        _, metrics = run_separately(model, task, rows, record["loops"], batch_size=6)  # config.tol applies
        assert record["quality"] == pytest.approx(metrics["mse"], abs=1e-5)
        assert record["steps_mean"] <= record["loops"]
    assert result["records"][-1]["steps_mean"] < 12  # samples halted early
    assert result["records"][-1]["rel_residual_max"] < 5e-2


def test_lipschitz_ratio_by_hand(task, rows):
    # the formula itself on a case small enough to do in one's head: ||(3, 4) - 0|| / 2 = 2.5
    ratios = lipschitz_ratios([torch.zeros(2), torch.ones(1)], [torch.tensor([3.0, 4.0]), torch.ones(1)], [2.0, 1.0])
    assert ratios.tolist() == [2.5, 0.0]
    with pytest.raises(ValueError, match="keep the problem's shape"):
        lipschitz_ratios([torch.zeros(2)], [torch.zeros(3)], [1.0])

    model = toy_model(task, num_loops=4, **STRONG)
    few = rows[:3]
    eps, seed = 1e-2, 7
    result = sweep(model, task, few, [1, 4], batch_size=8, perturb_eps=eps, seed=seed)
    perturbed, norms = task.perturb(few, eps, seed)
    assert norms.shape == (3,) and torch.allclose(norms.double(), torch.full((3,), eps, dtype=torch.float64), rtol=1e-3)
    for record in result["records"]:
        clean, _ = run_separately(model, task, few, record["loops"], batch_size=8, tol=0)
        moved, _ = run_separately(model, task, perturbed, record["loops"], batch_size=8, tol=0)
        by_hand = [float((b - a).double().norm()) / float(n) for a, b, n in zip(clean, moved, norms, strict=True)]
        assert record["lipschitz"] == pytest.approx(max(by_hand), rel=1e-4)
        assert record["lipschitz_mean"] == pytest.approx(sum(by_hand) / 3, rel=1e-4)


def test_estimate_flops_by_hand():
    config = ImplicitConfig(
        vocab_size=4,
        hidden_size=32,
        num_attention_heads=4,
        num_prelude_layers=1,
        num_core_layers=1,
        num_coda_layers=1,
        input_features=2,
        num_labels=1,
    )
    assert config.intermediate_size == 96
    layer = 2 * (32 * 32 * 4 + 3 * 32 * 96) + 4 * 8 * 32  # q,k,v,o + SwiGLU matmuls, QK^T and AV
    per_token = 2 * 2 * 32 + (1 + 1) * layer + 3 * layer + 2 * 32 * 1  # input, prelude+coda, 3 loops, head
    assert estimate_flops(config, seq_len=8, loops=3) == 8 * per_token
    assert estimate_flops(config, 8, 4) - estimate_flops(config, 8, 3) == 8 * layer
    assert estimate_flops(config, 8, 3, head_outputs=4) - estimate_flops(config, 8, 3) == 8 * 2 * 32 * 3


def test_sweep_refuses_bad_arguments(task, rows):
    model = toy_model(task)
    with pytest.raises(ValueError, match="allowed forms"):
        sweep(model, task, rows, "0-3")
    with pytest.raises(ValueError, match="batch_size"):
        sweep(model, task, rows, [1], batch_size=0)
    with pytest.raises(ValueError, match="perturb_eps"):
        sweep(model, task, rows, [1], perturb_eps=-1.0)


def test_load_model_uses_the_task_head_auto_class(tmp_path, tiny_checkpoint):
    tiny_checkpoint(tmp_path / "lm")
    assert isinstance(load_model(tmp_path / "lm", "causal_lm"), ImplicitForCausalLM)
    with pytest.raises(ValueError, match="unknown task head"):
        load_model(tmp_path / "lm", "image")


# ---------------------------------------------------------------------------------------------- run_eval / CLI


@pytest.fixture(scope="module")
def checkpoints(task, tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    toy_model(task, num_loops=4, num_loops_train=4, **STRONG).save_pretrained(root / "implicit")
    toy_model(task, seed=1, num_loops=1).save_pretrained(root / "explicit")
    return root


@pytest.fixture(scope="module")
def evaluated(task, checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    result = run_eval(
        checkpoints / "implicit",
        "eval_toy",
        "1,2,4,8",
        out,
        n=10,
        seed=0,
        batch_size=4,
        perturb_eps=1e-3,
        baseline_dirs=[checkpoints / "explicit"],
        task_kwargs={"cache_dir": str(task.cache_dir)},
        device="cpu",
    )
    return out, result


def test_run_eval_writes_results_json_and_csv(evaluated, checkpoints):
    out, result = evaluated
    report = json.loads((out / "results.json").read_text())
    assert report["loops"] == [1, 2, 4, 8]
    assert [r["loops"] for r in report["records"]] == [1, 2, 4, 8]
    assert report["task"]["name"] == "eval_toy" and report["task"]["quality_metric"] == "mse"
    assert report["run"]["n"] == 10 and report["run"]["num_samples"] == 10 and report["run"]["perturb_eps"] == 1e-3
    assert report["model"]["train_loops"] == 4 and report["model"]["model_dir"] == str(checkpoints / "implicit")
    assert report["environment"]["torch"] and report["environment"]["transformers"]
    for record in report["records"]:
        assert math.isfinite(record["quality"]) and math.isfinite(record["lipschitz"])
        assert record["quality"] == record["metrics"]["mse"]
    (baseline,) = report["baselines"]
    assert baseline["model_dir"] == str(checkpoints / "explicit") and baseline["loops"] == 1
    assert baseline["name"] == "explicit"
    assert math.isfinite(baseline["record"]["quality"]) and baseline["record"]["loops"] == 1

    with (out / "results.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 4
    assert [int(row["loops"]) for row in table] == [1, 2, 4, 8]
    assert {"quality", "lipschitz", "rel_residual_mean", "rel_residual_max", "seconds", "flops", "metric_mse"} <= set(
        table[0]
    )
    assert float(table[2]["quality"]) == pytest.approx(report["records"][2]["quality"])


def test_run_eval_plots_are_real_pngs(evaluated):
    out, result = evaluated
    for name in FILES.values():
        path = out / name
        assert path.exists() and str(path) in result["files"]
        assert path.stat().st_size > 15_000, f"{name} is suspiciously small"
        image = imread(path)
        assert image.ndim == 3 and image.shape[0] >= 400 and image.shape[1] >= 600 and image.shape[2] in (3, 4)
        assert image[..., :3].std() > 0.02  # not a blank canvas


def test_cli_main_end_to_end(task, checkpoints, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = [
        "--model",
        str(checkpoints / "implicit"),
        "--task",
        "eval_toy",
        "--loops",
        "1-3,6",
        "--out",
        str(out),
        "--n",
        "6",
        "--batch-size",
        "4",
        "--perturb-eps",
        "1e-3",
        "--task-kwargs",
        json.dumps({"cache_dir": str(task.cache_dir), "seq_len": 6}),
        "--baseline",
        str(checkpoints / "explicit"),
        "--baseline",
        str(checkpoints / "implicit"),
        "--device",
        "cpu",
    ]
    result = main(argv)
    printed = capsys.readouterr().out
    assert "loops" in printed and "explicit baseline" in printed and "results.json" in printed
    report = json.loads((out / "results.json").read_text())
    assert report["loops"] == [1, 2, 3, 6] and len(report["records"]) == 4
    assert report["task"]["task_kwargs"]["seq_len"] == 6
    assert [(b["name"], b["loops"]) for b in report["baselines"]] == [("explicit", 1), ("implicit", 4)]
    assert "explicit baseline implicit (4 loops)" in printed
    assert all((out / name).exists() for name in FILES.values())
    assert result["records"] == report["records"]


def test_cli_refuses_bad_loops_and_task_kwargs(checkpoints, tmp_path, capsys):
    base = ["--model", str(checkpoints / "implicit"), "--task", "eval_toy", "--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        main([*base, "--loops", "8-1"])
    assert "allowed forms" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--task-kwargs", "[1, 2]"])
    assert "JSON object" in capsys.readouterr().err


def test_run_eval_without_probe_or_baseline(task, checkpoints, tmp_path):
    result = run_eval(
        checkpoints / "implicit",
        task,
        [1, 2],
        tmp_path,
        n=4,
        batch_size=4,
        perturb_eps=0,
        device="cpu",
    )
    assert result["baselines"] == [] and all(r["lipschitz"] is None for r in result["records"])
    assert not (tmp_path / FILES["lipschitz"]).exists()
    assert (tmp_path / FILES["quality"]).exists() and (tmp_path / FILES["compute"]).exists()
