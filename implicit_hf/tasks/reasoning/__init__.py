"""Reasoning tasks: discrete puzzles (sudoku, mazes) as token-classification problems."""
