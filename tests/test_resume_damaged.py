"""`--resume` after a killed save and over damaged checkpoints (issue 26).

A tiny run saves ``checkpoints/step_2``, ``step_4`` and ``step_6``. The save of ``step_4`` is killed at every
point of its writing (an exception standing for SIGKILL, raised in the run's own process: nothing after it
runs), and each file of the newest checkpoint is damaged under its marker. Every case resumes from a good
checkpoint and ends bit-identical (weights and log) to the uninterrupted run. The refusals (no good checkpoint,
nothing to resume, a recipe whose model no longer fits the checkpoint: one line naming the file, the key and the
shape) are in test_bad_inputs.py, which builds them from this module's run, recipe and damage.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from test_train import log_records, run_in_process, weights

from implicit_hf.training import checkpoints
from implicit_hf.training import loop as train_mod
from implicit_hf.training.checkpoints import CHECKPOINT_MARKER

RECIPE = {
    "task": "train_toy",
    "task_module": "tests.toy_task",
    "model": {
        "hidden_size": 16,
        "num_attention_heads": 2,
        "num_prelude_layers": 1,
        "num_core_layers": 1,
        "num_coda_layers": 1,
        "num_loops": 2,
        "attention_dropout": 0.0,
    },
    "seed": 3,
    "train_size": 20,  # 5 batches an epoch: the run crosses an epoch, resumes land mid-epoch
    "eval_size": 8,
    "per_device_batch_size": 4,
    "learning_rate": 3e-3,
    "lr_scheduler": "cosine",
    "warmup_steps": 1,
    "loop_schedule": {"distribution": "uniform", "min": 1, "max": 3},
    "max_steps": 6,
    "checkpoint_every": 2,
    "keep_checkpoints": 0,  # all of step_2, step_4, step_6: the damaged newest has older ones behind it
    "log_every": 1,
    "eval_every": 2,
    "tracker": "none",
}
WRITTEN = ("model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl")  # accelerate's order
STATE_FILES = (*WRITTEN, CHECKPOINT_MARKER)


class Killed(BaseException):
    """The process dies here: nothing after it runs (not an Exception, so no handler in the run catches it)."""


def write_recipe(folder: Path, **overrides) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({**RECIPE, "output_dir": str(folder / "out"), **overrides}))
    return path


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """The data cache every run of this module shares."""
    return tmp_path_factory.mktemp("resume_damaged")


@pytest.fixture(scope="module")
def reference(shared) -> Path:
    """The uninterrupted run: its output folder (weights, log and the checkpoints of steps 2, 4 and 6)."""
    run = shared / "reference"
    run.mkdir()
    run_in_process(shared, write_recipe(run))
    assert [step for step, _ in checkpoints.find_checkpoints(run / "out")] == [2, 4, 6]
    return run / "out"


def assert_as_uninterrupted(out: Path, reference: Path, resumed_from: int) -> None:
    """The resumed run started at ``resumed_from`` and ended with the uninterrupted run's weights and log."""
    assert json.loads((out / "metrics.json").read_text())["resumed_from"] == resumed_from
    expected, resumed = weights(reference), weights(out)
    assert expected.keys() == resumed.keys()
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name
    assert log_records(out) == log_records(reference)
    # the checkpoint of the last step is written afresh and complete
    assert checkpoints.read_checkpoint(out / "checkpoints" / "step_6", 6)["files"].keys() == set(WRITTEN)


def copy_of(reference: Path, tmp_path: Path) -> Path:
    shutil.copytree(reference, tmp_path / "out")
    return tmp_path / "out"


# ----------------------------------------------------------------------------------------------------
# A save killed at every point
# ----------------------------------------------------------------------------------------------------

# name: (where the save of step_4 dies, the steps with a marker it leaves, the step resumed from)
KILL_POINTS = {
    "before any file": (("before", "model.safetensors"), [2], 2),
    **{f"during {name}": (("during", name), [2], 2) for name in WRITTEN},
    **{f"after {name}": (("after", name), [2], 2) for name in WRITTEN},
    "marker written to its temporary name, not renamed": (("before", CHECKPOINT_MARKER), [2], 2),
    "marker renamed into place, step_2 not yet pruned": (("after", CHECKPOINT_MARKER), [2, 4], 4),
    "pruning step_2: its marker removed, its files not": (("pruning", "step_2"), [4], 4),
    "after the save": (("returned", ""), [4], 4),
}


def arm(monkeypatch, point: tuple[str, str], checkpoint_dir: Path) -> None:
    """Make the save of ``checkpoint_dir`` (``checkpoints/step_4``) die at ``point``: before, during (half
    written) or after one of accelerate's files, before or after the marker's rename, while pruning, or
    once the save has returned."""
    import accelerate.utils.other

    kind, name = point
    target = checkpoint_dir / name

    def killing(write):
        def wrapper(obj, file, *args, **kwargs):
            hit = Path(file) == target
            if hit and kind == "before":
                raise Killed
            write(obj, file, *args, **kwargs)
            if hit and kind == "during":
                os.truncate(file, os.path.getsize(file) // 2)
            if hit:
                raise Killed

        return wrapper

    def replace(source, destination, real=os.replace):
        if Path(destination) == target and kind == "before":
            raise Killed
        real(source, destination)
        if Path(destination) == target:
            raise Killed

    def rmtree(path, *args, real=shutil.rmtree, **kwargs):
        if kind == "pruning" and Path(path) == checkpoint_dir.parent / name:
            raise Killed
        real(path, *args, **kwargs)

    def save_checkpoint(*args, real=train_mod.save_checkpoint, **kwargs):
        path = real(*args, **kwargs)
        if kind == "returned" and path == checkpoint_dir:
            raise Killed
        return path

    monkeypatch.setattr(torch, "save", killing(torch.save))
    monkeypatch.setattr(accelerate.utils.other, "safe_save_file", killing(accelerate.utils.other.safe_save_file))
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    monkeypatch.setattr(train_mod, "save_checkpoint", save_checkpoint)


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_save_killed_at_any_point_resumes_bit_identical(point, reference, shared, tmp_path):
    where, marked, resumed_from = KILL_POINTS[point]
    recipe = write_recipe(tmp_path, keep_checkpoints=1)  # step_4's save prunes step_2 after its marker
    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as patch:
        arm(patch, where, out / "checkpoints" / "step_4")
        with pytest.raises(Killed):
            run_in_process(shared, recipe)
    assert [step for step, _ in checkpoints.find_checkpoints(out)] == marked
    assert not (out / "model").exists()

    run_in_process(shared, recipe, "--resume")
    assert_as_uninterrupted(out, reference, resumed_from)
    assert sorted(path.name for path in (out / "checkpoints").iterdir()) == ["step_6"]  # no leftovers


def test_every_file_is_flushed_before_the_marker_is_renamed_into_place(shared, tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b)))
    run_in_process(shared, write_recipe(tmp_path, max_steps=2, eval_size=0))
    folder = tmp_path / "out" / "checkpoints" / "step_2"
    rename = events.index(("replace", str(folder / CHECKPOINT_MARKER)))
    flushed = set(events[:rename])
    assert {str(folder / name) for name in WRITTEN} | {str(folder), str(folder.parent)} <= flushed
    assert str(folder / f"{CHECKPOINT_MARKER}.tmp") in flushed  # the marker's contents before its rename
    assert str(folder) in events[rename + 1 :]  # and the rename itself


# ----------------------------------------------------------------------------------------------------
# A damaged file under a present marker
# ----------------------------------------------------------------------------------------------------


def damage(file: Path, how: str) -> None:
    data = file.read_bytes()
    if how == "missing":
        file.unlink()
    else:
        cut = {"empty": b"", "half": data[: len(data) // 2], "one byte short": data[:-1]}
        file.write_bytes(cut.get(how, bytes(len(data))))  # "zeroed": the right size, no content


# (file, damage, what the warning says about it)
DAMAGES = [
    *((name, "missing", f"{name}: missing") for name in WRITTEN),
    *((name, how, f"{name}: ") for name in STATE_FILES for how in ("empty", "half", "one byte short", "zeroed")),
]


@pytest.mark.parametrize(("name", "how", "problem"), DAMAGES, ids=[f"{n} {h}" for n, h, _ in DAMAGES])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(
    name, how, problem, reference, shared, tmp_path, caplog
):
    out = copy_of(reference, tmp_path)
    newest = out / "checkpoints" / "step_6"
    damage(newest / name, how)
    with caplog.at_level(logging.WARNING, logger=checkpoints.__name__):
        run_in_process(shared, write_recipe(tmp_path), "--resume")
    [warning] = [record.getMessage() for record in caplog.records if record.name == checkpoints.__name__]
    assert f"skipping the damaged checkpoint {str(newest)!r}: {problem}" in warning
    assert_as_uninterrupted(out, reference, resumed_from=4)


MARKERS = [
    ("[]", "trainer_state.json: not a mapping with integer 'step' and 'global_batch'"),
    ('{"step": 6}', "trainer_state.json: not a mapping with integer 'step' and 'global_batch'"),
    ('{"step": 5, "global_batch": 4}', "trainer_state.json: written for step 5, in the folder of 6"),
    ('{"step": 6, "global_batch": 4, "files": [1]}', "'files' is not a mapping of file names to sizes"),
    ('{"step": 6, "global_batch": 4, "files": {"optimizer.bin": 7}}', "bytes, 7 were written"),
    ("\udcff", "trainer_state.json: not readable JSON (UnicodeDecodeError"),
]


@pytest.mark.parametrize(("marker", "problem"), MARKERS)
def test_a_marker_that_does_not_describe_its_checkpoint_falls_back(
    marker, problem, reference, shared, tmp_path, caplog
):
    out = copy_of(reference, tmp_path)
    (out / "checkpoints" / "step_6" / CHECKPOINT_MARKER).write_bytes(marker.encode(errors="surrogateescape"))
    with caplog.at_level(logging.WARNING, logger=checkpoints.__name__):
        run_in_process(shared, write_recipe(tmp_path), "--resume")
    assert problem in caplog.text
    assert_as_uninterrupted(out, reference, resumed_from=4)


# (the file removed from the newest checkpoint, what its marker lists: None for a marker without 'files')
UNLISTED = [
    *((name, []) for name in WRITTEN),  # "files": {}
    ("optimizer.bin", ["model.safetensors"]),  # the weights only
    ("random_states_0.pkl", None),  # accelerate would resume without the RNG states, silently
]


@pytest.mark.parametrize(("name", "listed"), UNLISTED, ids=[f"{n} {listed}" for n, listed in UNLISTED])
def test_a_file_the_save_always_writes_is_required_even_when_the_marker_omits_it(
    name, listed, reference, shared, tmp_path, caplog
):
    """A marker vouches for what it lists, and for what accelerate's save_state always writes for this run's
    layout (weights, optimizer, schedule, every process's RNG states) whether it lists them or not."""
    out = copy_of(reference, tmp_path)
    newest = out / "checkpoints" / "step_6"
    marker = json.loads((newest / CHECKPOINT_MARKER).read_text())
    if listed is None:
        del marker["files"]
    else:
        marker["files"] = {key: marker["files"][key] for key in listed}
    (newest / CHECKPOINT_MARKER).write_text(json.dumps(marker))
    (newest / name).unlink()
    with caplog.at_level(logging.WARNING, logger=checkpoints.__name__):
        run_in_process(shared, write_recipe(tmp_path), "--resume")
    [warning] = [record.getMessage() for record in caplog.records if record.name == checkpoints.__name__]
    assert f"skipping the damaged checkpoint {str(newest)!r}: {name}: missing" in warning
    assert_as_uninterrupted(out, reference, resumed_from=4)


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        (None, None),
        ("model.safetensors", "model.safetensors: not loadable (SafetensorError"),
        ("optimizer.bin", "optimizer.bin: not loadable (BadZipFile: File is not a zip file)"),
    ],
)
def test_markers_without_the_file_list_are_checked_by_content(name, problem, reference, shared, tmp_path, caplog):
    """Markers written before the list of files was recorded vouch for the files present, checked by content."""
    out = copy_of(reference, tmp_path)
    for step in (4, 6):
        marker = out / "checkpoints" / f"step_{step}" / CHECKPOINT_MARKER
        saved = json.loads(marker.read_text())
        marker.write_text(json.dumps({key: saved[key] for key in ("step", "global_batch", "num_processes")}))
    if name is None:
        shutil.rmtree(out / "checkpoints" / "step_6")  # an intact one of those is resumed
    else:
        damage(out / "checkpoints" / "step_6" / name, "half")
    with caplog.at_level(logging.WARNING, logger=checkpoints.__name__):
        run_in_process(shared, write_recipe(tmp_path), "--resume")
    if problem:
        assert problem in caplog.text
    else:
        assert "skipping" not in caplog.text
    assert_as_uninterrupted(out, reference, resumed_from=4)


# ----------------------------------------------------------------------------------------------------
# The shapes a checkpoint holds, read to refuse a resume whose model no longer fits (the refusals themselves,
# one line through ``implicit-hf train``, are in test_bad_inputs.py)
# ----------------------------------------------------------------------------------------------------


def test_the_shapes_of_sharded_states_are_read_from_their_index(tmp_path):
    """FSDP on CPU processes checkpoints torch.distributed.checkpoint states: their model entries are checked."""
    import torch.distributed.checkpoint as dcp

    saved = torch.nn.Linear(3, 2)
    with pytest.warns(UserWarning, match="single process"):
        dcp.save({"model": saved.state_dict(), "optimizer": {"lr": 0.1}}, checkpoint_id=tmp_path / "sharded")
    assert checkpoints.saved_shapes(tmp_path) == {"weight": (2, 3), "bias": (2,)}
    checkpoints.check_file(tmp_path / "sharded" / ".metadata", ".metadata", None)
    wider = torch.nn.Linear(4, 2).state_dict()
    assert checkpoints.shape_differences(checkpoints.saved_shapes(tmp_path), wider) == [
        "'weight' is [2, 3] saved, [2, 4] in the model"
    ]
