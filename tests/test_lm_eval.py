"""lm-evaluation-harness runs an implicit LM at a chosen loop count, on a local task (no downloads)."""

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm_eval (lm-evaluation-harness) is not installed")

from test_convert import character_tokenizer  # noqa: E402

from implicit_hf import ImplicitForCausalLM  # noqa: E402
from implicit_hf.eval.lm_eval_bridge import lm_eval_sweep  # noqa: E402

TASK_YAML = """\
task: toy_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def checkpoint_and_task(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("lm_eval")
    tiny_checkpoint(root / "ckpt", character_tokenizer(), initializer_range=0.2)
    tasks = root / "tasks"
    tasks.mkdir()
    with (tasks / "toy_sums.jsonl").open("w") as handle:
        for a in range(4):
            for b in range(3):
                choices = [str(a + b), str(a + b + 1), str(a + b + 3)]
                handle.write(json.dumps({"question": f"{a}+{b}=", "choices": choices, "label": 0}) + "\n")
    (tasks / "toy_sums.yaml").write_text(TASK_YAML.format(data=tasks / "toy_sums.jsonl"))
    return root / "ckpt", tasks


def direct_loglikelihoods(model_dir, question: str, choices: list[str], num_loops: int, **settings) -> list[float]:
    """log p(" " + choice | question) from the model itself (lm_eval's default target delimiter is a space), on what
    lm-eval feeds it: the question and the choice without its last token (the trajectories' noise, ``settings``, is
    drawn per input shape)."""
    model = ImplicitForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = character_tokenizer()
    values = []
    for choice in choices:
        context = tokenizer(question).input_ids
        continuation = tokenizer(" " + choice).input_ids
        ids = torch.tensor([context + continuation[:-1]])
        with torch.no_grad():
            logprobs = model(ids, num_loops=num_loops, **settings).logits.log_softmax(-1)[0]
        values.append(sum(float(logprobs[len(context) + i - 1, token]) for i, token in enumerate(continuation)))
    return values


def test_model_args_set_the_loop_count(checkpoint_and_task):
    from lm_eval.tasks import TaskManager

    model_dir, tasks = checkpoint_and_task
    manager = TaskManager(include_path=str(tasks))
    per_loops = {}
    for loops in (1, 3):
        output = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={model_dir},num_loops={loops}",
            tasks=["toy_sums"],
            task_manager=manager,
            batch_size=4,
            device="cpu",
            log_samples=True,
        )
        sample = output["samples"]["toy_sums"][0]
        per_loops[loops] = [float(response[0][0]) for response in sample["resps"]]
        expected = direct_loglikelihoods(model_dir, sample["doc"]["question"], sample["doc"]["choices"], loops)
        assert per_loops[loops] == pytest.approx(expected, abs=1e-4)
    assert per_loops[1] != pytest.approx(per_loops[3], abs=1e-3)  # the loop count took effect


def test_sweep_writes_results_and_plots(checkpoint_and_task, tmp_path):
    model_dir, tasks = checkpoint_and_task
    report = lm_eval_sweep(
        model_dir, ["toy_sums"], "1,2,4", tmp_path, include_path=tasks, batch_size=4, log_samples=True
    )
    assert [run["loops"] for run in report["runs"]] == [1, 2, 4]
    assert all(set(run["tasks"]["toy_sums"]) == {"acc"} for run in report["runs"])
    assert all(0.0 <= run["tasks"]["toy_sums"]["acc"] <= 1.0 for run in report["runs"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["loops"] == [1, 2, 4] and "acc" in saved["runs"][0]["tasks"]["toy_sums"]
    header, first, *_ = (tmp_path / "results.csv").read_text().splitlines()
    assert header == "loops,task,metric,value,stderr"
    acc, stderr = report["runs"][0]["tasks"]["toy_sums"]["acc"], report["runs"][0]["stderr"]["toy_sums"]["acc"]
    n = len(json.loads((tmp_path / "samples_loops1.json").read_text())["toy_sums"])  # lm-eval's per-document records
    assert stderr == pytest.approx((acc * (1 - acc) / (n - 1)) ** 0.5)  # the standard error of a mean of 0/1
    assert first == f"1,toy_sums,acc,{acc},{stderr}"
    assert (tmp_path / "lm_eval_toy_sums_acc_vs_loops.png").stat().st_size > 1000


@pytest.mark.parametrize("share_trajectory", [True, False], ids=["shared", "per-count"])
def test_a_sweep_with_trajectories_scores_every_count_as_a_direct_forward_with_them(
    checkpoint_and_task, tmp_path, share_trajectory
):
    model_dir, tasks = checkpoint_and_task
    width = {"num_trajectories": 4, "trajectory_noise": 0.3, "select": "residual"}
    report = lm_eval_sweep(
        model_dir,
        ["toy_sums"],
        "1,3",
        tmp_path,
        include_path=tasks,
        batch_size=4,  # the starts follow each request's positions: its batch does not change its score
        limit=3,
        log_samples=True,
        share_trajectory=share_trajectory,
        trajectories=width,
    )
    assert report["run"]["trajectories"] == {**width, "trajectory_seed": 0, "trajectory_batch_size": None}
    assert report["run"]["share_trajectory"] is share_trajectory  # each count chooses by its own residual
    for run in report["runs"]:
        for sample in run["samples"]["toy_sums"]:
            doc, scored = sample["doc"], [float(response[0][0]) for response in sample["resps"]]
            expected = direct_loglikelihoods(model_dir, doc["question"], doc["choices"], run["loops"], **width)
            assert scored == pytest.approx(expected, abs=1e-4)
            assert scored != pytest.approx(
                direct_loglikelihoods(model_dir, doc["question"], doc["choices"], run["loops"]), abs=1e-3
            )


def test_the_lm_eval_command_takes_the_trajectory_settings(checkpoint_and_task, tmp_path):
    from implicit_hf.cli import main

    model_dir, tasks = checkpoint_and_task
    options = ["--num-trajectories", "3", "--trajectory-noise", "0.2", "--select", "vote", "--trajectory-seed", "5"]
    argv = ["lm-eval", "--model", str(model_dir), "--tasks", "toy_sums", "--include-path", str(tasks), *options]
    main([*argv, "--loops", "2", "--limit", "2", "--batch-size", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())["run"]["trajectories"]
    expected = {"num_trajectories": 3, "trajectory_noise": 0.2, "select": "vote", "trajectory_seed": 5}
    assert saved == {**expected, "trajectory_batch_size": None}
