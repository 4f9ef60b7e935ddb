"""Training: one Accelerate loop for every head and task, driven by a typed recipe.

`recipe.py` reads and checks a recipe (`TrainConfig`, ``RECIPE.yaml`` plus ``--key value`` overrides);
`preflight.py` checks what needs its task before any process trains; `loop.py` is the loop (`train`, and
`main`: ``python -m implicit_hf.training``, ``implicit-hf train``); `schedule.py` draws each step's loop count,
`objective.py` is the loss, `stats.py` what the loop logs, `checkpoints.py` saves and resumes, `distributed.py`
spreads the model over processes (`Sharding`), `difficulty.py` batches rows by difficulty.

`recipe` itself imports neither torch nor transformers, so ``implicit-hf train --help`` (which imports the package
with the model code deferred, `implicit_hf_command`) stays fast; import `implicit_hf.training.loop` to train.
"""
