"""implicit-hf: implicit (deep-equilibrium, looped weight-tied) transformers for the Hugging Face stack.

Importing the package registers ``model_type="implicit"`` with transformers' Auto classes, and
marks every class for ``auto_map`` so saved checkpoints also load with ``trust_remote_code=True``.

The package itself imports neither torch nor transformers (so that ``implicit-hf --help`` is quick):
the model classes (``implicit_hf.ImplicitConfig``, ...) are loaded on first use, and the registration
(`implicit_hf.modeling.register_auto_classes`) runs as soon as ``implicit_hf.modeling`` is imported, which
happens on the first use of a model class and, after ``import implicit_hf``, as soon as transformers
itself is imported (so ``import implicit_hf; AutoModel.from_pretrained(path)`` works as before).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

__version__ = "0.1.0"

_MODELING_EXPORTS = (
    "ImplicitConfig",
    "ImplicitForCausalLM",
    "ImplicitForTokenClassification",
    "ImplicitForTokenRegression",
    "ImplicitHeadOutput",
    "ImplicitModel",
    "ImplicitModelOutput",
    "ImplicitPreTrainedModel",
    "SolverStats",
    "anderson",
    "broyden",
    "fixed_point",
    "get_solver",
    "picard",
)

__all__ = [*_MODELING_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _MODELING_EXPORTS:
        modeling = importlib.import_module(".modeling", __name__)  # registers the Auto classes
        value = getattr(modeling, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def _register() -> None:
    """Import ``implicit_hf.modeling``, whose last statement registers the Auto classes (a no-op when it
    is imported already, or is being imported: it then registers when it finishes)."""
    try:
        importlib.import_module(".modeling", __name__)
    except ImportError:  # transformers imported from inside a package that is itself half-imported
        pass  # the first use of a model class registers instead


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Runs `_register` once, right after the first ``import transformers`` of the process completes."""

    fired = False

    def find_spec(self, name: str, path: Any = None, target: Any = None):
        if self.fired or name != "transformers":
            return None
        self.fired = True  # also keeps the find_spec below from coming back here
        spec = importlib.util.find_spec(name)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module: Any) -> None:
            try:
                exec_module(module)
            finally:
                del loader.exec_module  # the loader is transformers' own again
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
            _register()

        loader.exec_module = exec_then_register
        return spec


if "implicit_hf.modeling" not in sys.modules:
    if "transformers" in sys.modules:
        _register()
    else:
        sys.meta_path.insert(0, _RegisterAfterTransformers())
