"""Choosing one box per anchor: the region network's learning, and the ablation baselines.

Why an estimator at all: the editor is not differentiable in the box (a box becomes a binary mask,
the editor returns pixels), so ``loss.backward()`` can never reach the network through the edit.
The reference implementation calls ``loss.requires_grad_(True)`` and its network never changes.
Here the network defines a policy ``p(k | anchor) = softmax(logits / tau)`` over each anchor's K
proposals and is trained on the expected loss ``E_p[L]``, whose gradient needs only loss *values*:

``estimator="memo-expectation"`` (the ``reference`` preset's): every edit is memoised (a box is never edited twice
per image), so the losses of all boxes tried so far are known exactly. The surrogate
``sum_a sum_{k tried} p(k|a) * (L_ak - b_a)``, with ``b_a`` the mean loss of anchor ``a``'s tried
boxes, is differentiated exactly. Once all K boxes of an anchor are tried its gradient *is*
``grad E_p[L]`` (the baseline term vanishes because the p's sum to 1); before that it moves
probability away from tried boxes worse than their siblings (towards better ones and untried
ones, which keeps exploring). It is the Rao-Blackwellised score-function estimator over the memo:
no sampling noise in the gradient, and it costs no extra edits. Sampling is only used to decide
which box to try next.

``estimator="reinforce"``: the textbook score-function gradient with the same per-anchor
baseline, ``(L_ak - b_a) * grad log p(k|a)`` for the sampled ``k``. Kept for comparison.

Advantages are divided by the standard deviation of all known losses, so the learning rate means
the same thing whatever the scorer's loss scale (CLIP losses differ in the second decimal).

``estimator="regression"``: the network's logits are fitted (squared error) to the standardised
negative losses of every box tried so far, of all anchors at once. The policy is then a softmax
over *predicted* quality, so it carries what the boxes tried around one anchor taught (a thin box
scores badly on a round object, a box reaching past the object spills) to the boxes of the other
anchors and to boxes never tried; ``regression-anchor`` centres logits and targets per anchor
(only the ordering within an anchor is learnt), ``listwise`` matches the policy to a softmax of
the known losses. Which boxes to try and when to stop are settings of their own (the levers that
decide how many edits learning costs; the benchmarks documentation measures each):

- ``rgn_sampling``: ``policy`` samples from the policy (a box already edited costs nothing but
  teaches nothing), ``untried`` samples among boxes not edited yet, so every edit is new.
- ``rgn_steps``: optimiser steps per iteration on the memo (more fitting per edit, no edits).
- ``rgn_settle`` / ``rgn_focus`` / ``rgn_patience`` / ``rgn_warmup``: stop an anchor once its
  policy has settled on tried boxes, once it is clearly worse than the best anchor, or after so
  many tries without improvement.
- ``rgn_final``: each anchor's box after learning: the policy's most probable (``policy``, the
  paper's), the most probable tried one (``tried``), the lowest loss tried (``best``: the memo
  is exact, so a learned loss model can only add its errors), or a blend of the observed and the
  predicted loss (``blend``: for noisy judges).

Thread safety: one photo's learning owns its region network, optimiser, sampler and
:class:`CandidateBank`; several photos may learn at once in different threads. The network's
initial weights are drawn inside :func:`~lregions_core.models.runtime.seeded` (serialised), the
sampling from a ``torch.Generator`` of the call's own, and the editor and scorer it calls say
their own rules.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from lregions_core.config import Config
from lregions_core.images import box_mask, pixel_box
from lregions_core.interfaces import CandidateScores, Editor, EditRequest, Features, Scorer
from lregions_core.models.runtime import seeded
from lregions_core.region_net import RegionNet, box_geometry, pool_proposals
from lregions_core.region_prior import load_prior
from lregions_core.search import search

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Candidate:
    """One edit: which anchor and proposal it came from, its pixels and its scores. ``shape`` is
    "box" (the whole box was edited) or "mask" (only ``mask``, an object mask inside the box)."""

    anchor: int
    proposal: int
    box: Box  # working-image pixels
    image: Image.Image
    scores: CandidateScores
    loss: float
    shape: str = "box"
    mask: Image.Image | None = None  # mode "L", working size, 255 = edited (shape "mask" only)


class CandidateBank:
    """Every edit made for one image, memoised by (mask, seed): a mask is never edited twice (two
    proposals that rasterise to the same pixels, e.g. after clipping at the border, share one
    edit)."""

    def __init__(
        self,
        *,
        editor: Editor,
        scorer: Scorer,
        context: object,
        image: Image.Image,
        prompt: str,
        seed: int,
        loss_weights: tuple[float, float, float],
    ) -> None:
        self.editor = editor
        self.scorer = scorer
        self.context = context
        self.image = image
        self.prompt = prompt
        self.seed = seed
        self.loss_weights = loss_weights
        self._memo: dict[tuple, tuple[Image.Image, CandidateScores]] = {}
        self._masks: dict[tuple, Image.Image] = {}  # object masks edited (fetch_masked)
        self.editor_requests = 0
        self.editor_batches = 0

    def key(self, box: Sequence[float]) -> tuple:
        # rounded first, so float noise in a coordinate never makes a new mask
        return (pixel_box([round(float(v), 3) for v in box], self.image.size), self.seed)

    def known(self, box: Sequence[float]) -> bool:
        return self.key(box) in self._memo

    def fetch(self, wanted: Sequence[tuple[int, int, Sequence[float]]]) -> list[Candidate]:
        """Candidates for ``(anchor, proposal, box)`` triples, editing only unseen boxes (all of
        them in one editor call, so the editor can batch)."""
        self._edit({self.key(box): lambda box=box: box_mask(self.image.size, box)
                    for _, _, box in wanted})
        return [self._candidate(self.key(box), anchor, proposal, box)
                for anchor, proposal, box in wanted]

    def fetch_masked(
        self, wanted: Sequence[tuple[int, int, Sequence[float], Image.Image]]
    ) -> list[Candidate]:
        """Candidates that edit only an object mask inside their box: ``(anchor, proposal, box,
        mask)``, ``mask`` mode "L" at the working size. Memoised by the mask's pixels."""
        keys = [("mask", hashlib.sha256(mask.convert("L").tobytes()).hexdigest(), self.seed)
                for *_, mask in wanted]
        self._edit({key: lambda mask=mask: mask.convert("L")
                    for key, (*_, mask) in zip(keys, wanted)})
        return [self._candidate(key, anchor, proposal, box, mask=self._masks[key])
                for key, (anchor, proposal, box, _) in zip(keys, wanted)]

    def _candidate(self, key: tuple, anchor: int, proposal: int, box: Sequence[float],
                   mask: Image.Image | None = None) -> Candidate:
        img, sc = self._memo[key]
        return Candidate(
            anchor=int(anchor),
            proposal=int(proposal),
            box=tuple(float(v) for v in box),  # type: ignore[arg-type]
            image=img,
            scores=sc,
            loss=float(sc.total(*self.loss_weights)),
            shape="box" if mask is None else "mask",
            mask=mask,
        )

    def _edit(self, jobs: dict[tuple, Callable[[], Image.Image]]) -> None:
        """Edit and score every mask of ``jobs`` (memo key -> its mask, made only when needed)
        not edited yet, in one editor call."""
        missing = {key: make for key, make in jobs.items() if key not in self._memo}
        if not missing:
            return
        masks = {key: make() for key, make in missing.items()}
        requests = [EditRequest(self.image, mask, self.prompt, self.seed) for mask in masks.values()]
        edited = self.editor.edit(requests)
        scores = self.scorer.score(self.context, edited, [self.seed] * len(edited))
        for key, img, sc in zip(masks, edited, scores):
            self._memo[key] = (img, sc)
            if key[0] == "mask":
                self._masks[key] = masks[key]
        self.editor_requests += len(requests)
        self.editor_batches += 1

    def loss_of(self, box: Sequence[float]) -> float | None:
        hit = self._memo.get(self.key(box))
        return None if hit is None else float(hit[1].total(*self.loss_weights))

    def loss_table(self, boxes: np.ndarray) -> np.ndarray:
        """(N, K) losses of the boxes already edited, NaN for the others."""
        n, k, _ = boxes.shape
        out = np.full((n, k), np.nan)
        for a in range(n):
            for j in range(k):
                value = self.loss_of(boxes[a, j])
                if value is not None:
                    out[a, j] = value
        return out

    @property
    def denoise_steps(self) -> int:
        return self.editor_requests * int(self.editor.steps_per_call)


@dataclass
class RegionOutcome:
    """What region choice produced for one image."""

    chosen: np.ndarray  # (N,) proposal index per anchor
    candidates: list[Candidate]  # the chosen box's edit, one per anchor
    probs: np.ndarray | None = None  # (N, K) final box distribution (learning modes)
    initial_probs: np.ndarray | None = None
    param_change: float = 0.0  # L2 norm of the region network's parameter change
    trace: list[dict] = field(default_factory=list)  # per iteration: losses and expected loss


def choose_regions(
    config: Config,
    features: Features,
    boxes: np.ndarray,
    size: tuple[int, int],
    bank: CandidateBank,
    seed: int,
) -> RegionOutcome:
    """One box per anchor by ``config.mode``: ``rgn`` learns it; ``exhaustive`` edits every
    proposal and keeps each anchor's lowest loss (the upper bound); ``random`` and
    ``dino-random`` pick a size at random (the anchors differ: see :mod:`lregions_core.pipeline`)."""
    n, k, _ = boxes.shape
    if config.mode == "rgn" and config.estimator == "bayes":
        prior = None
        if config.region_prior:
            prior = load_prior(config.region_prior)
            prior.check(config)
        chosen, trace = search(config, features, boxes, size, bank, seed, prior)
        candidates = bank.fetch([(a, int(chosen[a]), boxes[a, chosen[a]]) for a in range(n)])
        return RegionOutcome(chosen=chosen, candidates=candidates, trace=trace)
    if config.mode == "rgn":
        return _learn(config, features, boxes, size, bank, seed)
    if config.mode == "exhaustive":
        every = bank.fetch([(a, j, boxes[a, j]) for a in range(n) for j in range(k)])
        losses = np.array([c.loss for c in every]).reshape(n, k)
        chosen = losses.argmin(axis=1)
    elif config.mode in ("random", "dino-random"):
        chosen = np.random.default_rng([seed, 1]).integers(0, k, size=n)
    else:  # Config validates modes; this guards direct construction
        raise ValueError(f"unknown mode {config.mode!r}")
    candidates = bank.fetch([(a, int(chosen[a]), boxes[a, chosen[a]]) for a in range(n)])
    return RegionOutcome(chosen=np.asarray(chosen), candidates=candidates)


def _per_anchor_mean(values: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """(N, 1) mean of each anchor's ``values`` over its known (tried) boxes; 0 where none."""
    count = known.sum(dim=1, keepdim=True).clamp_min(1)
    return torch.where(known, values, 0.0).sum(dim=1, keepdim=True) / count


def _spread(losses: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Standard deviation of all known losses (the scale advantages are divided by)."""
    return losses[known].std(unbiased=False) if known.sum() > 1 else torch.tensor(0.0)


def _surrogate(
    estimator: str, logits: torch.Tensor, tau: float, losses: torch.Tensor, sampled: torch.Tensor
) -> torch.Tensor:
    """A scalar to minimise (see the module docstring): for the score-function estimators its
    gradient estimates ``grad sum_a E_p[L_a]``; for ``regression`` it is the squared error of
    the logits against the standardised negative losses of the boxes tried so far."""
    known = ~torch.isnan(losses)
    filled = torch.where(known, losses, torch.zeros_like(losses))
    spread = _spread(losses, known).clamp_min(1e-8)
    baseline = _per_anchor_mean(losses, known)
    if estimator == "regression":
        target = -(filled - losses[known].mean()) / spread
        return torch.where(known, (logits - target) ** 2, 0.0).sum() / known.sum().clamp_min(1)
    if estimator == "regression-anchor":
        target = -(filled - baseline) / spread
        centred = logits - _per_anchor_mean(logits, known)
        return torch.where(known, (centred - target) ** 2, 0.0).sum() / known.sum().clamp_min(1)
    if estimator == "listwise":
        scaled = torch.where(known, -filled / (spread * tau), -torch.inf)
        target = torch.softmax(scaled, dim=1)
        model = torch.log_softmax(torch.where(known, logits / tau, -torch.inf), dim=1)
        rows = known.sum(1) > 1
        per_anchor = -(torch.where(known, target * model, 0.0)).sum(1)
        return per_anchor[rows].sum() / rows.sum().clamp_min(1)
    advantage = torch.where(known, filled - baseline, torch.zeros_like(filled)) / spread
    probs = torch.softmax(logits / tau, dim=1)
    if estimator == "memo-expectation":
        return (probs * advantage).sum(dim=1).mean()
    if estimator == "reinforce":
        rows = torch.arange(probs.shape[0])
        picked = advantage[rows, sampled]
        return (picked * torch.log(probs[rows, sampled].clamp_min(1e-12))).mean()
    raise ValueError(f"unknown estimator {estimator!r}")


def _learn(
    config: Config,
    features: Features,
    boxes: np.ndarray,
    size: tuple[int, int],
    bank: CandidateBank,
    seed: int,
) -> RegionOutcome:
    n = boxes.shape[0]
    pooled = pool_proposals(features.patches, boxes, size, config.roi_size, config.rgn_context)
    geometry = box_geometry(boxes, size)
    with seeded(seed):  # deterministic init without touching the global RNG
        net = RegionNet(pooled.shape[2], config.roi_size, config.rgn_hidden)
    start = [p.detach().clone() for p in net.parameters()]
    optimiser = torch.optim.Adam(net.parameters(), lr=config.lr, foreach=True)
    sampler = torch.Generator().manual_seed(seed)
    trace: list[dict] = []

    def policy() -> torch.Tensor:
        with torch.no_grad():
            return torch.softmax(net(pooled, geometry) / config.tau, dim=1)

    def loss_table() -> torch.Tensor:
        return torch.as_tensor(bank.loss_table(boxes), dtype=torch.float32)

    probs = policy()  # the policy after the latest fit (here: at initialisation)
    initial = probs.numpy()
    losses = loss_table()  # the memo's losses, NaN for boxes not edited yet
    active = np.ones(n, dtype=bool)  # anchors still trying new boxes
    best_loss = np.full(n, np.inf)  # each anchor's best loss so far
    stale = np.zeros(n, dtype=int)  # each anchor's tries since its best loss last improved

    for step in range(config.iterations):
        weights = probs
        if config.rgn_sampling == "untried":
            # Only boxes not edited yet: every edit this iteration is new information.
            weights = torch.where(~torch.isnan(losses), torch.zeros_like(weights), weights)
            active &= (weights.sum(dim=1) > 0).numpy()
        if not active.any():
            break
        weights = torch.where(torch.as_tensor(active)[:, None], weights, torch.ones_like(weights))
        sampled = torch.multinomial(weights, 1, generator=sampler).squeeze(1)
        tried = bank.fetch(
            [(a, int(sampled[a]), boxes[a, sampled[a]]) for a in range(n) if active[a]]
        )
        losses = loss_table()
        known = ~torch.isnan(losses)
        for _ in range(config.rgn_steps):  # refit the memo: costs no edits
            surrogate = _surrogate(
                config.estimator, net(pooled, geometry), config.tau, losses, sampled
            )
            optimiser.zero_grad()
            surrogate.backward()
            optimiser.step()
        probs = policy()
        best = torch.where(known, losses, torch.inf).min(dim=1).values.numpy()  # inf: none
        stale = np.where(active, np.where(best < best_loss, 0, stale + 1), stale)
        best_loss = best
        if step + 1 >= config.rgn_warmup:
            active &= _still_exploring(config, probs, losses, best)
            if config.rgn_patience > 0:
                active &= stale < config.rgn_patience
        trace.append(
            {
                "iteration": step,
                "sampled_loss": float(np.mean([c.loss for c in tried])),
                "boxes_tried": int(known.sum()),
                "active_anchors": int(active.sum()),
                # expected loss under the policy, over anchors' tried boxes (renormalised)
                "expected_loss": float(
                    (
                        (probs * torch.where(known, losses, 0.0)).sum(1)
                        / (probs * known).sum(1).clamp_min(1e-12)
                    ).mean()
                ),
            }
        )
        if not active.any():
            break

    final = probs
    choice = final
    known = ~torch.isnan(losses)
    if config.rgn_final == "tried":
        # Each anchor's most probable box among those edited: no edit after learning.
        choice = torch.where(known, final, torch.full_like(final, -1.0))
    elif config.rgn_final in ("blend", "best"):
        observed = losses
        if config.rgn_final == "blend":  # average with the network's prediction of the loss
            with torch.no_grad():
                logits = net(pooled, geometry)
            spread = _spread(losses, known).clamp_min(1e-8)
            predicted = _per_anchor_mean(losses, known) - spread * (
                logits - _per_anchor_mean(logits, known))
            observed = (losses + predicted) / 2
        choice = torch.where(known, -observed, torch.full_like(final, -torch.inf))
        choice = torch.where(known.any(dim=1, keepdim=True), choice, final)
    chosen = choice.argmax(dim=1).numpy()
    change = float(
        torch.sqrt(sum(((p.detach() - s) ** 2).sum() for p, s in zip(net.parameters(), start)))
    )
    candidates = bank.fetch([(a, int(chosen[a]), boxes[a, chosen[a]]) for a in range(n)])
    return RegionOutcome(
        chosen=chosen,
        candidates=candidates,
        probs=final.numpy(),
        initial_probs=initial,
        param_change=change,
        trace=trace,
    )


def _still_exploring(
    config: Config, probs: torch.Tensor, losses: torch.Tensor, best: np.ndarray
) -> np.ndarray:
    """(N,) which anchors keep trying boxes after this iteration.

    ``rgn_settle``: an anchor has settled once its policy puts at least this probability on
    boxes already edited (more samples would mostly re-pick them). ``rgn_focus``: only one
    anchor's edit is kept in the end, so an anchor whose best loss so far is worse than the best
    anchor's by more than ``rgn_focus`` standard deviations of all known losses stops early
    (``best``: each anchor's lowest known loss, inf for none).
    """
    known = ~torch.isnan(losses)
    keep = np.ones(losses.shape[0], dtype=bool)
    if config.rgn_settle > 0:
        keep &= ((probs * known).sum(dim=1) < config.rgn_settle).numpy()
    if config.rgn_focus is not None and known.sum() > 1:
        spread = float(_spread(losses, known))
        keep &= best <= best.min() + config.rgn_focus * spread
    return keep
