"""Task adapters: domain problems as sequence problems (see `base.TaskAdapter`)."""

from .base import TASKS, Example, TaskAdapter, get_task

__all__ = ["TASKS", "Example", "TaskAdapter", "get_task"]
