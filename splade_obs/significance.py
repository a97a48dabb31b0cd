"""Is one system better than another on the same queries? A paired test on per-query scores."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from .errors import EvaluationError


def paired_comparison(a: Mapping[str, float], b: Mapping[str, float], *, n_resamples: int = 10_000,
                      seed: int = 0) -> dict[str, float]:
    """Is system ``a`` better than ``b`` on the same queries? Per-query scores (e.g. :func:`~splade_obs.evaluation.ndcg_per_query`)
    in, out: the mean difference ``a - b``, its 95% bootstrap confidence interval (percentile) and the two-sided
    p-value of a paired randomisation test (each query's difference flips sign at random: Fisher's test,
    the one Smucker et al. 2007 recommend for IR), both from ``scipy.stats``."""
    from scipy import stats

    queries = sorted(set(a) & set(b))
    if len(queries) < 2 or set(a) != set(b):
        raise EvaluationError(f"a paired comparison needs the same queries on both sides (>= 2): "
                              f"{len(set(a))} vs {len(set(b))}, {len(queries)} shared")
    diff = np.array([a[q] - b[q] for q in queries])
    if not np.any(diff):
        return {"mean_diff": 0.0, "ci95_low": 0.0, "ci95_high": 0.0, "p_value": 1.0, "queries": len(queries)}
    rng = np.random.default_rng(seed)
    test = stats.permutation_test((diff,), np.mean, permutation_type="samples", n_resamples=n_resamples,
                                  alternative="two-sided", vectorized=True, rng=rng)
    ci = stats.bootstrap((diff,), np.mean, n_resamples=n_resamples, vectorized=True, method="percentile",
                         rng=rng).confidence_interval
    return {"mean_diff": float(diff.mean()), "ci95_low": float(ci.low), "ci95_high": float(ci.high),
            "p_value": float(test.pvalue), "queries": len(queries)}
