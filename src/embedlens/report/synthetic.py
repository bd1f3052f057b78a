"""A synthetic multi-layer probe at LLaVA-1.5-7B's shapes, to size and time the report without a model.

576 visual tokens (a 24 x 24 grid), 33 layers (0 .. 32), top-10, both lenses, over a 32000-piece
vocabulary: ids are drawn so that many differ between cells and layers (a heavier case than a real
model, whose neighbours repeat), scores and norms are plausible magnitudes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from embedlens.result import MultiLayerProbe, ProbeResult, Provenance


def synthetic_probe(
    label: str | Path = "synthetic.png",
    *,
    seed: int = 0,
    grid: tuple[int, int] = (24, 24),
    layers: int = 33,
    top_k: int = 10,
    vocab: int = 32000,
    lenses: tuple[str, ...] = ("embedding", "logit"),
    image_side: int = 336,
) -> MultiLayerProbe:
    """A :class:`MultiLayerProbe` of random tokens with LLaVA-1.5-7B's shapes (and a random 336 px picture)."""
    rng = np.random.default_rng(seed)
    rows, cols = grid
    n = rows * cols
    pieces = [f"▁w{i}" for i in range(vocab)]
    view = Image.fromarray(rng.integers(0, 256, size=(image_side, image_side, 3), dtype=np.uint8), "RGB")
    provenance = Provenance(
        model="synthetic/llava-1.5-7b-shapes",
        revision=None,
        config_hash="0" * 64,
        vocab_hash="0" * 64,
        layer=0,
        lens=lenses[0],
        k=top_k,
        exclude=(),
        dtype="float16",
    )
    results = []
    for lens in lenses:
        for layer in range(layers):
            ids = np.stack([rng.choice(vocab, size=top_k, replace=False) for _ in range(n)]).astype(np.int64)
            base = rng.uniform(0.05, 0.4, size=(n, 1)) if lens == "embedding" else rng.uniform(5, 25, size=(n, 1))
            scores = np.sort(base * rng.uniform(0.7, 1.0, size=(n, top_k)), axis=1)[:, ::-1]
            results.append(
                ProbeResult(
                    image=str(label),
                    prompt="Describe the image.",
                    text="USER: <image>\nDescribe the image. ASSISTANT:",
                    grid=grid,
                    index=np.arange(n),
                    row=np.arange(n) // cols,
                    col=np.arange(n) % cols,
                    position=np.arange(n) + 5,
                    norm=rng.lognormal(0.0 + layer / 8, 0.4, size=n).astype(np.float32),
                    top_ids=ids,
                    top_tokens=[[pieces[i] for i in row] for row in ids],
                    top_sims=scores,
                    provenance=Provenance(**{**provenance.__dict__, "layer": layer, "lens": lens}),
                    view=view,
                )
            )
    return MultiLayerProbe(results)
