"""What each ``implicit-hf`` command runs once `implicit_hf.cli` has parsed its options: the checks at the edge
that need the model or the task (`edge`), then the work (`evaluate`, `lm_eval`, `lm_eval_data`, `convert`,
`demo`; ``train`` is `implicit_hf.training.loop`). `implicit_hf.cli` imports one of them per run, after parsing,
so that ``--help`` imports neither torch nor transformers."""
