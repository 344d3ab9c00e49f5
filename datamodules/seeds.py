"""One seed from several integers (a seed, a step, a sample index, a rank, a chunk), for the
per-sample and per-chunk random streams of data, training and inference.

Lives in the ground layer so that datamodules/ (synthetic clips) and modules/ (training draws,
inference chunks) share it.
"""

from __future__ import annotations

from itertools import cycle

# Distinct large primes per position: neighbouring tuples (step, index) and (step, index + 1) land
# far apart, and (a, b) never collides with (b, a) for realistic values.
PRIMES = (1_000_003, 1_000_033)


def mix_seed(*parts: int, strides: tuple[int, ...] = PRIMES) -> int:
    """parts[0] * s0 + parts[1], then * s1 + parts[2], ... (strides cycled), reduced to what
    torch.Generator.manual_seed takes (63 bits). Older streams with other strides keep them by
    passing `strides` (e.g. inference chunks: seed * 1000 + chunk)."""
    mixed = parts[0]
    for stride, part in zip(cycle(strides), parts[1:]):
        mixed = mixed * stride + part
    return mixed % (2**63)
