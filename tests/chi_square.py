"""A chi-square goodness-of-fit helper shared by the losslessness tests."""

import numpy as np
from scipy import stats


def goodness_of_fit(observed, expected_probs, min_expected=5.0):
    """Counts [C], probabilities [C] -> p-value of "observed ~ Multinomial(expected_probs)".

    Cells with zero probability must be empty (a hit there is a certain mismatch: p = 0). Cells
    expecting fewer than `min_expected` hits are pooled into one so the chi-square law holds.
    """
    observed = np.asarray(observed, np.float64).ravel()
    probs = np.asarray(expected_probs, np.float64).ravel()
    probs = probs / probs.sum()
    if observed[probs <= 0].sum() > 0:
        return 0.0
    expected = probs * observed.sum()
    big = expected >= min_expected
    obs = np.append(observed[big], observed[~big & (probs > 0)].sum())
    exp = np.append(expected[big], expected[~big & (probs > 0)].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(stats.chisquare(obs, exp).pvalue)
