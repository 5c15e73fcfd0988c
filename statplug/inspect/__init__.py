"""Read stats back from checkpoint files: ``statplug inspect`` and ``statplug plot``.

:mod:`~statplug.inspect.checkpoint` loads a checkpoint safely (``weights_only``, bounded) and
describes every stat, mask, encoding and buffer in it from the file alone;
:mod:`~statplug.inspect.plotting` draws those descriptions (matplotlib, the ``recipes`` extra).
"""

from statplug.inspect.checkpoint import (
    CHECKPOINT_SUFFIXES,
    CheckpointSummary,
    Entry,
    load_checkpoint,
    summarize,
    summarize_file,
)

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "CheckpointSummary",
    "Entry",
    "load_checkpoint",
    "summarize",
    "summarize_file",
]
