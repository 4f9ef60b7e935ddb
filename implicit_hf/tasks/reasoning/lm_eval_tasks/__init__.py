"""lm-evaluation-harness task YAMLs shipped with the package (``--include_path`` this folder)."""
