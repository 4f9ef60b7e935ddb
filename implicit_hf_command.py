"""The ``implicit-hf`` console script: runs `implicit_hf.cli.main` with the model code's import deferred.

Importing ``implicit_hf`` imports torch and transformers (to register the Auto classes). The command sets
``IMPLICIT_HF_DEFER_MODELING=1`` first, so the package imports only what a command needs, after its arguments
are parsed: ``implicit-hf --help`` and every ``implicit-hf COMMAND --help`` import neither torch nor transformers.
"""

from __future__ import annotations

import os


def main() -> None:
    os.environ["IMPLICIT_HF_DEFER_MODELING"] = "1"
    from implicit_hf.cli import main as run

    run()


if __name__ == "__main__":
    main()
