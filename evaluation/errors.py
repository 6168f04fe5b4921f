"""The errors of evaluation: each says in one line what cannot run and why (the CLI prints it, exit 2)."""

from __future__ import annotations


class EvalError(ValueError):
    """Evaluation cannot run as asked (bad run dir, source, option); the message is one line."""


class SourceError(EvalError):
    """An image source (folder, .npz, dataset split) cannot be used; the message says why."""
