"""Clipping-range searches over one histogram: percentile, KL (entropy) and MSE.

The histogram is anchored at zero: bin ``a`` (an absolute index, negative below zero) covers
``[a * width, (a + 1) * width)``, and the grid always contains bin 0. Folding it into a histogram
of ``|x|`` is therefore exact: negative bin ``a`` lands on ``|x|`` bin ``-a - 1``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from inc_core.calibration._common import QRANGES
from inc_core.calibration._qparams import affine

log = logging.getLogger("inc")

# TensorRT's entropy calibration starts its threshold search at 128 |x| bins: the positive half
# of the int8 grid. A one-sided (non-negative) asymmetric range has all 256 levels on one side.
SYM_SIDE_LEVELS = 128
ASYM_LEVELS = 256
# The fewest levels a side of a signed asymmetric range is searched with; fewer would make
# nearly every threshold look equally bad.
MIN_SIDE_LEVELS = 16
# KL smoothing as in MXNet/ONNX Runtime calibration: a bin where P has mass and the quantized Q has
# none would make KL(P||Q) infinite; it gets this small count instead.
KL_EPS = 1e-4
# KL(P || Q) measures the shape of the kept values only, not the error of the clipped ones: for data far
# from zero, a threshold below nearly all of it folds everything into one bin and scores a divergence of
# zero. Thresholds that would clip more than this share of the values are therefore not candidates
# (heavy-tailed activations have their best threshold far inside it).
KL_MAX_CLIPPED = 0.01
# MSE: a coarse pass over this many candidates, then every bin around the best one.
COARSE_CANDIDATES = 128


@dataclass(frozen=True)
class HistData:
    """A snapshot of a histogram observer's state that the searches read."""

    counts: npt.NDArray[np.int64]
    start: int
    width: float
    min: float
    max: float

    def positive(self) -> npt.NDArray[np.float64]:
        """Counts of the bins at and above zero; index ``k`` covers ``[k*w, (k+1)*w)``."""
        return self.counts[-self.start :].astype(np.float64)

    def negative(self) -> npt.NDArray[np.float64]:
        """Counts of the bins below zero as a histogram of ``|x|``; index ``k`` covers ``(k*w, (k+1)*w]``."""
        return self.counts[: -self.start][::-1].astype(np.float64)

    def folded(self) -> npt.NDArray[np.float64]:
        """Histogram of ``|x|``, both sides added bin by bin."""
        pos, neg = self.positive(), self.negative()
        out = np.zeros(max(pos.size, neg.size))
        out[: pos.size] += pos
        out[: neg.size] += neg
        return out


def percentile_range(h: HistData, percentile: float) -> tuple[float, float]:
    """``(lo, hi)`` at the given percentile: both tails for signed data, the top one for non-negative data."""
    if percentile >= 100.0:
        return h.min, h.max
    counts = h.counts.astype(np.float64)
    cum = np.cumsum(counts)
    total = float(cum[-1])

    def value_at(rank: float) -> float:
        # The first bin whose cumulative count reaches the rank, interpolated linearly inside it.
        j = min(int(np.searchsorted(cum, rank, side="left")), counts.size - 1)
        before = cum[j] - counts[j]
        frac = (rank - before) / counts[j] if counts[j] > 0 else 0.0
        return float(np.clip((h.start + j + frac) * h.width, h.min, h.max))

    hi = value_at(total * percentile / 100.0)
    lo = value_at(total * (1.0 - percentile / 100.0)) if h.min < 0 else h.min
    return min(lo, hi), hi


def kl_threshold_bins(counts: npt.NDArray[np.float64], levels: int) -> int:
    """TensorRT's entropy search on a one-sided histogram; returns how many bins the threshold keeps.

    For each candidate ``i`` (from ``levels`` bins up to the last non-empty bin), the reference
    distribution P is the first ``i`` bins with every count beyond folded into bin ``i - 1``; the
    candidate Q quantizes the first ``i`` bins into ``levels`` groups and spreads each group's mass
    back over its non-empty bins. The threshold minimizing KL(P || Q) wins. Thresholds that would clip
    more than ``KL_MAX_CLIPPED`` of the values are skipped.
    """
    nonzero = np.flatnonzero(counts)
    if nonzero.size == 0:
        return 0
    n = int(nonzero[-1]) + 1
    if n <= levels:
        return n  # every bin already gets its own level: clipping cannot help
    counts = counts[:n]
    tail = np.concatenate([np.cumsum(counts[::-1])[::-1], [0.0]])  # tail[i] = sum(counts[i:])
    first = max(levels, int(np.argmax(tail <= KL_MAX_CLIPPED * tail[0])))
    best_i, best_kl = n, np.inf
    for i in range(first, n + 1):
        sliced = counts[:i]
        p = sliced.copy()
        p[-1] += tail[i]
        is_nz = p > 0
        merged = i // levels
        starts = np.arange(levels) * merged
        lengths = np.diff(np.append(starts, i))  # the last group takes the remainder
        group_sum = np.add.reduceat(sliced, starts)
        group_nz = np.add.reduceat(is_nz.astype(np.float64), starts)
        per_bin = np.divide(group_sum, group_nz, out=np.zeros(levels), where=group_nz > 0)
        q = np.repeat(per_bin, lengths) * is_nz
        q[is_nz & (q == 0)] = KL_EPS
        p_n = p[is_nz] / p.sum()
        q_n = q[is_nz] / q.sum()
        kl = float(np.sum(p_n * np.log(p_n / q_n)))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return best_i


def kl_range(h: HistData, scheme: str) -> tuple[float, float]:
    """Entropy-calibrated ``(lo, hi)``.

    Non-negative data: one-sided search with all the levels the range gets (128 for ``sym``, 256 for
    ``asym``). Signed ``sym``: TensorRT's search on the histogram of ``|x|``. Signed ``asym``: each side
    searched on its own, with the share of the 255 steps its extent would get.
    """
    w = h.width
    if h.min >= 0:
        levels = SYM_SIDE_LEVELS if scheme == "sym" else ASYM_LEVELS
        hi = min(kl_threshold_bins(h.positive(), levels) * w, h.max)
        return min(h.min, hi), hi
    if scheme == "sym":
        t = kl_threshold_bins(h.folded(), SYM_SIDE_LEVELS) * w
        return max(h.min, -t), min(h.max, t)
    pos_share = max(h.max, 0.0) / (max(h.max, 0.0) - h.min)
    pos_levels = max(MIN_SIDE_LEVELS, round(ASYM_LEVELS * pos_share))
    neg_levels = max(MIN_SIDE_LEVELS, ASYM_LEVELS - round(ASYM_LEVELS * pos_share))
    hi = min(kl_threshold_bins(h.positive(), pos_levels) * w, max(h.max, 0.0))
    lo = max(-kl_threshold_bins(h.negative(), neg_levels) * w, h.min)
    return lo, hi


def _g(u: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """``G(u) = integral from 0 to u of (t - round(t))^2 dt``; each whole step adds 1/12."""
    whole = np.floor(u)
    f = u - whole
    part = np.where(f <= 0.5, f**3 / 3.0, 1.0 / 12.0 + (f - 1.0) ** 3 / 3.0)
    return whole / 12.0 + part


def expected_errors(
    a: npt.NDArray[np.float64],
    b: npt.NDArray[np.float64],
    c: npt.NDArray[np.float64],
    lo_q: npt.NDArray[np.float64],
    hi_q: npt.NDArray[np.float64],
    step: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """Total squared error of fake quantization, per candidate grid, for data uniform inside each bin.

    ``a``/``b``/``c`` are the bins' edges and counts (shape ``(B,)``); ``lo_q``/``hi_q``/``step`` are
    each candidate's smallest and largest representable value and scale (shape ``(K, 1)``). Values below
    ``lo_q`` or above ``hi_q`` clip to them; values between round to the nearest grid point.
    """
    below = np.where(a < lo_q, ((np.minimum(b, lo_q) - lo_q) ** 3 - (a - lo_q) ** 3) / 3.0, 0.0)
    above = np.where(b > hi_q, ((b - hi_q) ** 3 - (np.maximum(a, hi_q) - hi_q) ** 3) / 3.0, 0.0)
    m0 = np.clip(a, lo_q, hi_q)
    m1 = np.clip(b, lo_q, hi_q)
    inside = step**3 * (_g((m1 - lo_q) / step) - _g((m0 - lo_q) / step))
    width = b - a
    spread = (below + above + inside) / np.where(width > 0, width, 1.0)
    # A bin narrowed to one point (a single distinct value) is a point mass: its error is exact.
    u = (a - lo_q) / step
    point = np.where(a < lo_q, (a - lo_q) ** 2, np.where(a > hi_q, (a - hi_q) ** 2, (step * (u - np.rint(u))) ** 2))
    per_bin = np.where(width > 0, spread, point)
    return np.asarray((per_bin * c).sum(axis=-1), dtype=np.float64)


def _argmin_1d(errors_of: Callable[[npt.NDArray[np.int64]], npt.NDArray[np.float64]], n: int) -> int:
    """The ``k`` in ``1..n`` with the smallest error: a coarse pass, then every ``k`` around the best."""
    if n <= 2 * COARSE_CANDIDATES:
        ks = np.arange(1, n + 1)
        return int(ks[np.argmin(errors_of(ks))])
    coarse = np.unique(np.rint(np.linspace(1, n, COARSE_CANDIDATES)).astype(np.int64))
    best = int(np.argmin(errors_of(coarse)))
    left = int(coarse[max(best - 1, 0)])
    right = int(coarse[min(best + 1, coarse.size - 1)])
    fine = np.arange(left, right + 1)
    return int(fine[np.argmin(errors_of(fine))])


def mse_range(h: HistData, dtype: str, scheme: str) -> tuple[float, float]:
    """``(lo, hi)`` minimizing the expected fake-quantization error (rounding plus clipping).

    Candidates are bin edges. ``sym`` searches one threshold ``t`` for ``[-t, t]``; ``asym`` searches
    ``hi`` with ``lo`` at the data minimum, then ``lo`` with that ``hi``, then ``hi`` again.
    """
    w = h.width
    idx = np.flatnonzero(h.counts)
    edges = (h.start + idx).astype(np.float64) * w
    # Bins narrowed to the exact data extent, so the outermost bins do not spread past min/max.
    a = np.clip(edges, h.min, h.max)
    b = np.clip(edges + w, h.min, h.max)
    c = h.counts[idx].astype(np.float64)

    def errors(lo: npt.NDArray[np.float64], hi: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        scale, zp = affine(lo, hi, dtype, scheme)
        qmin, qmax = QRANGES[dtype]
        s = scale.astype(np.float64)[:, None]
        z = zp.astype(np.float64)[:, None]
        return expected_errors(a, b, c, (qmin - z) * s, (qmax - z) * s, s)

    def edge(k: npt.NDArray[np.int64], limit: float) -> npt.NDArray[np.float64]:
        return np.minimum(k.astype(np.float64) * w, limit)

    lo_max, hi_max = max(-h.min, 0.0), max(h.max, 0.0)
    if scheme == "sym":
        amax = max(lo_max, hi_max)
        n = int(np.ceil(amax / w))
        k = _argmin_1d(lambda ks: errors(-edge(ks, amax), edge(ks, amax)), n)
        t = float(edge(np.array([k]), amax)[0])
        return max(h.min, -t), min(h.max, t)
    lo, hi = -lo_max, hi_max
    n_hi, n_lo = int(np.ceil(hi_max / w)), int(np.ceil(lo_max / w))

    def best_hi(fixed_lo: float) -> float:
        k = _argmin_1d(lambda ks: errors(np.full(ks.size, fixed_lo), edge(ks, hi_max)), n_hi)
        return float(edge(np.array([k]), hi_max)[0])

    def best_lo(fixed_hi: float) -> float:
        k = _argmin_1d(lambda ks: errors(-edge(ks, lo_max), np.full(ks.size, fixed_hi)), n_lo)
        return -float(edge(np.array([k]), lo_max)[0])

    # Coordinate descent: the best hi for the full negative side, then the best lo for it, then hi again.
    if n_hi > 0:
        hi = best_hi(lo)
    if n_lo > 0:
        lo = best_lo(hi)
        if n_hi > 0:
            hi = best_hi(lo)
    log.debug("mse range search: data [%g, %g] -> [%g, %g]", h.min, h.max, lo, hi)
    return min(max(h.min, lo), hi), hi
