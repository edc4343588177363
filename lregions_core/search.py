"""The Bayesian box search (``estimator="bayes"``): few edits, and a judge that is noisy.

The editor is the cost: each edit of a box is one inpainting. CLIP's losses for edits of one photo
differ little and noisily, so a learner that trusts each loss exactly (and stops when one looks
best) keeps a box that was merely lucky. This search treats the losses as what they are, noisy
measurements of an unknown function of the box, and spends edits where they can still change the
choice:

**A loss model with a noise term.** The losses of all N x K proposals of a photo are modelled
jointly as a Gaussian process: a photo offset, an offset per anchor, a mean from the box's prior
ranking (a fitted :class:`~lregions_core.region_prior.RegionPrior`, else the attention
contrast of :func:`~lregions_core.region_prior.objectness`, else nothing), and a residual that is
correlated between boxes as much as they overlap (covariance ``IoU^2``: an edit of one box says
something about the boxes that share most of its pixels, around any anchor). Each observed loss
carries independent noise of standard deviation ``rgn_noise`` (in units of the spread of the
photo's losses). Losses are standardised by the observed ones each round, so the model does not
depend on the scorer's scale.

**Rounds with successive halving over anchors.** Round 0 edits each anchor's best-ranked box (one
editor call with a request per anchor: the prior alone, when the budget ends there). After each
round, an anchor is kept only if the chance that one of its untried boxes beats the best box so
far (by the model's posterior) is at least ``1 - rgn_confidence``; of those, the ``rgn_halving``
share with the best chance continue, each editing the untried box with the lowest
``mean - rgn_kappa * sd`` (``rgn_acquisition="lcb"``) or with the lowest loss in one joint draw
from the posterior (``"thompson"``). The search ends when no anchor can win any more, after
``iterations`` rounds, or at ``rgn_budget`` edits.

**The choice.** Each anchor's box is its tried box with the lowest posterior mean: with a noisy
judge the model's smoothing of a loss by its neighbours' is a better estimate than the loss
itself; with an exact judge (``rgn_noise`` near 0) it is the lowest loss.

Thread safety: one call owns its arrays and ``numpy`` generator (seeded by the photo's seed);
several photos may search at once in different threads. The prior is read-only; the editor and
scorer it calls through the bank say their own rules.
"""

from __future__ import annotations

import math

import numpy as np

from lregions_core.config import Config
from lregions_core.interfaces import Features
from lregions_core.loading import heavy_import
from lregions_core.region_prior import RegionPrior, describe, objectness, prompt_embedding

# The kernel's parts, in units of the observed losses' standard deviation (each round's losses
# are standardised). The anchor offset carries most of the spread (which object an anchor sits
# on); the box residual the rest (how well its box fits). The objectness ranking's weight is its
# measured within-anchor correlation with the losses on calibration items, rounded down.
PHOTO_VARIANCE = 1.0
ANCHOR_VARIANCE = 1.0
BOX_VARIANCE = 0.5
OBJECTNESS_WEIGHT = 0.2


def _pairwise_iou(boxes: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = (boxes[:, i] for i in range(4))
    area = np.maximum(x1 - x0, 0) * np.maximum(y1 - y0, 0)
    w = np.clip(np.minimum(x1[:, None], x1[None]) - np.maximum(x0[:, None], x0[None]), 0, None)
    h = np.clip(np.minimum(y1[:, None], y1[None]) - np.maximum(y0[:, None], y0[None]), 0, None)
    inter = w * h
    return inter / np.maximum(area[:, None] + area[None] - inter, 1e-12)


class LossModel:
    """The Gaussian process over one photo's proposals (see the module docstring)."""

    def __init__(self, boxes: np.ndarray, ranking: np.ndarray, weight: float, noise: float) -> None:
        n, k, _ = boxes.shape
        self.shape = (n, k)
        flat = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        anchor = np.repeat(np.arange(n), k)
        same = (anchor[:, None] == anchor[None]).astype(np.float64)
        weight = float(np.clip(weight, 0.0, 0.95))
        residual = BOX_VARIANCE * (1.0 - weight**2)
        self.prior_mean = weight * np.sqrt(BOX_VARIANCE) * np.asarray(ranking, np.float64).reshape(-1)
        self.cov = PHOTO_VARIANCE + ANCHOR_VARIANCE * same + residual * _pairwise_iou(flat) ** 2
        self.noise = float(noise) ** 2

    def posterior(self, tried: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and covariance of every box's loss, standardised as the tried boxes'
        ``losses`` are, given the losses of the ``tried`` (flat indices) boxes."""
        spread = float(losses.std()) if len(losses) > 1 else 1.0
        spread = spread if spread > 1e-9 else 1.0
        y = (losses - losses.mean()) / spread
        k_oo = self.cov[np.ix_(tried, tried)] + (self.noise + 1e-6) * np.eye(len(tried))
        k_ao = self.cov[:, tried]
        chol = np.linalg.cholesky(k_oo)
        alpha = np.linalg.solve(chol.T, np.linalg.solve(chol, y - self.prior_mean[tried]))
        mean = self.prior_mean + k_ao @ alpha
        v = np.linalg.solve(chol, k_ao.T)
        cov = self.cov - v.T @ v
        return mean, cov


def box_ranking(config: Config, features: Features, boxes: np.ndarray, size: tuple[int, int],
                prior: RegionPrior | None, text: np.ndarray | None = None
                ) -> tuple[np.ndarray, float]:
    """(N, K) predicted loss of every box before any edit (standardised within each anchor) and
    how far to trust it (0..0.95): the region prior's, else ``rgn_init``'s."""
    n, k, _ = boxes.shape
    if prior is None and config.rgn_init == "uniform":
        return np.zeros((n, k)), 0.0
    if prior is not None:
        text = text if prior.meta.get("prompt_dims") else None
        return prior.predict(describe(features, boxes, size, text)), prior.weight
    return objectness(describe(features, boxes, size)), OBJECTNESS_WEIGHT


def search(
    config: Config,
    features: Features,
    boxes: np.ndarray,
    size: tuple[int, int],
    bank,
    seed: int,
    prior: RegionPrior | None = None,
) -> tuple[np.ndarray, list[dict]]:
    """Each anchor's chosen proposal (N,) after the search, and one trace record per round.
    Edits go through ``bank`` (a :class:`~lregions_core.learner.CandidateBank`)."""
    ndtr = heavy_import("scipy.special").ndtr
    n, k, _ = boxes.shape
    ranking, weight = box_ranking(config, features, boxes, size, prior,
                                  prompt_embedding(bank.context))
    model = LossModel(boxes, ranking, weight, config.rgn_noise)
    rng = np.random.default_rng([seed, 7])
    budget = config.rgn_budget or config.iterations * n
    rounds = max(1, config.iterations)
    active = np.ones(n, dtype=bool)
    trace: list[dict] = []

    def observed() -> tuple[np.ndarray, np.ndarray]:
        table = bank.loss_table(boxes).reshape(-1)
        tried = np.flatnonzero(~np.isnan(table))
        return tried, table[tried]

    for step in range(rounds):
        tried, losses = observed()
        done = np.zeros(n * k, dtype=bool)
        done[tried] = True
        if len(tried) == 0:
            score = model.prior_mean.reshape(n, k).copy()
            chance = np.ones(n)
        else:
            mean, cov = model.posterior(tried, losses)
            sd = np.sqrt(np.clip(np.diag(cov), 1e-12, None))
            incumbent = mean[tried].min()
            beat = np.where(done, 0.0, ndtr((incumbent - mean) / sd)).reshape(n, k)  # normal CDF
            chance = beat.max(axis=1)
            if config.rgn_acquisition == "thompson":
                jitter = 1e-9 * np.eye(len(mean))
                draw = rng.multivariate_normal(mean, cov + jitter, method="cholesky")
                score = draw.reshape(n, k)
            else:
                score = (mean - config.rgn_kappa * sd).reshape(n, k)
            if config.rgn_confidence > 0:
                active &= chance >= 1.0 - config.rgn_confidence
            running = np.flatnonzero(active)
            keep = max(1, math.ceil(config.rgn_halving * len(running)))
            if len(running) > keep:
                order = running[np.argsort(-chance[running], kind="stable")]
                active[order[keep:]] = False
        score = np.where(done.reshape(n, k), np.inf, score)
        active &= np.isfinite(score).any(axis=1)
        left = budget - len(tried)
        if not active.any() or left <= 0:
            break
        running = np.flatnonzero(active)
        running = running[np.argsort(-chance[running], kind="stable")][:left]
        wanted = [(int(a), int(np.argmin(score[a])), boxes[a, int(np.argmin(score[a]))])
                  for a in running]
        bank.fetch(wanted)
        trace.append({"iteration": step, "edited": len(wanted), "active_anchors": int(active.sum()),
                      "boxes_tried": int(len(tried) + len(wanted))})

    tried, losses = observed()
    if len(tried) == 0:  # no budget at all: each anchor's best-ranked box
        return model.prior_mean.reshape(n, k).argmin(axis=1), trace
    mean, _ = model.posterior(tried, losses)
    choice = np.full(n * k, np.inf)
    choice[tried] = mean[tried]
    choice = choice.reshape(n, k)
    untouched = ~np.isfinite(choice).any(axis=1)
    chosen = choice.argmin(axis=1)
    chosen[untouched] = model.prior_mean.reshape(n, k)[untouched].argmin(axis=1)
    return chosen, trace
