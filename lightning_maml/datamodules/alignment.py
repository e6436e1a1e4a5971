"""Euclidean alignment of EEG trials across subjects (He & Wu 2019).

Each subject's trials ``X_i`` (channels x samples) are whitened by the inverse square root of
their mean spatial covariance ``R = mean_i X_i X_i^T / T``: ``X_i -> R^{-1/2} X_i``. After it,
every subject's mean covariance is the identity, which removes much of what differs between
subjects (head shape, electrode impedances) before a network sees the trials. ``R`` must come from
trials the method may look at: a training subject's own trials, and for a new subject its
labelled calibration (support) trials, never the trials it is scored on, unless asked for the
transductive variant (all of a subject's unlabelled trials).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

from lightning_maml._checks import nonfinite_rows
from lightning_maml.episode import Episode

#: an eigenvalue of the mean covariance below this fraction of their mean marks the estimate
#: rank-deficient (fewer samples than channels, a flat channel): real EEG stays above 1e-4
RANK_DEFICIENT = 1e-6
#: the smallest eigenvalue, as a fraction of their mean, that a rank-deficient estimate is shrunk
#: to: no direction is amplified more than about 1 / sqrt(0.01) = 10 times the average scale
SHRINK_FLOOR = 1e-2


def _trials(trials: Tensor | np.ndarray, name: str = "trials") -> Tensor:
    x = torch.as_tensor(trials)
    if not (x.is_floating_point() or x.is_complex()):  # integer counts: as floats, not zeros
        x = x.to(torch.get_default_dtype())
    if x.dim() < 3 or len(x) == 0:
        raise ValueError(
            f"`{name}` must be [trials, channels, samples] with at least one trial, got shape "
            f"{tuple(x.shape)}"
        )
    bad = nonfinite_rows(x)
    if bad:
        raise ValueError(f"`{name}` holds NaN or inf in trials {bad} (of {len(x)})")
    return x


def alignment_matrix(trials: Tensor | np.ndarray) -> Tensor:
    """``R^{-1/2}`` of ``trials`` (``[n, channels, samples]``, a tensor or a NumPy array), ``R``
    their mean spatial covariance, computed in float64 by an eigendecomposition.

    Where ``R`` is rank-deficient (an eigenvalue below :data:`RANK_DEFICIENT` of their mean:
    fewer samples in all than channels, e.g. one short calibration trial, or a channel flat in
    these trials, e.g. a dead electrode), its inverse square root would amplify the aligned
    trials' signal in those directions thousands of times; it is then shrunk towards the scaled
    identity, ``(1 - a) R + a tr(R)/C I`` with the smallest ``a`` that lifts every eigenvalue to
    :data:`SHRINK_FLOOR` of their mean, with a warning naming why.

    Raises:
        ValueError: on trials of the wrong shape, holding NaN or inf (naming them), or all zero.

    Example::

        >>> x = torch.randn(20, 3, 100, dtype=torch.float64) * torch.tensor([[1.0], [5.0], [0.2]])
        >>> aligned = align(x, alignment_matrix(x))
        >>> torch.allclose((aligned @ aligned.transpose(1, 2) / 100).mean(0), torch.eye(3).double())
        True
    """
    x = _trials(trials).to(torch.float64)
    if x.dim() != 3:
        raise ValueError(
            f"`trials` must be [trials, channels, samples], got shape {tuple(x.shape)}"
        )
    n, channels, samples = x.shape
    covariance = (x @ x.transpose(1, 2)).mean(0) / samples
    mean = covariance.diagonal().mean()
    if not mean > 0:
        raise ValueError(
            f"`trials` ({n} of shape {channels} x {samples}) are all zero: no covariance to "
            "align with"
        )
    values, vectors = torch.linalg.eigh(covariance)
    if values.min() < RANK_DEFICIENT * mean:
        shift = SHRINK_FLOOR * mean - values.min()
        shrink = float(shift / (mean - values.min()))
        values = (1 - shrink) * values + shrink * mean
        flat = (covariance.diagonal() < RANK_DEFICIENT * mean).nonzero().flatten().tolist()
        why = []
        if n * samples < channels:
            why.append(f"{n} trial(s) of {samples} samples for {channels} channels")
        if flat:
            why.append(f"channels {flat} flat in these trials")
        warnings.warn(
            f"the mean covariance of these {n} trials is rank-deficient ("
            + ("; ".join(why) or "linearly dependent channels")
            + f"): shrunk towards the scaled identity by {shrink:.3g}, so that no direction is "
            "amplified more than about 10 times the average; use more or longer calibration "
            "trials, or leave such channels out",
            stacklevel=2,
        )
    return (vectors * values.rsqrt()) @ vectors.T


def align(trials: Tensor | np.ndarray, matrix: Tensor | np.ndarray) -> Tensor:
    """``matrix @ X`` for every trial ``X`` of ``trials`` (``[..., channels, samples]``, a tensor
    or a NumPy array, as :func:`alignment_matrix` takes), in the trials' floating dtype (integer
    trials give the default float dtype)."""
    x = _trials(trials)
    return (torch.as_tensor(matrix).to(x.dtype) @ x).contiguous()


class SupportAlignment:
    """An episode transform: both sets of an episode aligned with the matrix of its support trials
    alone (a new subject's calibration trials), so no query trial informs anything fitted.

    Example::

        >>> sx, qx = torch.randn(4, 3, 50), torch.randn(6, 3, 50)
        >>> y = torch.zeros(4, dtype=torch.long)
        >>> out = SupportAlignment()(Episode(sx, y, qx, y[:2].repeat(3)))
        >>> torch.allclose(out.query_x, align(qx, alignment_matrix(sx)))
        True
    """

    def __call__(self, episode: Episode) -> Episode:
        matrix = alignment_matrix(episode.support_x)
        return episode._replace(
            support_x=align(episode.support_x, matrix), query_x=align(episode.query_x, matrix)
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
