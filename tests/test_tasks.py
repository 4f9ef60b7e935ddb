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


def test_the_package_integer_check_and_the_model_files_copy_agree():
    """`implicit_hf.checks` (pure Python, for tasks and eval) and the copy the self-contained model files keep."""
    import numpy as np

    from implicit_hf.checks import check_integer
    from implicit_hf.modeling.configuration_implicit import check_integer as model_check_integer

    for value, minimum in ((3, 1), (np.int64(4), 1), (0, 0)):
        assert check_integer("x", value, minimum) == model_check_integer("x", value, minimum) == int(value)
    for value, minimum in ((0, 1), (True, 1), (2.0, 1), ("3", 1), (-1, 0)):
        messages = []
        for check in (check_integer, model_check_integer):
            with pytest.raises(ValueError) as error:
                check("x", value, minimum)
            messages.append(str(error.value))
        assert messages[0] == messages[1] == f"x must be an integer >= {minimum}; got {value!r}"
