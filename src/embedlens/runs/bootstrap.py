"""One percentile bootstrap for every interval a run reports."""

from __future__ import annotations

import numpy as np

#: Resampled rows drawn per chunk (bounds memory: ``chunk x rows x columns`` values at a time).
_CHUNK_VALUES = 2**22


def bootstrap_interval(
    values: np.ndarray,
    resamples: int,
    confidence: float,
    seed: int | np.random.Generator,
    *,
    weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of a ratio of sums, resampling rows (images, questions).

    Each resample draws ``n`` rows with replacement and computes ``sum(values) / sum(weights)`` over
    them, per column: with ``weights`` None (every row weighs 1) that is the mean of each column; with
    ``weights`` = tokens per image and ``values`` = tokens per (image, group) it is each group's share
    of all tokens.

    Args:
        values: Shape ``[n]`` or ``[n, k]``.
        resamples: Bootstrap resamples.
        confidence: Level of the interval, in (0, 1).
        seed: A seed, or a generator to draw from (its state advances).
        weights: Shape ``[n]``, or None.

    Returns:
        Lower and upper bounds, each shape ``[k]`` (``[1]`` for 1-D ``values``); NaN without rows.
    """
    table = np.asarray(values)
    table = table.reshape(table.shape[0], int(np.prod(table.shape[1:], dtype=np.int64)))
    n, k = table.shape
    if n == 0:
        return np.full(k, np.nan), np.full(k, np.nan)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    estimates = np.empty((resamples, k))
    step = max(1, _CHUNK_VALUES // n)
    for start in range(0, resamples, step):
        stop = min(start + step, resamples)
        picks = rng.integers(0, n, size=(stop - start, n))
        sums = table[picks].sum(axis=1)  # [b, k]
        totals = np.full((stop - start, 1), n) if weights is None else np.asarray(weights)[picks].sum(axis=1)[:, None]
        estimates[start:stop] = sums / totals
    tail = (1 - confidence) / 2 * 100
    return np.percentile(estimates, tail, axis=0), np.percentile(estimates, 100 - tail, axis=0)
