"""Concept coverage (the paper's appendix B) and the small statistics it needs.

Question: are samples of "A photo of *" as close to the training set as the training images are to each
other? Procedure, as implemented here (the paper's text was not available to check every detail; the
choices below are ours where it is silent and are recorded in every report):

1. sample N images of the prompt (N = 256 in the paper) and encode them and the training images with CLIP,
   L2-normalising the features;
2. each sample's distance to the training set = its mean Euclidean distance to the training images'
   normalised features (sqrt(2 - 2 cos)); each training image's distance = its mean distance to the
   *other* training images (leave-one-out);
3. for each cherry-picking factor f in (1, 1/2, 1/4, 1/6, 1/8) keep the round(f * N) samples closest to
   the training set (at least 2), and compare their distances with the training images' by a two-sided
   Welch t-test; p > 0.05 means the kept samples cannot be told apart from the training set at that
   level of cherry-picking.

The Student t distribution is computed here (regularised incomplete beta function by its continued
fraction, DLMF 8.17.22), so no SciPy is needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

CHERRY_PICK_FACTORS = (1.0, 1 / 2, 1 / 4, 1 / 6, 1 / 8)
FACTOR_LABELS = {1.0: "1", 1 / 2: "1/2", 1 / 4: "1/4", 1 / 6: "1/6", 1 / 8: "1/8"}
ALPHA = 0.05

# ---------------------------------------------------------------------------------------------------
# Student t distribution
# ---------------------------------------------------------------------------------------------------


def _beta_continued_fraction(a: float, b: float, x: float, max_iter: int = 1000, eps: float = 1e-15) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz); converges fast for x < (a + 1) / (a + b + 2)."""
    tiny = 1e-300
    c = 1.0
    d = 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, max_iter + 1):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            step = c * d
            result *= step
        if abs(step - 1.0) < eps:
            return result
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) = B(x; a, b) / B(a, b) for a, b > 0 and x in [0, 1]."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom: I_{df / (df + t^2)}(df / 2, 1 / 2)."""
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    return regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(q: float, df: float) -> float:
    """The q-quantile of Student's t (0.5 <= q < 1), by bisection on the two-sided p."""
    if not 0.5 <= q < 1.0:
        raise ValueError(f"q must be in [0.5, 1), got {q}")
    target = 2.0 * (1.0 - q)  # two-sided tail mass beyond the quantile
    low, high = 0.0, 1.0
    while t_two_sided_p(high, df) > target:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if t_two_sided_p(mid, df) > target:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


# ---------------------------------------------------------------------------------------------------
# Tests and intervals
# ---------------------------------------------------------------------------------------------------


@dataclass
class TTest:
    t: float
    df: float
    p_value: float


def _mean_var(values: Sequence[float]) -> tuple[int, float, float]:
    n = len(values)
    mean = math.fsum(values) / n
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else math.nan
    return n, mean, var


def welch_t_test(a: Sequence[float], b: Sequence[float], equal_var: bool = False) -> TTest:
    """Two-sided two-sample t-test of equal means; Welch's (unequal variances) unless `equal_var`."""
    a, b = [float(v) for v in a], [float(v) for v in b]
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"a t-test needs at least 2 values per group, got {len(a)} and {len(b)}")
    na, ma, va = _mean_var(a)
    nb, mb, vb = _mean_var(b)
    if equal_var:
        df = na + nb - 2.0
        pooled = ((na - 1) * va + (nb - 1) * vb) / df
        se2 = pooled * (1.0 / na + 1.0 / nb)
    else:
        se2 = va / na + vb / nb
        df = se2**2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1)) if se2 > 0 else na + nb - 2.0
    if se2 > 0.0:
        return TTest((ma - mb) / math.sqrt(se2), df, t_two_sided_p((ma - mb) / math.sqrt(se2), df))
    t = 0.0 if ma == mb else math.copysign(math.inf, ma - mb)  # both groups constant
    return TTest(t, df, t_two_sided_p(t, df))


def mean_confidence_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean; a single value gives (v, v, v)."""
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan, math.nan
    n, mean, var = _mean_var(values)
    if n < 2:
        return mean, mean, mean
    half = t_quantile(0.5 + level / 2.0, n - 1) * math.sqrt(var / n)
    return mean, mean - half, mean + half


# ---------------------------------------------------------------------------------------------------
# Coverage
# ---------------------------------------------------------------------------------------------------


def mean_distances(query: torch.Tensor, reference: torch.Tensor, leave_one_out: bool = False) -> torch.Tensor:
    """[Q] mean Euclidean distance of each normalised query row to the reference rows.

    `leave_one_out` (query is reference): skip each row's distance to itself.
    """
    query, reference = query.double(), reference.double()
    dist = torch.cdist(query, reference)
    if not leave_one_out:
        return dist.mean(dim=1)
    if query.shape[0] != reference.shape[0] or query.shape[0] < 2:
        raise ValueError("leave-one-out distances need the same set (of at least 2 rows) on both sides")
    dist.fill_diagonal_(0.0)
    return dist.sum(dim=1) / (dist.shape[1] - 1)


@dataclass
class CoverageRow:
    factor: str
    kept: int
    sample_distance: float  # mean over the kept samples of their mean distance to the training images
    train_distance: float  # mean leave-one-out distance between training images
    t: float
    df: float
    p_value: float
    indistinguishable: bool  # p > alpha


def kept_count(factor: float, n: int) -> int:
    """Samples kept at cherry-picking `factor`: round(factor * n), at least 2 (the t-test needs 2)."""
    return min(n, max(2, int(round(factor * n))))


def coverage_test(
    sample_features: torch.Tensor,
    train_features: torch.Tensor,
    factors: Sequence[float] = CHERRY_PICK_FACTORS,
    alpha: float = ALPHA,
) -> list[CoverageRow]:
    """The appendix-B test on L2-normalised features [N, d] (samples) and [M, d] (training images)."""
    sample_dist = mean_distances(sample_features, train_features)
    train_dist = mean_distances(train_features, train_features, leave_one_out=True).tolist()
    ordered = torch.sort(sample_dist).values.tolist()
    rows = []
    for factor in factors:
        kept = ordered[: kept_count(factor, len(ordered))]
        test = welch_t_test(kept, train_dist)
        rows.append(
            CoverageRow(
                FACTOR_LABELS.get(factor, f"{factor:g}"),
                len(kept),
                math.fsum(kept) / len(kept),
                math.fsum(train_dist) / len(train_dist),
                test.t,
                test.df,
                test.p_value,
                test.p_value > alpha,
            )
        )
    return rows


def evaluate_coverage(
    evaluator,
    model,
    train_images,
    prompt: str = "A photo of *",
    n_samples: int = 256,
    n_steps: int = 50,
    scale: float = 5.0,
    batch_size: int = 8,
    generator: torch.Generator | None = None,
    factors: Sequence[float] = CHERRY_PICK_FACTORS,
    alpha: float = ALPHA,
    progress: bool = True,
) -> tuple[list[CoverageRow], torch.Tensor]:
    """Sample `prompt` with an `LDMCLIPEvaluator` and run `coverage_test`; returns (rows, samples)."""
    samples = evaluator.generate(
        model, prompt, n_samples, n_steps, scale, batch_size, generator=generator, progress=progress
    )
    rows = coverage_test(
        evaluator.get_image_features(samples), evaluator.get_image_features(train_images), factors, alpha
    )
    return rows, samples


def coverage_table(rows: Sequence[CoverageRow]) -> list[dict]:
    return [asdict(r) for r in rows]
