"""Counter-based random numbers: a splitmix64 hash of integer keys, vectorised in int64 torch ops.

`uniform(seed, stream, a, b, ...)` is a pure function of its integer keys, so a value drawn for
(seed, step, sample id, position) is the same on any parallel layout, micro-batch split or sample order.
torch int64 arithmetic wraps modulo 2**64 (two's complement), which is exactly the uint64 arithmetic of
splitmix64 once right shifts are made logical (`_shr`).
"""
from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _signed(c: int) -> int:
    """uint64 constant -> the int64 with the same bits."""
    return c - (1 << 64) if c >= (1 << 63) else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MUL1 = _signed(0xBF58476D1CE4E5B9)
_MUL2 = _signed(0x94D049BB133111EB)

# Independent streams so the trust-region mask and the prefix sampler never share numbers.
STREAM_TRUST = 1
STREAM_PREFIX = 2


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on int64 tensors (bit-identical to the uint64 reference)."""
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MUL1
    z = (z ^ _shr(z, 27)) * _MUL2
    return z ^ _shr(z, 31)


def hash_keys(*keys: int | torch.Tensor) -> torch.Tensor:
    """h = splitmix64(... splitmix64(splitmix64(k0) ^ k1) ... ^ kn), keys broadcast together (int64)."""
    h = None
    for k in keys:
        k = torch.as_tensor(k, dtype=torch.int64)
        h = splitmix64(k if h is None else h ^ k)
    return h


def uniform(*keys: int | torch.Tensor) -> torch.Tensor:
    """u in [0, 1) (float64, 53 random bits) from the hash of the integer keys."""
    return _shr(hash_keys(*keys), 11).to(torch.float64) * (2.0 ** -53)


def reference_uniform(*keys: int) -> float:
    """Plain-Python uint64 reference of `uniform` for one set of scalar keys (used by tests)."""
    h = None
    for k in keys:
        k &= _MASK64
        x = k if h is None else (h ^ k)
        z = (x + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        h = z ^ (z >> 31)
    return (h >> 11) * (2.0 ** -53)
