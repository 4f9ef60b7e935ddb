"""Every built-in task: registered by name, and an empty data set is an empty data set (not a cache error)."""

import pytest

from implicit_hf.tasks.base import BUILTIN_TASK_MODULES, TaskAdapter, get_task


@pytest.mark.parametrize("name", sorted(BUILTIN_TASK_MODULES))
def test_builtin_task_builds_an_empty_dataset(name, tmp_path):
    task = get_task(name, cache_dir=tmp_path)
    assert isinstance(task, TaskAdapter) and task.name == name
    assert len(task.build_dataset("train", 0, 0)) == 0
    assert not any(tmp_path.iterdir())  # nothing cached for nothing


def test_unknown_task_names_the_known_ones():
    with pytest.raises(ValueError, match="maze"):
        get_task("mazes")
