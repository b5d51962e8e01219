"""Why a training run stops before its last epoch."""

from __future__ import annotations


class TrainingStopped(SystemExit):
    """The run met a fault it does not train through; the message says what happened and what was kept."""
