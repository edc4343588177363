"""One flat, frozen configuration; presets are JSON overrides of its defaults.

The defaults *are* the reference setup of the paper's public implementation (DINO ViT-B/8 at
256 px, 9 anchors x 6 square proposals, CLIP ViT-B/16 losses, Stable Diffusion 2 inpainting at
50 steps, 10 learning iterations), except where that implementation is wrong: anchors are spread
apart by default, and the working image keeps the input's aspect ratio.

Presets live in ``lregions_core/presets/<name>.json`` as ``{"description": ..., "base": ...,
"set": {...}}``: data, defined once, read by the library, the command line and the pipeline alike.
A preset with a ``base`` starts from that preset's settings (``fast`` is ``default`` with cheaper
models), so each choice is written once. The ``reference`` preset is these defaults unchanged;
``default`` adds the region choices measured better in the oracle world
(``docs/benchmarks/regions.md``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

MODES = ("rgn", "exhaustive", "random", "dino-random")
ANCHOR_RULES = ("nms", "peaks", "reference")
ESTIMATORS = (
    "memo-expectation", "reinforce", "regression", "regression-anchor", "listwise", "bayes",
)
RGN_ACQUISITIONS = ("lcb", "thompson")
RGN_INITS = ("uniform", "objectness")
KEEP_CANDIDATES = ("all", "chosen", "none")
# "default": the editor model's own scheduler (PNDM for SD 2 inpainting, Euler for SDXL
# inpainting, the aMUSEd scheduler, flow-matching Euler for FLUX Fill); "dpm-solver++":
# DPM-Solver++ (2M, multistep), which needs fewer steps (SD and SDXL inpainting only).
EDITOR_SCHEDULERS = ("default", "dpm-solver++")
PROPOSAL_SPACINGS = ("linear", "geometric")
RGN_SAMPLINGS = ("policy", "untried")
RGN_FINALS = ("policy", "tried", "best", "blend")
# "box": edit the learned box (the paper's method); "mask": edit only what the source caption names
# inside it (segmented); "auto": edit both, and let the selection score pick.
REGION_SHAPES = ("box", "mask", "auto")
# "upsample": the chosen working-size edit, upsampled to the input's size; "region": the chosen
# region edited again from a crop of the input at up to the editor's own resolution.
FINAL_RENDERS = ("upsample", "region")


# The settings that make up the region-choice method (anchors, proposals and the learner): what
# the presets set from the oracle-world ablation, and what carries over between the oracle world
# and real models (benchmarks measure a preset's method in the oracle world with these).
REGION_CHOICE_KEYS = (
    "num_anchors", "anchor_rule", "anchor_spread", "anchor_refine", "num_proposals",
    "proposal_min", "proposal_max", "proposal_aspects", "proposal_spacing", "iterations", "lr",
    "tau", "estimator", "rgn_context", "rgn_steps", "rgn_sampling", "rgn_settle", "rgn_focus",
    "rgn_warmup", "rgn_patience", "rgn_final", "rgn_noise", "rgn_acquisition", "rgn_kappa",
    "rgn_halving", "rgn_confidence", "rgn_budget", "rgn_init", "region_prior",
)


class ConfigError(ValueError):
    """A setting or preset that does not exist or has an invalid value."""


@dataclass(frozen=True)
class Config:
    # --- feature extractor (anchors and region-network inputs) ---------------------------------
    features: str = "dino"  # registry name: "dino" (timm) or "oracle-saliency"
    feature_model: str = "vit_base_patch8_224.dino"  # timm model name
    feature_size: int = 256  # longer side of the image DINO sees (patch grid 32 at /8)
    feature_kwargs: dict = field(default_factory=dict)  # extra timm.create_model kwargs (tiny)

    # --- scorer (losses and selection similarities) ---------------------------------------------
    scorer: str = "clip"  # registry name: "clip" (open_clip) or "oracle"
    clip_model: str = "ViT-B-16"  # open_clip model name ("none": no CLIP, oracle scorer)
    clip_pretrained: str | None = "openai"  # open_clip tag; None = random weights
    clip_kwargs: dict = field(default_factory=dict)  # extra create_model kwargs (tiny)
    clip_views: int = 16  # the full image plus clip_views-1 random augmented crops
    clip_structure_layer: int = 11  # tokens after this many blocks feed L_str's self-similarity

    # --- editor ---------------------------------------------------------------------------------
    # registry name: "sd-inpaint", "sdxl-inpaint", "flux-fill", "amused" or "oracle-painter"
    editor: str = "sd-inpaint"
    editor_model: str = "stabilityai/stable-diffusion-2-inpainting"  # hub repo or local dir
    editor_steps: int = 50  # denoising (SD, SDXL, FLUX) or decoding (aMUSEd) steps per edit
    # Classifier-free guidance scale of the editor (FLUX.1 Fill [dev]: the distilled guidance
    # its transformer is conditioned on, no negative prompt; its card uses 30).
    guidance_scale: float = 7.5
    prompt_template: str = "a high quality image of {prompt}."  # editor text; has {prompt}
    editor_kwargs: dict = field(default_factory=dict)  # tiny: in-code architecture settings
    editor_scheduler: str = "default"  # one of EDITOR_SCHEDULERS
    # Requests per editor forward pass (the UNet sees twice as many with guidance). 9 = every box
    # one learning iteration of the default 9 anchors needs, in one batch. When the GPU runs out
    # of memory the editor halves it and retries (and says so); lower it for small cards.
    edit_batch: int = 9
    # Encode and decode one image at a time in the VAE, so its memory does not grow with
    # edit_batch (the VAE decoder's activations at 512 px are the largest of the editor).
    vae_slicing: bool = True
    # torch.compile the editor's denoiser (SD's and SDXL's UNet, aMUSEd's and FLUX's transformer):
    # compiles once per process (minutes) and again for new shapes; pays off over many photos on
    # a GPU.
    compile_unet: bool = False
    # Keep the editor's weights in CPU memory and move them to the GPU as they run, for cards too
    # small to hold them (FLUX Fill needs about 34 GB in bfloat16): "none", "model" (one model at
    # a time: the text encoders, then the denoiser, then the VAE; a little slower) or
    # "sequential" (layer by layer: the least GPU memory, many times slower). Needs a CUDA device
    # and the accelerate package; not with compile_unet.
    editor_offload: str = "none"
    # Encode and decode large images in overlapping tiles in the VAE (its memory then stays that
    # of one tile). Only images larger than the VAE's tile (its sample_size: 1024 px for SDXL
    # and FLUX) are tiled, and their edits change slightly at the seams; aMUSEd has no tiled mode.
    vae_tiling: bool = False

    # --- working image --------------------------------------------------------------------------
    work_size: int = 512  # longer side of the image the editor works on (aspect kept)
    work_multiple: int = 64  # working width and height are multiples of this

    # --- where models run and where weights come from ---------------------------------------------
    device: str = "auto"  # "auto" = cuda when available, else cpu
    dtype: str = "auto"  # "auto" = float16 on cuda, float32 on cpu
    weights_dir: str | None = None  # local folder searched before the Hugging Face cache
    random_weights: bool = False  # build every model with random weights (tiny preset, benchmarks)

    # --- anchors and proposals ------------------------------------------------------------------
    num_anchors: int = 9  # anchor points per image, each with its own proposals
    # "nms" (spread apart by a fixed radius), "peaks" (one anchor per attention hill first, then
    # nms) or "reference" (fit-inside, may repeat)
    anchor_rule: str = "nms"
    anchor_spread: float = 0.1  # NMS radius, as a fraction of the grid's shorter side
    anchor_refine: bool = False  # sub-patch anchor positions (parabola through the attention)
    num_proposals: int = 6  # box sizes per anchor (K = num_proposals x len(proposal_aspects))
    proposal_min: float = 0.125  # smallest half-size, fraction of the image's shorter side
    proposal_max: float = 0.4375  # largest half-size (ref: 4..14 cells of a 32 grid)
    # Width:height ratios; every size gets one box per ratio, all of the size's area ([1.0] is the
    # reference's square family).
    proposal_aspects: list = field(default_factory=lambda: [1.0])
    proposal_spacing: str = "linear"  # sizes "linear" (reference) or "geometric" from min to max

    # --- region network and its learning ------------------------------------------------------
    mode: str = "rgn"  # one of MODES
    roi_size: int = 7  # RoIAlign output size (cells per side) of each box for the network
    rgn_hidden: int = 16  # hidden width of the region network
    iterations: int = 10  # learning iterations of the region network per image
    lr: float = 0.05  # learning rate of the region network
    tau: float = 1.0  # sampling temperature of the box policy
    estimator: str = "memo-expectation"  # one of ESTIMATORS
    # Pool a second RoI this much larger around each box (1.0 = twice the size), so the network
    # sees whether a box cuts an object off; 0 = the box alone (reference).
    rgn_context: float = 0.0
    rgn_steps: int = 1  # optimiser steps per iteration on the memo (no edits; reference 1)
    # "policy": sample each anchor's next box from the policy (a tried box costs no edit but
    # brings nothing new); "untried": sample among the boxes not edited yet.
    rgn_sampling: str = "policy"
    # Stop an anchor once its policy puts at least this probability on boxes already edited
    # (0 = run every iteration).
    rgn_settle: float = 0.0
    # Stop an anchor whose best loss is worse than the best anchor's by more than this many
    # standard deviations of the known losses (None = every anchor runs to the end).
    rgn_focus: float | None = None
    rgn_patience: int = 0  # stop an anchor after this many tries without a better loss (0 = off)
    rgn_warmup: int = 0  # iterations every anchor runs before rgn_settle / rgn_focus may stop it
    # Each anchor's box after learning: "policy" (most probable box, edited if it was never
    # tried) or "tried" (most probable among the edited boxes: no edit after learning).
    rgn_final: str = "policy"
    # --- the Bayesian box search (estimator "bayes") -------------------------------------------
    # The judge's noise in the search's loss model (a Gaussian process over all proposals): the
    # standard deviation of a loss's error, as a fraction of the spread of the losses of one
    # photo's edits (0 = trust every loss exactly).
    rgn_noise: float = 0.3
    # Which untried box an anchor edits next: "lcb" (lowest predicted loss minus rgn_kappa
    # standard deviations) or "thompson" (lowest loss in one draw from the loss model).
    rgn_acquisition: str = "lcb"
    # Weight of the uncertainty in "lcb" (0 = the lowest predicted loss).
    rgn_kappa: float = 1.0
    # Share of the still-running anchors kept after each round (successive halving: 0.5 halves
    # them; 1.0 keeps every anchor that can still win).
    rgn_halving: float = 0.5
    # Stop an anchor once the chance that any of its untried boxes beats the best box so far is
    # below 1 - rgn_confidence (0 = never stop for that reason).
    rgn_confidence: float = 0.95
    # At most this many edits per photo (0 = no cap beyond iterations x anchors).
    rgn_budget: int = 0
    # Each box's predicted loss before any edit, without a region prior: "uniform" (none) or
    # "objectness" (how much attention the box holds against the ring around it).
    rgn_init: str = "objectness"
    # A region prior fitted across photos (lregions fit-regions): a folder or fsspec URL with
    # prior.safetensors and prior.json. Ranks each anchor's boxes before any edit; used by the
    # "bayes" search (None = rgn_init).
    region_prior: str | None = None
    w_clip: float = 1.0  # weight of L_clip (edit matches the prompt) in the learner's loss
    w_dir: float = 1.0  # weight of L_dir (change in the prompt's direction from the source)
    w_str: float = 1.0  # weight of L_str (structure kept: token self-similarity)

    # --- object masks inside the box (region_shape "mask" / "auto") ----------------------------
    region_shape: str = "box"  # one of REGION_SHAPES
    segmenter: str = "clipseg"  # registry name: "clipseg" (transformers) or "oracle-segmenter"
    segmenter_model: str = "CIDAS/clipseg-rd64-refined"  # hub repo or local dir
    segmenter_kwargs: dict = field(default_factory=dict)  # tiny: in-code architecture settings
    mask_threshold: float = 0.4  # segmenter probability above which a pixel is the object
    # Working pixels the segment is grown by before editing (so the editor can blend it in and a
    # segment that falls a little short still covers the object); the composite's alpha ramps
    # from 0 to 1 across this margin.
    mask_grow: int = 6

    # --- oracle world only ------------------------------------------------------------------
    # Standard deviation of the seeded Gaussian noise the oracle scorer adds to each loss term and
    # to both similarities, as a fraction of their 0..1 range (0 = an exact judge).
    oracle_noise: float = 0.0

    # --- selection and output -----------------------------------------------------------------
    select_text_weight: float = 2.0  # weight of the softmax of text_sim in the selection score
    select_image_weight: float = 1.0  # weight of the softmax of image_sim in the score
    select_top_k: int = 3  # only the k candidates most similar to the text can be chosen
    feather: int = 8  # px of the input image: soft edge outside the box; beyond it, input pixels
    # Candidate edits kept once an item is done: "all" (the report shows every candidate),
    # "chosen" (only the one the final image came from) or "none" (final image only).
    keep_candidates: str = "all"
    # Write each item's layer.png (the edit as an RGBA layer over the input; see the docs: Masks
    # and layers).
    keep_layers: bool = True
    # How the final image is made (one of FINAL_RENDERS): "upsample" the chosen working-size
    # edit, or "region": edit the chosen region again from a crop of the input at up to the
    # editor's own resolution (never enlarging the input), kept when it scores at least as well.
    final_render: str = "upsample"
    # Context around the chosen box in a "region" render, each side, as a fraction of the box's
    # longer side (the crop then grows to the editor's own size where the input allows).
    render_context: float = 0.25
    seed: int = 0  # random seed of a row that gives none (manifest column seed)

    # ------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        # Equal settings must hash equally: lr=1 and lr=1.0 are the same config.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            is_float = isinstance(f.default, float) or str(f.type).startswith("float")
            if is_float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
        # Aspect ratios as floats, so [1, 2] and [1.0, 2.0] are the same settings (and hash so).
        if isinstance(self.proposal_aspects, (list, tuple)):
            aspects = self.proposal_aspects
            if all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in aspects):
                object.__setattr__(self, "proposal_aspects", [float(a) for a in aspects])
        checks = [
            (self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}"),
            (
                self.anchor_rule in ANCHOR_RULES,
                f"anchor_rule must be one of {ANCHOR_RULES}, got {self.anchor_rule!r}",
            ),
            (
                self.keep_candidates in KEEP_CANDIDATES,
                f"keep_candidates must be one of {KEEP_CANDIDATES}, got {self.keep_candidates!r}",
            ),
            (
                self.estimator in ESTIMATORS,
                f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}",
            ),
            (self.num_anchors >= 1, "num_anchors must be >= 1"),
            (self.num_proposals >= 1, "num_proposals must be >= 1"),
            (
                0 < self.proposal_min <= self.proposal_max,
                "need 0 < proposal_min <= proposal_max",
            ),
            (
                isinstance(self.proposal_aspects, list) and len(self.proposal_aspects) > 0
                and all(isinstance(a, float) and a > 0 for a in self.proposal_aspects),
                (f"proposal_aspects must be a non-empty list of positive width:height ratios, "
                 f"got {self.proposal_aspects!r}"),
            ),
            (
                self.proposal_spacing in PROPOSAL_SPACINGS,
                (f"proposal_spacing must be one of {PROPOSAL_SPACINGS}, "
                 f"got {self.proposal_spacing!r}"),
            ),
            (
                self.region_shape in REGION_SHAPES,
                f"region_shape must be one of {REGION_SHAPES}, got {self.region_shape!r}",
            ),
            (0 < self.mask_threshold < 1, "mask_threshold must be in (0, 1)"),
            (self.mask_grow >= 0, "mask_grow must be >= 0"),
            (self.oracle_noise >= 0, "oracle_noise must be >= 0"),
            (
                self.oracle_noise == 0 or self.scorer == "oracle",
                "oracle_noise is read only by the oracle scorer (scorer='oracle')",
            ),
            (self.iterations >= 0, "iterations must be >= 0"),
            (self.rgn_context >= 0, "rgn_context must be >= 0"),
            (self.rgn_steps >= 1, "rgn_steps must be >= 1"),
            (self.rgn_warmup >= 0, "rgn_warmup must be >= 0"),
            (self.rgn_patience >= 0, "rgn_patience must be >= 0"),
            (
                self.rgn_sampling in RGN_SAMPLINGS,
                f"rgn_sampling must be one of {RGN_SAMPLINGS}, got {self.rgn_sampling!r}",
            ),
            (0 <= self.rgn_settle <= 1, "rgn_settle must be in [0, 1]"),
            (self.rgn_focus is None or self.rgn_focus >= 0, "rgn_focus must be >= 0 or null"),
            (
                self.rgn_final in RGN_FINALS,
                f"rgn_final must be one of {RGN_FINALS}, got {self.rgn_final!r}",
            ),
            (self.tau > 0, "tau must be > 0"),
            (self.rgn_noise >= 0, "rgn_noise must be >= 0"),
            (
                self.rgn_acquisition in RGN_ACQUISITIONS,
                f"rgn_acquisition must be one of {RGN_ACQUISITIONS}, got {self.rgn_acquisition!r}",
            ),
            (self.rgn_kappa >= 0, "rgn_kappa must be >= 0"),
            (0 < self.rgn_halving <= 1, "rgn_halving must be in (0, 1]"),
            (0 <= self.rgn_confidence < 1, "rgn_confidence must be in [0, 1)"),
            (self.rgn_budget >= 0, "rgn_budget must be >= 0"),
            (self.rgn_init in RGN_INITS, f"rgn_init must be one of {RGN_INITS}, got {self.rgn_init!r}"),
            (self.select_top_k >= 1, "select_top_k must be >= 1"),
            (self.clip_views >= 1, "clip_views must be >= 1"),
            (self.edit_batch >= 1, "edit_batch must be >= 1"),
            (
                self.editor_offload in ("none", "model", "sequential"),
                (f"editor_offload must be one of ('none', 'model', 'sequential'), "
                 f"got {self.editor_offload!r}"),
            ),
            (
                self.editor_offload == "none" or self.device != "cpu",
                ("editor_offload moves the editor's weights between CPU memory and a CUDA GPU: "
                 "it needs device 'cuda' or 'auto', not 'cpu'"),
            ),
            (isinstance(self.vae_tiling, bool), "vae_tiling must be true or false"),
            (
                self.editor_scheduler in EDITOR_SCHEDULERS,
                f"editor_scheduler must be one of {EDITOR_SCHEDULERS}, got {self.editor_scheduler!r}",
            ),
            (self.feather >= 0, "feather must be >= 0"),
            (
                self.final_render in FINAL_RENDERS,
                f"final_render must be one of {FINAL_RENDERS}, got {self.final_render!r}",
            ),
            (self.render_context >= 0, "render_context must be >= 0"),
            (self.work_size >= self.work_multiple > 0, "need work_size >= work_multiple > 0"),
            ("{prompt}" in self.prompt_template, "prompt_template must contain {prompt}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    # ------------------------------------------------------------------------------------------
    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied (validated)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self, keys: list[str] | tuple[str, ...] | None = None) -> str:
        """A stable hash of the whole config, or of only ``keys`` (what one stage reads)."""
        data = self.to_dict()
        if keys is not None:
            data = {k: data[k] for k in keys}
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def proposals_per_anchor(self) -> int:
        """K: boxes around each anchor, one per size and width:height ratio."""
        return self.num_proposals * len(self.proposal_aspects)

    @property
    def device_resolved(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------------------------
def preset_names() -> list[str]:
    folder = resources.files("lregions_core") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> dict[str, Any]:
    """The raw preset document: ``{"description": str, "base": str (optional), "set": {setting:
    value}}``."""
    path = resources.files("lregions_core") / "presets" / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(preset_names())}")
    return json.loads(path.read_text())


def preset_settings(name: str) -> dict[str, Any]:
    """Every setting a preset makes: its ``base`` preset's (recursively), then its own."""
    chain: list[str] = []
    docs = []
    while name is not None:
        if name in chain:
            raise ConfigError(f"preset {chain[0]!r}: its bases form a loop: "
                              f"{' -> '.join([*chain, name])}")
        chain.append(name)
        docs.append(load_preset(name))
        name = docs[-1].get("base")
    settings: dict[str, Any] = {}
    for doc in reversed(docs):
        settings.update(doc.get("set", {}))
    return settings


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` from the command line; the value is read as JSON when it parses
    (numbers, booleans, null, lists, objects), else kept as a string."""
    key, sep, raw = text.partition("=")
    raw = raw.strip()
    if not sep or not key.strip():
        raise ConfigError(f"expected key=value, got {text!r}")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def _raw_text(key: str, sets) -> str:
    """The raw text last given for ``key`` in ``key=value`` strings."""
    return [s.partition("=")[2].strip() for s in sets if s.partition("=")[0].strip() == key][-1]


def run_config(
    preset: str = "default", mode: str | None = None, sets: list[str] | tuple[str, ...] | None = None
) -> Config:
    """A run's settings as commands and flows take them: the preset, then ``mode`` when one is
    given (``--mode``), then ``key=value`` strings (``--set``)."""
    return make_config(preset, {"mode": mode} if mode else None, sets or ())


def make_config(
    preset: str = "default",
    overrides: dict[str, Any] | None = None,
    sets: list[str] | tuple[str, ...] = (),
) -> Config:
    """The preset's settings, then ``overrides``, then ``key=value`` strings, validated."""
    changes = preset_settings(preset)
    changes.update(overrides or {})
    text_fields = {f.name for f in dataclasses.fields(Config) if str(f.type).startswith("str")}
    for key, value in (parse_override(s) for s in sets):
        # A string setting keeps its text even when it parses as JSON (weights_dir=2024).
        if key in text_fields and not isinstance(value, str) and value is not None:
            value = _raw_text(key, sets)
        changes[key] = value
    base = Config()
    try:
        return base.replace(**changes)
    except TypeError as exc:  # pragma: no cover - dataclasses.replace on bad types
        raise ConfigError(str(exc)) from exc
