"""Attention and random masks held as buffers.

:class:`CausalMask` is derived state: it is never saved and is rebuilt on demand.
:class:`RandomMask` is random state: it is saved, and it is generated from its seed on the CPU so
that every rank and every device holds the same bits.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from statplug._buffers import PinnedDtypeModule, checked_int, derived_device, positive_int

__all__ = ["CausalMask", "RandomMask"]

_MAX_SEED = 2**63 - 1  # the seed is stored in an int64 buffer


def _causal(length: int, device: torch.device) -> Tensor:
    """The bool ``[length, length]`` causal mask (True on and below the diagonal)."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril_()


class CausalMask(PinnedDtypeModule):
    r"""A causal (lower-triangular) attention mask, cached as a non-persistent buffer.

    ``mask(seq_len)`` returns a bool ``[T, T]`` matrix where ``True`` means *may attend* (query
    ``i`` sees key ``j`` iff ``j <= i``), the convention of
    :func:`torch.nn.functional.scaled_dot_product_attention`'s bool ``attn_mask``. The cached
    buffer (named ``mask``) is derived, so it is not in the ``state_dict``; a longer sequence than
    the cache regrows it on the cache's device.

    Args:
        max_len: length of the cache built at construction and by :meth:`reset_parameters`.

    Shape:
        - Output of ``mask(seq_len)``: :math:`(T, T)` with :math:`T` = ``seq_len``, dtype bool.

    Example:
        >>> import torch
        >>> from statplug.masks import CausalMask
        >>> causal = CausalMask(4)
        >>> causal.mask(3)
        tensor([[ True, False, False],
                [ True,  True, False],
                [ True,  True,  True]])
        >>> causal.mask(16).shape  # longer than max_len: the cache regrows
        torch.Size([16, 16])
        >>> list(causal.state_dict())
        []
    """

    _version: int = 1

    def __init__(self, max_len: int) -> None:
        super().__init__()
        self.max_len = positive_int("max_len", max_len)
        # `register_buffer` refuses the name of the method `mask`: registered directly, the
        # buffer is still moved, listed by named_buffers() and left out of state_dict().
        self._buffers["mask"] = torch.empty(0, 0, dtype=torch.bool)
        self._non_persistent_buffers_set.add("mask")
        self.reset_parameters()

    def _cache(self) -> Tensor:
        buf = self._buffers["mask"]
        assert buf is not None  # set in __init__, never removed
        return buf

    def _build(self, length: int) -> None:
        self._buffers["mask"] = _causal(length, self._cache().device)

    def expected_buffers(self) -> dict[str, Tensor]:
        """What the derived buffer must hold, computed afresh: ``{"mask": ...}``, the causal mask
        at the cache's current length on its device (empty for an empty cache).

        :func:`statplug.audit.check_fixed_buffers` compares the buffer with it: a regrown cache
        is legitimate, a mask written to is not.
        """
        cache = self._cache()
        length = int(cache.shape[0])
        return {"mask": _causal(length, cache.device)} if length >= 1 else {}

    def reset_parameters(self) -> None:
        """Rebuild the cache at ``max_len`` (after ``to_empty()`` it holds garbage)."""
        self._build(self.max_len)

    def _after_load(self, local_metadata: dict[str, Any]) -> None:
        # Derived, so rebuilt on every load: after to_empty() the cache holds garbage, and a
        # model built on the meta device and loaded with assign=True would keep a meta mask.
        cache = self._cache()
        device = derived_device(cache, local_metadata)
        self._buffers["mask"] = torch.ones(0, 0, dtype=torch.bool, device=device)
        self._build(max(self.max_len, int(cache.shape[0])))

    def mask(self, seq_len: int) -> Tensor:
        """Return the bool ``[seq_len, seq_len]`` causal mask (True = may attend)."""
        seq_len = positive_int("seq_len", seq_len)
        cache = self._cache()
        if seq_len > cache.shape[0]:
            self._build(seq_len)
            cache = self._cache()
        return cache[:seq_len, :seq_len]

    def forward(self, seq_len: int) -> Tensor:
        """Same as :meth:`mask`."""
        return self.mask(seq_len)

    def extra_repr(self) -> str:
        return f"max_len={self.max_len}"


class RandomMask(PinnedDtypeModule):
    r"""A fixed random keep-mask, saved with the model and identical on every rank.

    Each element is kept (``True``) with probability ``1 - p``, as in dropout, but the mask is drawn
    once, from ``seed`` with a CPU :class:`torch.Generator`, so it does not depend on the device,
    the rank or torch's global random state (which it leaves untouched). ``mask`` and ``seed`` are
    persistent buffers: a reload restores the exact bits.

    Args:
        shape: shape of the mask, an int or a tuple of ints.
        p: probability of dropping an element, in ``[0, 1)``.
        seed: non-negative int (below ``2**63``) the mask is drawn from.

    Shape:
        - ``mask``: ``shape``, dtype bool.
        - Input of ``forward``: any shape that broadcasts with ``shape``.
        - Output of ``forward``: the broadcast shape, dropped elements set to zero (no rescaling).

    Example:
        >>> import torch
        >>> from statplug.masks import RandomMask
        >>> m = RandomMask((64, 64), 0.25, seed=0)
        >>> m.mask.dtype, m.mask.shape
        (torch.bool, torch.Size([64, 64]))
        >>> sorted(m.state_dict())
        ['mask', 'seed']
        >>> torch.equal(m.resample_(7).mask, RandomMask((64, 64), 0.25, seed=7).mask)
        True
        >>> m(torch.ones(64, 64)).sum() == m.mask.sum()
        tensor(True)
    """

    _version: int = 1
    mask: Tensor
    seed: Tensor

    def __init__(self, shape: int | tuple[int, ...], p: float, *, seed: int) -> None:
        super().__init__()
        if isinstance(shape, tuple | list):
            self.shape = tuple(positive_int("shape", s) for s in shape)
        else:
            self.shape = (positive_int("shape", shape),)
        if isinstance(p, bool) or not isinstance(p, int | float):
            raise ValueError(f"`p` must be a float in [0, 1) (got {p!r})")
        if not 0.0 <= p < 1.0:
            raise ValueError(f"`p` must be in [0, 1), the probability of dropping (got {p})")
        self.p = float(p)
        self._seed = self._check_seed(seed)
        # Allocated on the default device (``meta`` inside ``with torch.device("meta")``), filled
        # by reset_parameters.
        self.register_buffer("mask", torch.empty(self.shape, dtype=torch.bool))
        self.register_buffer("seed", torch.empty((), dtype=torch.int64))
        self.reset_parameters()

    @staticmethod
    def _check_seed(seed: Any) -> int:
        return checked_int("seed", seed, 0, _MAX_SEED, "an int in [0, 2**63)")

    def _draw(self, seed: int) -> Tensor:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        # float64 so that the keep probability is 1 - p to float64 accuracy.
        uniform = torch.rand(self.shape, generator=gen, dtype=torch.float64, device="cpu")
        return uniform >= self.p

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Redraw ``mask`` from the current seed (the constructor's, or the last ``resample_``)."""
        self.mask.copy_(self._draw(self._seed))
        self.seed.fill_(self._seed)

    @torch.no_grad()
    def resample_(self, seed: int) -> RandomMask:
        """Redraw the mask in place from ``seed``, as a fresh ``RandomMask(..., seed=seed)``."""
        self._seed = self._check_seed(seed)
        self.reset_parameters()
        return self

    def forward(self, x: Tensor) -> Tensor:
        """Zero the dropped elements of ``x`` (no ``1 / (1 - p)`` rescaling)."""
        return x.masked_fill(~self.mask, 0)

    def expected_buffers(self) -> dict[str, Tensor]:
        """What the mask must hold, computed afresh: ``{"mask": ...}``, the draw from the
        ``seed`` buffer (which ``resample_`` and a load set), on the mask's device. Empty when
        ``seed`` holds no single integer to draw from.

        :func:`statplug.audit.check_fixed_buffers` compares the mask with it: a resampled or
        loaded mask is legitimate, a mask (or seed) written to is not.
        """
        seed = self.seed
        if seed.numel() != 1 or seed.is_floating_point() or seed.device.type == "meta":
            return {}
        return {"mask": self._draw(int(seed)).to(self.mask.device)}

    def _after_load(self, local_metadata: dict[str, Any]) -> None:
        # Keep the Python copy of the seed in step with the loaded buffer so that resample-free
        # reset_parameters() reproduces the loaded mask. A meta buffer holds no value to read.
        if self.seed.device.type != "meta":
            self._seed = int(self.seed)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, p={self.p}, seed={self._seed}"
