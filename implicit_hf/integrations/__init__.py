"""Integrations with serving and evaluation systems (optional extras)."""
