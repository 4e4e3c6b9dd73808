"""Which sample indices each process reads: the one sharding rule every backend uses.

Train: a permutation of all N indices drawn from (seed, epoch) alone, so every backend and
every world size sees the same order; the tail is dropped so each of the W ranks gets
``floor(N / (W*B))`` full batches. Rank r takes every W-th index starting at r, which makes
global step i read exactly ``perm[i*W*B:(i+1)*W*B]`` whatever W is: 8 GPUs x 32 and
1 GPU x 256 consume the same images per optimizer step.

Val: the fixed (sorted) order split into W contiguous blocks, no padding, no duplicates; the
union over ranks is every image exactly once (what exact evaluation needs).
"""
from __future__ import annotations

import numpy as np

_MASK64 = (1 << 64) - 1  # numpy seeds must be non-negative; keep negative seeds distinct


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The train order of epoch ``epoch`` (0-based): a permutation of range(n)."""
    return np.random.default_rng([seed & _MASK64, epoch]).permutation(n)


def train_batches(n: int, world: int, batch_size: int) -> int:
    """Full batches every rank yields per train epoch."""
    return n // (world * batch_size)


def train_indices(n: int, seed: int, epoch: int, rank: int, world: int,
                  batch_size: int) -> list[int]:
    """Rank ``rank``'s train indices for ``epoch``, in reading order (batches of batch_size)."""
    _check(rank, world)
    used = train_batches(n, world, batch_size) * world * batch_size
    return epoch_permutation(n, seed, epoch)[:used][rank::world].tolist()


def val_indices(n: int, rank: int, world: int) -> list[int]:
    """Rank ``rank``'s contiguous block of range(n); block sizes differ by at most one."""
    _check(rank, world)
    return list(range(rank * n // world, (rank + 1) * n // world))


def _check(rank: int, world: int) -> None:
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank} world={world}")
