"""Sinusoidal and rotary positional encodings with float32 tables in non-persistent buffers.

The tables are derived from ``(dim, base)``: they are never saved (so a checkpoint loads into a
model built with another ``max_len``), they are rebuilt by ``reset_parameters()`` after
``to_empty()``, and they grow when a longer sequence arrives. Angles are computed in float64 on
the CPU and the tables stored in float32, whatever the module's dtype: a float32 product
``position * inv_freq`` is already up to 5e-4 rad off at position 8k (and grows with the
position), a bfloat16 one tens of radians.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from statplug._buffers import PinnedDtypeModule, derived_device, positive_int

__all__ = ["RotaryEncoding", "SinusoidalEncoding"]


def _inverse_frequencies(dim: int, base: float, device: torch.device | str = "cpu") -> Tensor:
    """``base ** (-2i / dim)`` for ``i = 0 .. ceil(dim / 2) - 1``, in float64."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim
    return torch.pow(torch.tensor(base, dtype=torch.float64, device=device), -exponents)


def _angles(length: int, dim: int, base: float) -> Tensor:
    """Float64 ``[length, ceil(dim / 2)]`` table of ``position * inv_freq`` on the CPU."""
    # Explicit device: under ``with torch.device("meta")`` factories default to meta.
    positions = torch.arange(length, dtype=torch.float64, device="cpu")
    return torch.outer(positions, _inverse_frequencies(dim, base))


class _PositionalEncoding(PinnedDtypeModule):
    """Shared argument checks, rebuild and regrowth of the derived tables."""

    _version: int = 1

    def __init__(self, dim: int, max_len: int, base: float) -> None:
        super().__init__()
        self.dim = positive_int("dim", dim)
        self.max_len = positive_int("max_len", max_len)
        if isinstance(base, bool) or not isinstance(base, int | float):
            raise ValueError(f"`base` must be a positive float (got {base!r})")
        if not (math.isfinite(base) and base > 0):
            raise ValueError(f"`base` must be a positive finite float (got {base})")
        self.base = float(base)

    def _device(self) -> torch.device:
        raise NotImplementedError

    def _cached_len(self) -> int:
        raise NotImplementedError

    def _tables(self, length: int) -> dict[str, Tensor]:
        """The derived buffers for positions ``0 .. length - 1``, on the tables' device."""
        raise NotImplementedError

    def _build(self, length: int) -> None:
        """(Re)register the derived buffers for positions ``0 .. length - 1``."""
        for name, value in self._tables(length).items():
            self.register_buffer(name, value, persistent=False)

    def expected_buffers(self) -> dict[str, Tensor]:
        """What the derived buffers must hold, computed afresh at their current length on their
        device (empty for empty tables).

        :func:`statplug.audit.check_fixed_buffers` compares the buffers with it: a regrown table
        is legitimate, a table written to is not.
        """
        length = self._cached_len()
        return self._tables(length) if length >= 1 else {}

    def reset_parameters(self) -> None:
        """Recompute the derived buffers at ``max_len`` (after ``to_empty()`` they hold garbage)."""
        self._build(self.max_len)

    def _after_load(self, local_metadata: dict[str, Any]) -> None:
        # Derived, so rebuilt on every load: after to_empty() the tables hold garbage, and a
        # model built on the meta device and loaded with assign=True would keep meta tables.
        length = max(self.max_len, self._cached_len())
        self._rehome(derived_device(self._table(), local_metadata))
        self._build(length)

    def _table(self) -> Tensor:
        raise NotImplementedError

    def _rehome(self, device: torch.device) -> None:
        """Put the (empty) tables on ``device`` so that :meth:`_build` builds there."""
        for name, buf in list(self._buffers.items()):
            if buf is not None:
                self._buffers[name] = torch.empty(0, *buf.shape[1:], dtype=buf.dtype, device=device)

    def _ensure_len(self, length: int) -> None:
        if length > self._cached_len():
            self._build(length)

    def _check_last_dim(self, name: str, x: Tensor) -> None:
        if x.dim() < 2 or x.shape[-1] != self.dim:
            raise ValueError(
                f"{type(self).__name__}: expected `{name}` of shape [..., T, {self.dim}] "
                f"(got {list(x.shape)})"
            )

    def extra_repr(self) -> str:
        return f"{self.dim}, max_len={self.max_len}, base={self.base}"


class SinusoidalEncoding(_PositionalEncoding):
    r"""Adds the fixed sinusoidal position encoding of "Attention Is All You Need".

    .. math::
        \text{pe}[t, 2i] = \sin(t \cdot \text{base}^{-2i/d}), \quad
        \text{pe}[t, 2i + 1] = \cos(t \cdot \text{base}^{-2i/d})

    The table ``pe`` is a non-persistent float32 buffer, computed in float64, regrown when
    ``x.shape[-2]`` exceeds it. The sum is formed in float32 (or the input's dtype if wider) and
    returned in the input's dtype.

    Args:
        dim: number of features :math:`d`.
        max_len: positions in the table built at construction. Default: 2048
        base: wavelength base. Default: 10000.0

    Shape:
        - Input: :math:`(*, T, d)`.
        - Output: :math:`(*, T, d)`, same dtype as the input.

    Example:
        >>> import torch
        >>> from statplug.encodings import SinusoidalEncoding
        >>> enc = SinusoidalEncoding(4, max_len=16).to(torch.bfloat16)
        >>> enc.pe.dtype
        torch.float32
        >>> y = enc(torch.zeros(2, 3, 4, dtype=torch.bfloat16))
        >>> y.dtype, y.shape
        (torch.bfloat16, torch.Size([2, 3, 4]))
        >>> enc(torch.zeros(1, 2, 4))[0, 1]  # position 1: sin(1), cos(1), sin(0.01), cos(0.01)
        tensor([0.8415, 0.5403, 0.0100, 0.9999])
    """

    pe: Tensor

    def __init__(self, dim: int, *, max_len: int = 2048, base: float = 10000.0) -> None:
        super().__init__(dim, max_len, base)
        self.register_buffer("pe", torch.empty(0, self.dim), persistent=False)
        self.reset_parameters()

    def _device(self) -> torch.device:
        return self.pe.device

    def _table(self) -> Tensor:
        return self.pe

    def _cached_len(self) -> int:
        return int(self.pe.shape[0])

    def _tables(self, length: int) -> dict[str, Tensor]:
        angles = _angles(length, self.dim, self.base)
        pe = torch.empty(length, self.dim, dtype=torch.float64, device="cpu")
        pe[:, 0::2] = angles.sin()
        pe[:, 1::2] = angles[:, : self.dim // 2].cos()
        return {"pe": pe.to(device=self._device(), dtype=torch.float32)}

    def forward(self, x: Tensor) -> Tensor:
        self._check_last_dim("x", x)
        seq_len = x.shape[-2]
        self._ensure_len(seq_len)
        work = torch.promote_types(x.dtype, torch.float32)
        return (x.to(work) + self.pe[:seq_len].to(work)).to(x.dtype)


class RotaryEncoding(_PositionalEncoding):
    r"""Rotary position embedding (RoPE) applied to queries and keys.

    Uses the *rotate-half* layout (GPT-NeoX, Hugging Face Llama): feature ``i`` is paired with
    feature ``i + dim/2`` and the pair is rotated by the angle :math:`t \cdot \theta_i`, where
    :math:`\theta_i = \text{base}^{-2i/d}`:

    .. math::
        (x_i, x_{i + d/2}) \mapsto (x_i \cos - x_{i+d/2} \sin,\; x_{i+d/2} \cos + x_i \sin)

    ``inv_freq`` (:math:`\theta`, ``[d/2]``) and the ``cos_cached`` / ``sin_cached`` tables
    (``[max_len, d/2]``) are non-persistent float32 buffers whose angles are computed in float64;
    the tables regrow for longer inputs. With explicit ``positions`` the angles are computed in
    float64 on the positions' device (the CPU for devices without float64). The rotation runs in
    float32 (or the input's dtype if wider) and returns the input's dtype.

    Args:
        dim: rotated feature size :math:`d` (even).
        max_len: positions in the tables built at construction. Default: 2048
        base: wavelength base. Default: 10000.0

    Shape:
        - ``q``: :math:`(*, T_q, d)`, ``k``: :math:`(*, T_k, d)`.
        - ``positions``: optional, broadcastable to ``q.shape[:-1]`` and ``k.shape[:-1]``
          (e.g. :math:`(T)`); default ``0 .. T - 1`` for each of ``q`` and ``k``.
        - Output: ``(q, k)`` rotated, same shapes and dtypes as the inputs.

    Example:
        >>> import torch
        >>> from statplug.encodings import RotaryEncoding
        >>> rope = RotaryEncoding(8, max_len=32).to(torch.bfloat16)
        >>> rope.inv_freq.dtype, rope.cos_cached.dtype
        (torch.float32, torch.float32)
        >>> q = torch.randn(2, 4, 10, 8, dtype=torch.bfloat16)
        >>> qr, kr = rope(q, q)
        >>> qr.dtype, qr.shape
        (torch.bfloat16, torch.Size([2, 4, 10, 8]))
        >>> torch.equal(qr[..., 0, :], q[..., 0, :])  # position 0 is not rotated
        True
    """

    inv_freq: Tensor
    cos_cached: Tensor
    sin_cached: Tensor

    def __init__(self, dim: int, *, max_len: int = 2048, base: float = 10000.0) -> None:
        super().__init__(dim, max_len, base)
        if self.dim % 2:
            raise ValueError(f"`dim` must be even for rotary pairs (got {self.dim})")
        half = self.dim // 2
        self.register_buffer("inv_freq", torch.empty(half), persistent=False)
        self.register_buffer("cos_cached", torch.empty(0, half), persistent=False)
        self.register_buffer("sin_cached", torch.empty(0, half), persistent=False)
        self.reset_parameters()

    def _device(self) -> torch.device:
        return self.inv_freq.device

    def _table(self) -> Tensor:
        return self.inv_freq

    def _cached_len(self) -> int:
        return int(self.cos_cached.shape[0])

    def _tables(self, length: int) -> dict[str, Tensor]:
        angles = _angles(length, self.dim, self.base)
        tables = {
            "inv_freq": _inverse_frequencies(self.dim, self.base),
            "cos_cached": angles.cos(),
            "sin_cached": angles.sin(),
        }
        device = self._device()
        return {k: v.to(device=device, dtype=torch.float32) for k, v in tables.items()}

    def _cos_sin_at(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        if positions.dtype == torch.bool or positions.is_complex():
            raise ValueError(
                f"RotaryEncoding: `positions` must be an integer or floating tensor "
                f"(got {positions.dtype})"
            )
        # MPS has no float64; float32 angles there would be up to 5e-4 rad off at position 8k.
        work = torch.device("cpu") if positions.device.type == "mps" else positions.device
        angles = positions.to(device=work, dtype=torch.float64).unsqueeze(-1) * (
            _inverse_frequencies(self.dim, self.base, device=work)
        )
        device = self._device()
        return (
            angles.cos().to(device=device, dtype=torch.float32),
            angles.sin().to(device=device, dtype=torch.float32),
        )

    @staticmethod
    def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        work = torch.promote_types(x.dtype, torch.float32)
        x = x.to(work)
        cos, sin = cos.to(work), sin.to(work)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def forward(
        self, q: Tensor, k: Tensor, positions: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        self._check_last_dim("q", q)
        self._check_last_dim("k", k)
        if positions is None:
            t_q, t_k = q.shape[-2], k.shape[-2]
            self._ensure_len(max(t_q, t_k))
            q_out = self._rotate(q, self.cos_cached[:t_q], self.sin_cached[:t_q])
            k_out = self._rotate(k, self.cos_cached[:t_k], self.sin_cached[:t_k])
        else:
            for name, x in (("q", q), ("k", k)):
                try:
                    ok = torch.broadcast_shapes(positions.shape, x.shape[:-1]) == x.shape[:-1]
                except RuntimeError:
                    ok = False
                if not ok:
                    raise ValueError(
                        f"RotaryEncoding: `positions` of shape {list(positions.shape)} must "
                        f"broadcast to `{name}`.shape[:-1] = {list(x.shape[:-1])}"
                    )
            cos, sin = self._cos_sin_at(positions)
            q_out = self._rotate(q, cos, sin)
            k_out = self._rotate(k, cos, sin)
        return q_out.to(q.dtype), k_out.to(k.dtype)
