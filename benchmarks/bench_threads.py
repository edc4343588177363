"""Shared models called from several task threads at once: does every call get its own photo's
result, and what does concurrency cost against serialising the calls?

For each component of the ``tiny`` preset (DINO features, the CLIP scorer, the editor, the
segmenter) and the evaluator, ``--threads`` threads each make ``--calls`` calls on inputs of their
own (half of one size, half of others), all started together. Every result is compared with the
same call made alone, one at a time, beforehand: a call that returns another input's result (or
fails) is counted as wrong. Then the same concurrent calls are timed twice side by side: free (as
the batch runs them) and serialised through one lock per component, and the ratio is printed.

    python benchmarks/bench_threads.py [--threads 8] [--calls 20] [--components dino,clip]

CPU only (the tiny models are built from random weights, offline).
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from lregions_core.config import make_config
from lregions_core.interfaces import EditRequest
from lregions_core.metrics import shared_evaluator
from lregions_core.pipeline import Models, segmenter_of
from lregions_core.threadcheck import run_together, same

SIZES = [(256, 256), (256, 256), (256, 192), (192, 256), (256, 256), (224, 256), (256, 256),
         (256, 160)]


def noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def workloads(threads: int) -> dict[str, Callable[[int], Any]]:
    """Component name -> call(i): the i-th thread's call on its own input."""
    config = make_config("tiny", {"region_shape": "auto"})
    models = Models.load(config)
    segmenter = segmenter_of(config, models)
    evaluator = shared_evaluator(config)
    images = [noise(*SIZES[i % len(SIZES)], seed=i) for i in range(threads)]
    work = [noise(64, 64 if i % 2 else 48, seed=100 + i) for i in range(threads)]
    prompts = [f"a photo of thing number {i}" for i in range(threads)]
    contexts = [models.scorer.prepare(work[i], prompts[i], "a photo") for i in range(threads)]

    def mask(image: Image.Image) -> Image.Image:
        m = Image.new("L", image.size, 0)
        m.paste(255, (8, 8, image.width - 8, image.height - 16))
        return m

    return {
        "dino": lambda i: models.features(images[i]),
        "clip-prepare": lambda i: models.scorer.prepare(work[i], prompts[i], "a photo"),
        "clip-score": lambda i: models.scorer.score(contexts[i], [work[i], work[-1 - i]],
                                                    [i, i + 1]),
        "editor": lambda i: models.editor.edit([EditRequest(work[i], mask(work[i]), prompts[i],
                                                            seed=i)]),
        "segmenter": lambda i: segmenter.segment([work[i]], [prompts[i]]),
        "evaluator": lambda i: evaluator.evaluate(
            work[i], work[-1 - i].resize(work[i].size), prompt=prompts[i], source_prompt=None,
            box=(4, 4, 40, 40)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--components", default="", help="comma-separated; default: all")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads (1, as in the tests)")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    loads = workloads(args.threads)
    wanted = [c for c in args.components.split(",") if c] or list(loads)
    print(f"{args.threads} threads x {args.calls} calls, torch threads {args.torch_threads}")
    print(f"{'component':<14}{'wrong':>8}{'calls':>7}{'free s':>9}{'locked s':>10}"
          f"{'locked/free':>13}")
    for name in wanted:
        call = loads[name]
        alone = [call(i) for i in range(args.threads)]
        results, free = run_together(call, args.threads, args.calls)
        wrong = sum(isinstance(r, Exception) or not same(r, alone[i])
                    for i, rs in enumerate(results) for r in rs)
        errors = {f"{type(r).__name__}: {r}" for rs in results for r in rs
                  if isinstance(r, Exception)}
        _, locked = run_together(call, args.threads, args.calls, threading.Lock())
        print(f"{name:<14}{wrong:>8}{args.threads * args.calls:>7}{free:>9.2f}{locked:>10.2f}"
              f"{locked / free:>13.2f}")
        for error in sorted(errors)[:3]:
            print(f"    error: {error[:160]}")


if __name__ == "__main__":
    main()
