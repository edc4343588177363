"""A region prior learned across photos: how good a box is likely to be before it is edited.

Every photo's region learning starts from nothing: the region network is untrained and the
first edits around each anchor are spent finding out which box sizes fit. Across a batch the
same lesson is learnt again and again (a box that cuts an object off scores badly, a box that
reaches far past it spills), so a model fitted on many photos' known losses can rank an anchor's
proposals before any edit, and the per-photo search (:mod:`lregions_core.search`) can start from
its ranking.

What a box is described by (:func:`describe`), from the feature extractor's output only:

* its geometry: log width and height relative to the image, log aspect ratio, centre, how much
  of its outline lies on the image border;
* the attention under it and around it: the mean attention inside the box and in the ring
  around it (the box enlarged twice about its centre, minus the box), their difference and log
  ratio, the share of the image's attention inside, the box's share of the image's area, and how
  the box's contrast compares with its anchor's best (boxes are ranked within an anchor);
* the mean (standardised) patch features inside the box and inside its enlarged box;
* the prompt's embedding, where the scorer gives one (CLIP's text embedding), so the prior can
  learn that "a hat" wants other boxes than "a car".

Both rankings below order the boxes *within* each anchor: which anchor sits on what the prompt is
about is for the edits to find out.

Two rankings use these:

* :func:`objectness`: no fitting, the attention contrast alone (a box that holds the attention
  and leaves little around it fits an object). The search's starting point without a prior.
* :class:`RegionPrior`: a small MLP from the description to the box's loss (standardised within
  its photo), fitted by :func:`fit` on calibration runs that edited every proposal
  (``lregions fit-regions``), stored as safetensors (weights) plus JSON (what it was fitted on,
  the input scaling and how well it ranks held-out photos), read from a local path or an fsspec
  URL (:func:`load_prior`, once per process). A prior only applies to the feature extractor it
  was fitted with: loading it for another raises :class:`PriorMismatchError`.

Thread safety: every function here is safe to call concurrently; a loaded :class:`RegionPrior`
is read-only (its forward pass keeps no state) and shared by every thread of a process.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from lregions_core.config import Config
from lregions_core.interfaces import Features
from lregions_core.loading import load_once
from lregions_core.region_net import pool_proposals

PRIOR_FORMAT = 1
WEIGHTS_FILE = "prior.safetensors"
META_FILE = "prior.json"
# The description's leading columns (what :func:`describe` computes from geometry and attention);
# the pooled patch features follow them.
BASE_COLUMNS = (
    "log_width", "log_height", "log_aspect", "centre_x", "centre_y", "on_border",
    "attention_in", "attention_ring", "contrast", "log_contrast", "attention_share", "area_share",
    "contrast_below_anchor_best",
)
# The settings a prior's descriptions depend on: a prior is used only with the same values.
PRIOR_SETTINGS = ("features", "feature_model", "feature_size", "feature_kwargs")
# An anchor teaches the prior when its best box is within this share of the photo's loss range
# of the photo's best box (see :func:`relevant_anchors`).
RELEVANT_MARGIN = 0.1
# Held-out calibration photos it takes to trust a prior's measured correlation in full.
TRUSTED_HELDOUT = 40


class PriorMismatchError(ValueError):
    """A region prior used with settings other than those it was fitted with."""


def _box_sums(integral: np.ndarray, rects: np.ndarray) -> np.ndarray:
    """Sums of the image under integer ``rects`` (M, 4) from its integral image (H+1, W+1)."""
    x0, y0, x1, y1 = (rects[:, i] for i in range(4))
    return integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]


def _rects(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Integer pixel rectangles of float boxes, clipped to the image, at least one pixel."""
    r = np.rint(boxes).astype(np.int64)
    r[:, [0, 2]] = np.clip(r[:, [0, 2]], 0, width)
    r[:, [1, 3]] = np.clip(r[:, [1, 3]], 0, height)
    r[:, 2] = np.maximum(r[:, 2], np.minimum(r[:, 0] + 1, width))
    r[:, 0] = np.minimum(r[:, 0], r[:, 2] - 1)
    r[:, 3] = np.maximum(r[:, 3], np.minimum(r[:, 1] + 1, height))
    r[:, 1] = np.minimum(r[:, 1], r[:, 3] - 1)
    return r


def prompt_embedding(context: object) -> np.ndarray | None:
    """The prompt's embedding from a scorer's shared context, when the scorer has one (CLIP's
    ``text_embedding``), as float32 on the CPU; None otherwise (the oracle scorer)."""
    value = getattr(context, "text_embedding", None)
    if value is None:
        return None
    if hasattr(value, "detach"):
        value = value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32).reshape(-1)


def describe(
    features: Features, boxes: np.ndarray, size: tuple[int, int], text: np.ndarray | None = None
) -> np.ndarray:
    """(N, K, D) description of every proposal ``boxes`` (N, K, 4, working pixels) of a working
    image of ``size`` (see the module docstring for the columns), followed by the prompt's
    embedding ``text`` when there is one (the same for every box)."""
    width, height = size
    n, k, _ = boxes.shape
    flat = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    attention = np.asarray(features.attention, dtype=np.float32)
    attention = attention / max(float(attention.mean()), 1e-12)  # mean 1 over the image
    up = np.asarray(Image.fromarray(attention, "F").resize((width, height), Image.Resampling.BILINEAR),
                    dtype=np.float64)
    integral = np.zeros((height + 1, width + 1))
    integral[1:, 1:] = up.cumsum(0).cumsum(1)
    inner = _rects(flat, width, height)
    centre = (flat[:, :2] + flat[:, 2:]) / 2
    half = (flat[:, 2:] - flat[:, :2]) / 2
    outer = _rects(np.concatenate([centre - 2 * half, centre + 2 * half], axis=1), width, height)
    area_in = ((inner[:, 2] - inner[:, 0]) * (inner[:, 3] - inner[:, 1])).astype(np.float64)
    area_out = ((outer[:, 2] - outer[:, 0]) * (outer[:, 3] - outer[:, 1])).astype(np.float64)
    sum_in, sum_out = _box_sums(integral, inner), _box_sums(integral, outer)
    att_in = sum_in / area_in
    ring_area = area_out - area_in
    att_ring = np.where(ring_area > 0, (sum_out - sum_in) / np.maximum(ring_area, 1), att_in)
    contrast = att_in - att_ring
    w = np.maximum(flat[:, 2] - flat[:, 0], 1e-6)
    h = np.maximum(flat[:, 3] - flat[:, 1], 1e-6)
    border = ((inner[:, 0] == 0).astype(float) * h + (inner[:, 2] == width) * h
              + (inner[:, 1] == 0) * w + (inner[:, 3] == height) * w) / (2 * (w + h))
    anchor_best = contrast.reshape(n, k).max(axis=1, keepdims=True)
    base = np.stack([
        np.log(w / width), np.log(h / height), np.log(w / h),
        centre[:, 0] / width, centre[:, 1] / height, border,
        att_in, att_ring, contrast, np.log((att_in + 1e-3) / (att_ring + 1e-3)),
        sum_in / max(float(integral[-1, -1]), 1e-12), area_in / (width * height),
        (contrast.reshape(n, k) - anchor_best).reshape(-1),
    ], axis=1)
    pooled = pool_proposals(features.patches, np.asarray(boxes, dtype=np.float32), size, 3,
                            context=1.0)  # (N, K, 2C, 3, 3): inside, then the enlarged box
    means = pooled.mean(dim=(3, 4)).reshape(n * k, -1).numpy().astype(np.float64)
    parts = [base, means]
    if text is not None:
        parts.append(np.broadcast_to(np.asarray(text, np.float64).reshape(1, -1), (n * k, text.size)))
    return np.concatenate(parts, axis=1).reshape(n, k, -1).astype(np.float32)


def objectness(description: np.ndarray) -> np.ndarray:
    """(N, K) predicted loss from the attention contrast alone (low = a box that holds the
    attention and leaves little around it), standardised within each anchor."""
    column = BASE_COLUMNS.index("log_contrast")
    return _within_anchor(-description[..., column])


# ------------------------------------------------------------------------------------------------
class _MLP(torch.nn.Module):
    def __init__(self, inputs: int, hidden: int) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(inputs, hidden), torch.nn.ReLU(),
            torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
            torch.nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)


@dataclass(frozen=True)
class RegionPrior:
    """A fitted region prior: predicts each box's loss, standardised within its anchor."""

    net: _MLP
    mean: np.ndarray  # (D,) input scaling
    scale: np.ndarray  # (D,)
    meta: dict  # what it was fitted on (settings, photos, held-out rank correlation, digest)

    @property
    def weight(self) -> float:
        """How far the search trusts the prior: its correlation with the losses of held-out
        calibration photos, within their relevant anchors (0..0.95), shrunk towards 0 when
        fewer than :data:`TRUSTED_HELDOUT` photos measured it (a correlation on a handful of
        photos is mostly chance)."""
        measured = float(self.meta.get("heldout_correlation", 0.0))
        share = min(1.0, float(self.meta.get("heldout_photos", 0)) / TRUSTED_HELDOUT)
        return float(np.clip(measured * share, 0.0, 0.95))

    @property
    def digest(self) -> str:
        return str(self.meta["digest"])

    def check(self, config: Config) -> None:
        """Raise :class:`PriorMismatchError` unless ``config`` describes boxes as the prior's
        calibration run did."""
        fitted = self.meta.get("settings", {})
        wrong = [f"{key}={fitted.get(key)!r} (this run: {getattr(config, key)!r})"
                 for key in PRIOR_SETTINGS if fitted.get(key) != getattr(config, key)]
        if wrong:
            raise PriorMismatchError(
                f"region prior {self.meta.get('source', '?')} was fitted with other feature "
                f"settings: {'; '.join(wrong)}; fit one for these (lregions fit-regions)"
            )

    def predict(self, description: np.ndarray) -> np.ndarray:
        """(N, K) predicted loss of each box, standardised within its anchor."""
        n, k, d = description.shape
        if d != self.mean.shape[0]:
            raise PriorMismatchError(
                f"region prior {self.meta.get('source', '?')} takes {self.mean.shape[0]} "
                f"description columns, these boxes have {d}"
            )
        x = (description.reshape(-1, d) - self.mean) / self.scale
        with torch.no_grad():
            out = self.net(torch.as_tensor(x, dtype=torch.float32)).numpy().astype(np.float64)
        return _within_anchor(out.reshape(n, k))


def _fit_net(x: np.ndarray, y: np.ndarray, hidden: int, epochs: int, seed: int) -> _MLP:
    generator = torch.Generator().manual_seed(seed)
    net = _MLP(x.shape[1], hidden)
    with torch.no_grad():  # initialised from the call's own generator (no global RNG)
        for p in net.parameters():
            bound = 1.0 / np.sqrt(p.shape[-1] if p.dim() > 1 else max(p.shape[0], 1))
            p.copy_(torch.rand(p.shape, generator=generator) * 2 * bound - bound)
    xs, ys = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
    batch = 4096
    for _ in range(epochs):
        order = torch.randperm(len(xs), generator=generator)
        for start in range(0, len(xs), batch):
            idx = order[start:start + batch]
            loss = torch.mean((net(xs[idx]) - ys[idx]) ** 2)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return net.eval()


def _within_anchor(values: np.ndarray) -> np.ndarray:
    """(N, K) values standardised within each anchor (row)."""
    values = np.asarray(values, dtype=np.float64)
    centred = values - values.mean(axis=1, keepdims=True)
    return centred / np.maximum(values.std(axis=1, keepdims=True), 1e-8)


def relevant_anchors(losses: np.ndarray, margin: float = RELEVANT_MARGIN) -> np.ndarray:
    """(N,) the anchors whose best box comes within ``margin`` of the photo's loss range of the
    photo's best box: the anchors on what the prompt is about. Only their boxes teach the prior
    how a box should fit (around a distractor every box is wrong, and the smallest is least so)."""
    best = losses.min(axis=1)
    return best <= best.min() + margin * (float(losses.max() - losses.min()) + 1e-12)


def _correlation(prior: RegionPrior, photos: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean Pearson correlation of predicted and actual losses within the relevant anchors of
    ``photos``."""
    values = []
    for description, losses in photos:
        predicted = prior.predict(description)
        for a in np.flatnonzero(relevant_anchors(losses)):
            if losses[a].std() > 1e-12:
                values.append(float(np.corrcoef(predicted[a], losses[a])[0, 1]))
    return float(np.mean(values)) if values else 0.0


def fit(
    photos: list[tuple[np.ndarray, np.ndarray]],
    config: Config,
    *,
    hidden: int = 64,
    epochs: int = 60,
    heldout: float = 0.2,
    seed: int = 0,
    text_dims: int = 0,
) -> RegionPrior:
    """Fit a prior on ``photos``: (description (N, K, D), losses (N, K)) pairs from runs that
    edited every proposal; ``text_dims``: how many of the last description columns are the
    prompt's embedding (0 without one). The prior learns the order of boxes *within* an anchor (losses
    standardised per anchor) on the relevant anchors (:func:`relevant_anchors`); which anchor is
    right is left to the edits. A ``heldout`` share of the photos measures how well it ranks
    photos it was not fitted on (its :attr:`RegionPrior.weight`); the prior returned is then
    fitted on all of them."""
    if len(photos) < 5:
        raise ValueError(f"a region prior needs at least 5 calibrated photos, got {len(photos)}")
    order = np.random.default_rng(seed).permutation(len(photos))
    cut = max(1, round(heldout * len(photos)))
    test, train = [photos[i] for i in order[:cut]], [photos[i] for i in order[cut:]]

    def fitted(chosen, correlation: float | None) -> RegionPrior:
        rows = [(d[keep], _within_anchor(loss[keep]))
                for d, loss in chosen for keep in [relevant_anchors(loss)]]
        x = np.concatenate([d.reshape(-1, d.shape[-1]) for d, _ in rows]).astype(np.float64)
        y = np.concatenate([z.reshape(-1) for _, z in rows])
        mean, scale = x.mean(0), np.maximum(x.std(0), 1e-6)
        net = _fit_net((x - mean) / scale, y, hidden, epochs, seed)
        meta = {"heldout_correlation": correlation} if correlation is not None else {}
        return RegionPrior(net, mean.astype(np.float32), scale.astype(np.float32), meta)

    correlation = _correlation(fitted(train, None), test)
    prior = fitted(photos, correlation)
    text_dims = int(text_dims)
    patches = prior.mean.shape[0] - len(BASE_COLUMNS) - text_dims
    meta = {
        "format": PRIOR_FORMAT,
        "settings": {key: getattr(config, key) for key in PRIOR_SETTINGS},
        "loss_weights": [config.w_clip, config.w_dir, config.w_str],
        "scorer": config.scorer,
        "editor": config.editor,
        "photos": len(photos),
        "boxes": int(sum(loss.size for _, loss in photos)),
        "heldout_photos": len(test),
        "heldout_correlation": correlation,
        "columns": list(BASE_COLUMNS) + [f"patch_{i}" for i in range(patches)]
        + [f"prompt_{i}" for i in range(text_dims)],
        "prompt_dims": text_dims,
        "hidden": hidden,
        "epochs": epochs,
        "seed": seed,
    }
    return RegionPrior(prior.net, prior.mean, prior.scale, meta)


# ------------------------------------------------------------------------------------------------
def _tensors(prior: RegionPrior) -> dict[str, torch.Tensor]:
    out = {f"net.{k}": v.detach().contiguous() for k, v in prior.net.state_dict().items()}
    out["input.mean"] = torch.as_tensor(prior.mean)
    out["input.scale"] = torch.as_tensor(prior.scale)
    return out


def save_prior(prior: RegionPrior, location: str) -> dict:
    """Write ``location``/prior.safetensors and ``location``/prior.json (a local folder or an
    fsspec URL); returns the JSON written. Its ``digest`` names the weights' content."""
    import fsspec
    from safetensors.torch import save

    blob = save(_tensors(prior))
    meta = {**prior.meta, "digest": hashlib.sha256(blob).hexdigest()[:16]}
    fs, root = fsspec.core.url_to_fs(location)
    fs.makedirs(root, exist_ok=True)
    with fs.open(f"{root.rstrip('/')}/{WEIGHTS_FILE}", "wb") as handle:
        handle.write(blob)
    with fs.open(f"{root.rstrip('/')}/{META_FILE}", "w") as handle:
        handle.write(json.dumps(meta, indent=2, sort_keys=True, default=str))
    return meta


def load_prior(location: str) -> RegionPrior:
    """The prior stored at ``location`` (folder or fsspec URL), read once per process."""
    return _load_prior(str(location))


@load_once(maxsize=4)
def _load_prior(location: str) -> RegionPrior:
    import fsspec
    from safetensors.torch import load

    fs, root = fsspec.core.url_to_fs(location)
    try:
        with fs.open(f"{root.rstrip('/')}/{META_FILE}", "r") as handle:
            meta = json.loads(handle.read())
        with fs.open(f"{root.rstrip('/')}/{WEIGHTS_FILE}", "rb") as handle:
            blob = handle.read()
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(
            f"region prior {location}: cannot read {META_FILE} and {WEIGHTS_FILE} there ({exc}); "
            "write one with lregions fit-regions"
        ) from exc
    if meta.get("format") != PRIOR_FORMAT:
        raise PriorMismatchError(f"region prior {location}: format {meta.get('format')!r}, "
                                 f"this version reads {PRIOR_FORMAT}")
    digest = hashlib.sha256(blob).hexdigest()[:16]
    if digest != meta.get("digest"):
        raise PriorMismatchError(f"region prior {location}: {WEIGHTS_FILE} does not match "
                                 f"{META_FILE} (digest {digest}, expected {meta.get('digest')})")
    tensors = load(blob)
    mean, scale = tensors.pop("input.mean").numpy(), tensors.pop("input.scale").numpy()
    net = _MLP(mean.shape[0], int(meta["hidden"]))
    net.load_state_dict({k.removeprefix("net."): v for k, v in tensors.items()})
    return RegionPrior(net.eval(), mean, scale, {**meta, "source": location})
