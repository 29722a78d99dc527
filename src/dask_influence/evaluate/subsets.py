"""The random training subsets of an LDS evaluation and the seeds of the retrainings.

Everything is a function of one integer ``seed`` (recorded in the evaluation's store), so a
subset can be drawn again anywhere: subset ``m`` keeps ``round(fraction * n_train)`` training
points chosen without replacement by ``numpy.random.default_rng([seed, m])``. The
retraining seeds are shared by all subsets (common random numbers: subsets differ in their
data, not in their initialization or batch order): replicate ``s`` trains with
:func:`training_seeds` ``(seed, S)[s]``.
"""

from __future__ import annotations

import numpy as np


def subset_size(n_train: int, fraction: float) -> int:
    """Training points kept by each subset: ``round(fraction * n_train)``.

    Raises:
        ValueError: that is 0 or all ``n_train`` points (every subset would be empty or the
            whole training set, and the LDS, a correlation over the subsets, undefined); the
            message gives the fractions that work, ``1 / n_train`` to ``(n_train - 1) / n_train``.
    """
    check_fraction(fraction)
    if n_train < 2:
        raise ValueError(
            f"The LDS compares subsets of the training set and needs at least 2 training points; got {n_train}."
        )
    k = int(round(fraction * n_train))
    if 1 <= k <= n_train - 1:
        return k
    what = "no training point" if k < 1 else f"all {n_train} training points"
    raise ValueError(
        f"fraction={fraction!r} keeps round({fraction!r} * {n_train}) = {k} of the {n_train} training points "
        f"({what}): every subset would be {'empty' if k < 1 else 'the whole training set'} and the LDS undefined. "
        f"Pass a fraction from {1 / n_train:.4g} to {(n_train - 1) / n_train:.4g} (e.g. 0.5)."
    )


def check_fraction(fraction: float) -> None:
    """Raise ``ValueError`` unless ``0 < fraction < 1``."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise ValueError(
            "fraction must be a number between 0 and 1 (the share of training points kept, e.g. 0.5); "
            f"got {fraction!r}."
        )


def draw_subset(n_train: int, fraction: float, seed: int, m: int) -> np.ndarray:
    """Sorted training indices of subset ``m``: ``(round(fraction * n_train),)`` int64 (see
    :func:`subset_size` for the fractions refused)."""
    k = subset_size(n_train, fraction)
    rng = np.random.default_rng([int(seed), int(m)])
    return np.sort(rng.choice(n_train, size=k, replace=False)).astype(np.int64)


def draw_subsets(n_train: int, n_subsets: int, fraction: float, seed: int) -> np.ndarray:
    """Membership of every subset: a boolean mask ``(n_subsets, n_train)`` (see :func:`draw_subset`)."""
    check_count("n_subsets", n_subsets, minimum=2)
    masks = np.zeros((n_subsets, n_train), dtype=bool)
    for m in range(n_subsets):
        masks[m, draw_subset(n_train, fraction, seed, m)] = True
    return masks


def training_seeds(seed: int, seeds: int) -> list[int]:
    """The ``seeds`` retraining seeds derived from ``seed``: non-negative 31-bit integers."""
    check_count("seeds", seeds)
    state = np.random.SeedSequence([int(seed), 0x5EED]).generate_state(seeds, dtype=np.uint32)
    return [int(v) >> 1 for v in state]


def check_count(name: str, value: int, *, minimum: int = 1) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer of at least {minimum}; got {value!r}.")


def check_seed(seed: int) -> None:
    """Raise ``ValueError`` unless ``seed`` is a non-negative integer."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer; got {seed!r}.")
