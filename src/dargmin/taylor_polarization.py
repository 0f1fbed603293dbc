"""Polarization: mixed derivatives and derivative tensors from directional derivatives.

The k-th derivative of the solution map is a symmetric k-linear form, so its mixed values
``D^k x*[Δ₁, …, Δ_k]`` follow from directional ones ``D^k x*[Δ]^k`` along sums of the
``Δᵢ``:

.. math::

    D^k x^*[\\Delta_1, \\dots, \\Delta_k] = \\frac{1}{k!}
    \\sum_{\\emptyset \\ne S \\subseteq \\{1..k\\}} (-1)^{k-|S|}\\,
    D^k x^*\\Big[\\sum_{i\\in S} \\Delta_i\\Big]^k.

This module computes the directions and weights (:func:`_polarization`, and
:func:`_tensor_polarization` for a whole derivative tensor with shared directions computed
once) that :meth:`dargmin.taylor.TaylorExpansion.mixed_derivative` and
:meth:`~dargmin.taylor.TaylorExpansion.derivative_tensor` combine.
"""

from __future__ import annotations

import itertools
import math

import numpy as np


def _polarization(k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(weights, signs)`` with ``D^k[Δ₁..Δ_k] = Σ_S signs[S] D^k[weights[S] @ Δ]^k / k!``.

    One row per non-empty subset ``S`` of ``{1..k}``: ``weights[S]`` is its indicator and
    ``signs[S] = (-1)^{k-|S|}`` (polarization of the symmetric k-linear form).
    """
    subsets = [s for r in range(1, k + 1) for s in itertools.combinations(range(k), r)]
    weights = np.zeros((len(subsets), k), dtype=np.float64)
    signs = np.empty(len(subsets), dtype=np.float64)
    for row, subset in enumerate(subsets):
        weights[row, list(subset)] = 1.0
        signs[row] = (-1.0) ** (k - len(subset))
    return weights, signs


def _tensor_polarization(m: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(directions, combine, index)`` for the k-th derivative tensor in ``m`` parameters.

    ``directions`` (integer count vectors, one row per distinct direction) are expanded;
    ``combine @ D^k[directions]^k`` gives the ``C(m+k−1, k)`` distinct entries (one per
    multiset of coordinates), and ``index`` (shape ``(m,)*k``) maps every index tuple to its
    multiset's row (the tensor is symmetric).
    """
    multisets = list(itertools.combinations_with_replacement(range(m), k))
    direction_index: dict[tuple[int, ...], int] = {}
    rows, cols, vals = [], [], []
    for row, multiset in enumerate(multisets):
        # Polarization over the k (possibly repeated) coordinate vectors; the subset sum
        # is an integer count vector, and equal count vectors share one expansion.
        contrib: dict[tuple[int, ...], float] = {}
        for r in range(1, k + 1):
            for subset in itertools.combinations(range(k), r):
                counts = [0] * m
                for pos in subset:
                    counts[multiset[pos]] += 1
                key = tuple(counts)
                contrib[key] = contrib.get(key, 0.0) + (-1.0) ** (k - r)
        for key, weight in contrib.items():
            if weight != 0.0:
                col = direction_index.setdefault(key, len(direction_index))
                rows.append(row)
                cols.append(col)
                vals.append(weight / math.factorial(k))
    combine = np.zeros((len(multisets), len(direction_index)))
    np.add.at(combine, (np.array(rows), np.array(cols)), np.array(vals))
    index = np.empty((m,) * k, dtype=np.int64)
    for row, multiset in enumerate(multisets):
        for perm in set(itertools.permutations(multiset)):
            index[perm] = row
    return np.array(list(direction_index), dtype=np.float64), combine, index
