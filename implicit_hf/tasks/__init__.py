"""Task adapters: domain problems as sequence problems (see `base.TaskAdapter`)."""

from .base import TASKS, Example, TaskAdapter, build_model, get_task

__all__ = ["TASKS", "Example", "TaskAdapter", "build_model", "get_task"]
