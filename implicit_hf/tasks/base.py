"""The task-adapter contract: a domain problem (an LP, an image, a PDE, a puzzle) as a sequence problem.

A task adapter owns everything domain-specific, so the training loop and the evaluation harness
stay generic:

* ``build_dataset(split, n, seed)`` generates the data locally (deterministic by seed) and caches it
  with ``datasets`` (``save_to_disk``) under ``cache_dir``; nothing is downloaded. It is written once,
  here: a task gives ``dataset_path(split, n, seed)`` (where the set is cached), ``features()`` (its
  ``datasets.Features``) and ``generate(rng, n, split)`` (its ``n`` rows, drawn from ``rng``).
* ``encode(examples)`` turns a list of dataset rows (at least one: `given_rows` refuses an empty list for every
  task) into model inputs (``input_ids`` or ``input_features``, ``attention_mask``, optional ``edge_features`` /
  ``position_ids``) plus ``labels``; it is the ``collate_fn`` of the training data loader.
* ``decode(logits, inputs)`` turns head outputs back into one prediction per sample in the
  domain's own form (an LP solution vector, an image, a field, a grid).
* ``compute_metrics(predictions, examples)`` scores predictions with the task's local ``evaluate``
  module (``metric_name``, offline, loaded by path with `load_metric`); ``quality_metric`` names the
  headline number.
* ``perturb(examples, eps, seed)`` returns perturbed rows and the size of each perturbation
  ``||δ||`` for the empirical Lipschitz probe ``||y_t(x+δ) - y_t(x)|| / ||δ||``; it checks ``eps``, returns
  the rows unchanged for ``eps = 0`` and otherwise calls the task's ``perturb_rows(examples, eps, seed)``.
* ``model_config()`` gives the `ImplicitConfig` fields the task needs (head type, input sizes,
  attention causality); ``head`` names the model class.
* ``loop_feedback(inputs)`` (optional) gives a domain prior applied inside the loop, e.g. the
  data-consistency gradient ``Aᵀ(Ax̂ - y)`` of the current estimate for deblurring; the training
  loop and the evaluation harness pass it to the model (``feedback_kwargs``).
* ``difficulty(example)`` (optional) rates a row by an integer (e.g. its number of steps), for loop
  schedules tied to the batch's difficulty and batches grouped by it.
* ``save_artifacts(model_dir)`` (optional) writes what a trained model needs besides its weights,
  e.g. a tokenizer; the training loop calls it after saving the final model.
* The constructor's arguments are the task's *settings* (``task_kwargs`` of a recipe, ``--task-kwargs``), each
  checked against its annotation when the task is built (`implicit_hf.checks.check_arguments`: a ``bool`` is a
  bool, a ``float`` a finite number, ``Annotated[int, at_least(1)]`` an integer >= 1, ...); a refused one is a
  `TaskSettingError` naming the task and the setting, as is any ``ValueError`` or ``OSError`` the constructor
  raises (a setting that does not fit another, a corpus or tokenizer that cannot be read).
* A *generative* task (a `implicit_hf.tasks.generation.GenerativeTask`, a causal LM answering in text) is
  scored by generation rather than from one trajectory; that class declares what it provides.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import shutil
import uuid
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import datasets
import evaluate
import numpy as np
import torch

from ..checks import TaskSettingError, check_arguments, check_integer
from . import BUILTIN_TASK_MODULES  # built-in task -> its module (in the package __init__: listing needs no torch)

Example = dict[str, Any]


def checked_settings(init: Callable[..., None]) -> Callable[..., None]:
    """A task constructor ``init`` that checks its arguments first (`check_arguments`) and turns every refused
    setting (a ``ValueError`` or ``OSError`` of ``init``) into a `TaskSettingError` naming the task."""

    @functools.wraps(init)
    def checked(self: TaskAdapter, *args: Any, **kwargs: Any) -> None:
        try:
            check_arguments(init, args, kwargs)
            init(self, *args, **kwargs)
        except TaskSettingError:  # from the constructor of a base class: it names the task already
            raise
        except (ValueError, OSError) as err:
            task = getattr(type(self), "name", type(self).__name__)
            raise TaskSettingError(f"task {task!r}: {err}") from err

    return checked


def given_rows(encode: Callable[..., dict[str, torch.Tensor]]) -> Callable[..., dict[str, torch.Tensor]]:
    """A task's ``encode`` that refuses an empty list of rows first: a batch holds at least one row, whatever the
    task (checked here once for every task rather than in each)."""

    @functools.wraps(encode)
    def checked(self: TaskAdapter, examples: list[Example]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("encode needs at least one example")
        return encode(self, examples)

    return checked


class TaskAdapter(ABC):
    """Base class of every task; subclasses register themselves in `TASKS` by ``name``, their constructors
    check their settings (`checked_settings`) and their ``encode`` refuses an empty list of rows (`given_rows`)."""

    name: ClassVar[str]
    head: ClassVar[str]  # "token_regression" | "token_classification" | "causal_lm"
    quality_metric: ClassVar[str]  # key of compute_metrics() plotted as quality
    higher_is_better: ClassVar[bool]
    metric_name: ClassVar[str]  # the local `evaluate` module ``metrics/{metric_name}.py`` (see `load_metric`)

    @checked_settings
    def __init__(self, cache_dir: str | Path | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir() / self.name

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = checked_settings(cls.__init__)
        if "encode" in cls.__dict__ and not getattr(cls.encode, "__isabstractmethod__", False):
            cls.encode = given_rows(cls.encode)
        if "name" in cls.__dict__:
            TASKS[cls.name] = cls

    @abstractmethod
    def model_config(self) -> dict[str, Any]:
        """`ImplicitConfig` fields this task fixes (e.g. ``num_labels``, ``input_features``, ``is_causal``)."""

    def build_dataset(self, split: str, n: int, seed: int) -> datasets.Dataset:
        """A ``datasets.Dataset`` of ``n`` generated rows, deterministic in ``(split, n, seed)``, cached on disk.

        The rows are ``generate(random_stream(split, seed), n, split)`` with the task's `features`, cached at
        `dataset_path` (`cached_dataset`). The stream depends on ``(split, seed)`` only, so a smaller ``n``
        gives a prefix of a larger one (when `generate` draws row after row) and different splits never share
        draws. ``n = 0`` gives an empty set, neither generated nor cached.
        """
        check_size_and_seed(n, seed)
        features = self.features()
        if n == 0:  # nothing to generate or cache (datasets cannot load an empty saved set back)
            return datasets.Dataset.from_dict({name: [] for name in features}, features=features)

        def build():
            rows = self.generate(self.random_stream(split, seed), n, split)
            return datasets.Dataset.from_list(rows, features=features)

        return cached_dataset(self.dataset_path(split, n, seed), build)

    @abstractmethod
    def dataset_path(self, split: str, n: int, seed: int) -> Path:
        """Where `build_dataset` caches ``(split, n, seed)``: a directory under ``cache_dir`` whose name holds
        every setting the rows depend on."""

    @abstractmethod
    def features(self) -> datasets.Features:
        """The ``datasets.Features`` of a row (`list_feature` gives a list column)."""

    @abstractmethod
    def generate(self, rng: Any, n: int, split: str) -> list[Example]:
        """``n`` fresh rows drawn from ``rng`` (the `random_stream` of the split and seed)."""

    def random_stream(self, split: str, seed: int) -> Any:
        """The random stream `generate` draws ``(split, seed)``'s rows from: `split_rng` by default."""
        return split_rng(split, seed)

    @classmethod
    def load_metric(cls):
        """The task's local `evaluate` module ``metrics/{metric_name}.py``, loaded once per process."""
        return load_local_metric(cls.metric_name)

    @abstractmethod
    def encode(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """Model inputs and ``labels`` for a list of at least one row (the data loader's ``collate_fn``; an empty
        list is refused before a task's own ``encode`` runs, `given_rows`)."""

    @abstractmethod
    def decode(self, logits: torch.Tensor, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """One prediction per sample, in the domain's form, from head outputs on ``inputs``."""

    @abstractmethod
    def compute_metrics(self, predictions: list[torch.Tensor], examples: list[Example]) -> dict[str, float]:
        """Metrics averaged over the samples; contains ``quality_metric``."""

    def perturb(self, examples: list[Example], eps: float, seed: int) -> tuple[list[Example], torch.Tensor]:
        """Rows perturbed by ``δ`` of norm about ``eps`` (targets recomputed), and ``||δ||`` per row (float64).

        ``eps`` must be >= 0; ``eps = 0`` (or no rows) gives copies of the rows and ``||δ|| = 0`` without drawing
        anything; otherwise the task's `perturb_rows`, deterministic in ``(examples, eps, seed)``.
        """
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0; got {eps!r}")
        if eps == 0 or not examples:
            return [dict(example) for example in examples], torch.zeros(len(examples), dtype=torch.float64)
        return self.perturb_rows(examples, eps, seed)

    @abstractmethod
    def perturb_rows(self, examples: list[Example], eps: float, seed: int) -> tuple[list[Example], torch.Tensor]:
        """`perturb` for ``eps > 0`` and at least one row (`row_generators` gives each row its own draws)."""

    def difficulty(self, example: Example) -> int | None:
        """How hard a row is, as an integer (e.g. its number of serial steps), or ``None`` (the default) when
        the task has no such measure. Training uses it for loop schedules tied to the batch
        (``above_difficulty``) and for batches of one difficulty (``group_by_difficulty``)."""
        return None

    def loop_feedback(self, inputs: dict[str, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The in-loop feedback for the encoded batch ``inputs``, or ``None`` (the default) for none.

        A task whose `model_config` sets ``feedback_features`` returns a function from the head's
        output at the current iterate, ``(B, T, num_labels)``, to per-token features
        ``(B, T, feedback_features)``, acting row by row; the model adds their embedding to the
        injected input at every iteration (see `ImplicitModel.forward`).
        """
        return None

    def save_artifacts(self, model_dir: str | Path) -> None:
        """Write what a trained model needs besides its weights into ``model_dir`` (e.g. a tokenizer);
        nothing by default. The training loop calls it after saving the final model."""
        return None


def check_one_per_row(predictions: Sequence[Any], examples: Sequence[Example]) -> None:
    """Raise a ValueError unless there is one prediction per row: ``compute_metrics`` would otherwise
    score a truncated pairing."""
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")


TASKS: dict[str, type[TaskAdapter]] = {}


# Written next to a trained model by the training loop: the task (and its constructor arguments) the model
# was trained on, so the evaluation harness can rebuild the same task without being told.
TASK_FILE = "implicit_task.json"


def default_cache_dir() -> Path:
    """Where generated data sets are cached: ``$IMPLICIT_HF_CACHE`` or ``~/.cache/implicit_hf``."""
    return Path(os.environ.get("IMPLICIT_HF_CACHE", Path.home() / ".cache" / "implicit_hf"))


def get_task(name: str, **kwargs: Any) -> TaskAdapter:
    """The task registered as ``name``, constructed with ``kwargs``."""
    if name not in TASKS and name in BUILTIN_TASK_MODULES:
        importlib.import_module(BUILTIN_TASK_MODULES[name])
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(set(TASKS) | set(BUILTIN_TASK_MODULES))}; got {name!r}")
    return TASKS[name](**kwargs)


@functools.cache
def load_local_metric(name: str):
    """The local `evaluate` module ``tasks/metrics/{name}.py``, loaded by path (offline) once per process."""
    return evaluate.load(str(Path(__file__).parent / "metrics" / f"{name}.py"))


def check_size_and_seed(n: int, seed: int) -> None:
    """Refuse a data-set size or seed that is not an integer >= 0 (`TaskAdapter.build_dataset`'s arguments)."""
    check_integer("n", n, minimum=0)
    check_integer("seed", seed, minimum=0)


def row_generators(seed: int, count: int) -> list[np.random.Generator]:
    """One independent random stream per row, from ``seed``: a row's perturbation does not depend on the others."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(count)]


def split_rng(split: str, seed: int) -> np.random.Generator:
    """The random stream of ``(split, seed)``: splits never share draws, and a smaller ``n`` is a prefix."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(split.encode("utf-8"))]))


def list_feature(feature: Any) -> Any:
    """The ``datasets`` feature of a list of ``feature``: ``datasets.List`` from datasets 4 on, ``Sequence`` before."""
    return (getattr(datasets, "List", None) or datasets.Sequence)(feature)


def cached_dataset(path: Path, build: Callable[[], Any]):
    """The data set cached at ``path``, or ``build()`` (not empty) saved there (``save_to_disk``) and loaded back.

    The new data set is written next to ``path`` and renamed into place, so a concurrent reader never
    sees half of it; when another process finishes the same data set first, its copy is kept.
    """
    if path.exists():
        return datasets.load_from_disk(str(path))
    data = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    data.save_to_disk(str(partial))
    try:
        partial.rename(path)
    except OSError:  # another process finished the same data set first
        shutil.rmtree(partial, ignore_errors=True)
    return datasets.load_from_disk(str(path))


@contextlib.contextmanager
def single_threaded():
    """Run torch on one thread inside the block and restore the thread count after it.

    Data generators use it so that a data set is bit-identical whatever the caller's thread count:
    parallel reductions (and FFTs) change the order of floating-point sums, and an iterated solver
    amplifies those last-bit differences.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def feedback_kwargs(task: TaskAdapter, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``{"loop_feedback": ...}`` when ``task`` has in-loop feedback for ``inputs``, else ``{}``: the extra
    model arguments of a forward pass on ``inputs``."""
    feedback = task.loop_feedback(inputs)
    return {} if feedback is None else {"loop_feedback": feedback}
