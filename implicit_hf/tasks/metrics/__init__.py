"""Local `evaluate` modules of the tasks, loaded by file path so nothing is downloaded."""
