"""Shared test fixtures and helpers."""

from __future__ import annotations

import os

# Keep torch's intra-op threads low: the suite runs several processes on a 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
