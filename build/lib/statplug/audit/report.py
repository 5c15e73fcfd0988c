"""Audit results: :class:`Finding`, :class:`AuditReport` and the stable codes of DESIGN.md §4."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, Literal

from statplug.errors import AuditError

__all__ = ["CODES", "AuditReport", "Finding", "Severity"]

Severity = Literal["error", "warning"]

# Stable codes and their severities, in the order a report lists them (errors first).
CODES: dict[str, Severity] = {
    "buffer-in-optimizer": "error",
    "stat-is-parameter": "error",
    "duplicate-in-optimizer": "error",
    "device-mismatch": "error",
    "fixed-buffer-mutated": "error",
    "rank-divergence": "error",
    "param-not-in-optimizer": "warning",
    "frozen-param-in-optimizer": "warning",
    "unregistered-tensor": "warning",
    "low-precision-stat": "warning",
}
_SEVERITY_ORDER = {"error": 0, "warning": 1}
_CODE_ORDER = {code: i for i, code in enumerate(CODES)}


@dataclasses.dataclass(frozen=True)
class Finding:
    """One problem found by :func:`statplug.audit.audit`.

    Args:
        code: stable identifier, one of :data:`CODES` (e.g. ``"buffer-in-optimizer"``).
        severity: ``"error"`` or ``"warning"``.
        name: qualified name of the module, parameter or buffer concerned
            (``"encoder.norm.moments.mean"``).
        message: what is wrong, expected versus received, and the fix.
    """

    code: str
    severity: Severity
    name: str
    message: str

    @classmethod
    def of(cls, code: str, name: str, message: str) -> Finding:
        """A finding whose severity is the one :data:`CODES` fixes for ``code``."""
        return cls(code, CODES[code], name, message)

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def _sort_key(f: Finding) -> tuple[int, int]:
    return _SEVERITY_ORDER.get(f.severity, 2), _CODE_ORDER.get(f.code, len(CODES))


class AuditReport:
    """The findings of one audit: errors first, then warnings, each in :data:`CODES` order.

    A clean model gives an empty report: ``report.findings == []`` and ``report.ok``.

    Example:
        >>> from statplug.audit import AuditReport, Finding
        >>> report = AuditReport([Finding.of("unregistered-tensor", "cache", "not saved")])
        >>> report.ok, len(report.warnings)
        (True, 1)
        >>> print(report)
        code                 severity  name   message
        unregistered-tensor  warning   cache  not saved
        1 finding: 0 errors, 1 warning
    """

    def __init__(self, findings: Iterable[Finding] = ()) -> None:
        # sorted() is stable: within one code, findings keep the order the model was walked in.
        self.findings: list[Finding] = sorted(findings, key=_sort_key)

    @property
    def errors(self) -> list[Finding]:
        """Findings of severity ``"error"``."""
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        """Findings of severity ``"warning"``."""
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings allowed)."""
        return not self.errors

    def codes(self) -> list[str]:
        """The code of every finding, in report order."""
        return [f.code for f in self.findings]

    def raise_for_errors(self) -> AuditReport:
        """Raise :class:`~statplug.errors.AuditError` listing every error; else return ``self``."""
        errors = self.errors
        if errors:
            n = len(errors)
            raise AuditError(
                f"statplug audit found {n} error{'s' if n != 1 else ''}:\n{_table(errors)}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain Python types only (JSON-, YAML- and logger-friendly)."""
        return {
            "ok": self.ok,
            "n_errors": len(self.errors),
            "n_warnings": len(self.warnings),
            "findings": [f.to_dict() for f in self.findings],
        }

    def __str__(self) -> str:
        n_err, n_warn = len(self.errors), len(self.warnings)
        if not self.findings:
            return "statplug audit: no findings"
        n = len(self.findings)
        summary = (
            f"{n} finding{'s' if n != 1 else ''}: {n_err} error{'s' if n_err != 1 else ''}, "
            f"{n_warn} warning{'s' if n_warn != 1 else ''}"
        )
        return f"{_table(self.findings)}\n{summary}"

    def __repr__(self) -> str:
        return (
            f"AuditReport(ok={self.ok}, errors={len(self.errors)}, "
            f"warnings={len(self.warnings)}, codes={self.codes()})"
        )


def _table(findings: list[Finding]) -> str:
    """Aligned columns; the message comes last so a long one does not widen the others."""
    header = ("code", "severity", "name", "message")
    rows = [header, *((f.code, f.severity, f.name, f.message) for f in findings)]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r[:3], widths, strict=True)) + "  " + r[3]
        for r in rows
    ).rstrip()
