"""Audit of a model's non-trained state: buffers kept out of optimizers, on one device, exact.

:func:`audit` runs the static checks of DESIGN.md §4 on a model and its optimizers and returns an
:class:`AuditReport` of :class:`Finding` records with stable codes (:data:`CODES`). The runtime
checks run on request: :func:`check_fixed_buffers` (masks and encodings unchanged since a
:func:`snapshot_fixed_buffers`) and :func:`check_rank_divergence` (stats identical on every rank
after a sync). Pure torch: usable in a plain training loop.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from statplug.audit import audit
    >>> model = nn.Linear(3, 1)
    >>> model.cache = torch.zeros(3)   # a tensor attribute: not saved, not moved
    >>> report = audit(model, torch.optim.SGD(model.parameters(), lr=0.1))
    >>> report.codes(), report.ok
    (['unregistered-tensor'], True)
"""

from statplug.audit.checks import audit
from statplug.audit.report import CODES, AuditReport, Finding, Severity
from statplug.audit.runtime import (
    FixedBufferSnapshot,
    check_fixed_buffers,
    check_rank_divergence,
    fingerprint,
    snapshot_fixed_buffers,
)

__all__ = [
    "CODES",
    "AuditReport",
    "Finding",
    "FixedBufferSnapshot",
    "Severity",
    "audit",
    "check_fixed_buffers",
    "check_rank_divergence",
    "fingerprint",
    "snapshot_fixed_buffers",
]
