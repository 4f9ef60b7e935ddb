"""``python -m implicit_hf.training RECIPE.yaml [--key value ...]``, also under ``accelerate launch``."""

from .loop import main

main()
