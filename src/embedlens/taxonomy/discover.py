"""Anchor discovery: find the vocabulary ids that mark a model's ViT sinks, LLM sinks and dead tokens.

The paper's rule (:mod:`embedlens.taxonomy.rule`) needs, per group, *anchor* ids: a visual token whose
``top_k`` nearest input-embedding ids (cosine, layer 0 = projector output) contain an anchor id joins
the anchor's group. The paper gives them for LLaVA-1.5-7B only; :func:`discover_anchors` finds them
for any model from a set of images, with the evidence that separates the three kinds.

For every vocabulary id, over all visual tokens whose top-k contains it (its *hitting* tokens):

* recurrence: ``image_fraction``, the fraction of images with at least one hitting token, and
  ``token_share``, the fraction of all visual tokens that hit it. *Candidates* are the ids with
  ``image_fraction >= min_image_fraction`` and at least ``min_images`` images;
* image independence (``independence``): the mean cosine, over pairs of images, between the per-image
  mean layer-0 vectors of the hitting tokens (1.0 = the same vector in every image);
* ViT sinks (``norm_ratio``): the mean, over hitting tokens, of the token's vision-tower feature norm
  (the projector's input, without CLS or other extra positions) divided by the median norm of its
  image's grid tokens; ViT sinks are the high-norm "register" patches;
* LLM sinks, read at layer ``sink_layer`` (the residual stream after that many decoder layers):
  ``bos_cosine``, the mean cosine between the hitting token's hidden state and the hidden state of
  the sample's first non-padding position (``<bos>`` when the tokenizer adds one, else the first
  token); ``massive_ratio``, the mean of the token's ``max |dim| / median |dim|`` divided by the
  median of that figure over its image's visual tokens;
* dead tokens (``cross_layer_cosine``): the mean cosine between the hitting token's layer-0 vector and
  its hidden state at ``cross_layer`` (dead tokens barely change).

A candidate is assigned, in this order: rejected when image-dependent (``independence`` below
``min_independence``); ``vit_sink`` when ``norm_ratio >= vit_norm_ratio``; ``llm_sink`` when
``bos_cosine >= llm_bos_cosine`` or ``massive_ratio >= llm_massive_ratio``; ``dead`` when
``cross_layer_cosine >= dead_cross_cosine``; rejected otherwise. With ``top_k > 1`` the ids that sit
next to an anchor in the same tokens' top-k recur just as much (the sink tokens' 2nd and 3rd nearest
ids): a candidate is dropped as a *follower* when at least ``follower_overlap`` of its hitting tokens
also hit a stronger id already kept in its group. Within a group, ids are ordered by evidence
strength: most hitting tokens first, then most often the nearest id, then the lower id.

Everything is streamed: one forward pass per batch (stopping after the last layer needed), and only
running sums per vocabulary id are kept (plus one ``d``-vector per id ever hit, and counts of the id
pairs that share a token's top-k), never the tokens of all images. Figures are computed in float64
(the per-id vector sums in float32); medians are torch's (the lower middle value for an even count).

The thresholds (:class:`DiscoveryConfig`), the per-token figures and the verdict live in
:mod:`embedlens.taxonomy.evidence`, the running sums in :mod:`embedlens.taxonomy.tally`; this module
runs the passes and turns the sums into candidates and anchors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from embedlens.capture import run_captured
from embedlens.context import DEFAULT_PROMPT
from embedlens.errors import InputError
from embedlens.images import ImageLike, image_label, load_image
from embedlens.lens import pieces
from embedlens.taxonomy.anchors import Anchors
from embedlens.taxonomy.evidence import _FIGURES, DiscoveryConfig, _first_valid, _judge, _sample_figures
from embedlens.taxonomy.groups import GROUPS
from embedlens.taxonomy.tally import _Tally

if TYPE_CHECKING:
    from embedlens.context import ModelContext

#: ``"method"`` value written into the anchors' evidence.
DISCOVERY_METHOD = "embedlens.taxonomy.discover_anchors"


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class AnchorCandidate:
    """One recurring vocabulary id and the evidence about the visual tokens that hit it.

    Attributes:
        id: Vocabulary id (row of the input embedding table).
        piece: Its vocabulary piece (``"<row N>"`` for padding rows beyond the tokenizer).
        images: Images with at least one hitting token.
        image_fraction: ``images`` over the images read.
        tokens: Visual tokens with the id among their top-k (all images).
        token_share: ``tokens`` over all visual tokens read.
        nearest_share: Fraction of the hitting tokens whose nearest id (rank 0) it is.
        independence: Mean cosine, over pairs of images, between the per-image mean layer-0 vectors of
            the hitting tokens (1.0 = identical in every image); NaN with fewer than two images.
        norm_ratio: Mean over hitting tokens of vision-feature norm / the image's median norm.
        bos_cosine: Mean cosine with the first position's hidden state at the sink layer.
        massive_ratio: Mean massive-activation ratio at the sink layer, relative to the image's
            visual tokens (1 = typical).
        cross_layer_cosine: Mean cosine between layer 0 and the cross layer.
        group: The group the id anchors (``"vit_sink"``, ``"llm_sink"``, ``"dead"``), or None.
        reason: Why it got that group, or why none.
    """

    id: int
    piece: str
    images: int
    image_fraction: float
    tokens: int
    token_share: float
    nearest_share: float
    independence: float
    norm_ratio: float
    bos_cosine: float
    massive_ratio: float
    cross_layer_cosine: float
    group: str | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN figures become None)."""
        return {key: _json_number(value) for key, value in asdict(self).items()}


@dataclass(frozen=True)
class SkippedImage:
    """An image that could not be read.

    Attributes:
        index: Its position in the images given (0-based).
        image: Its path, or ``"<in-memory image>"``.
        reason: The :class:`~embedlens.errors.InputError` message.
    """

    index: int
    image: str
    reason: str


@dataclass(frozen=True)
class Discovery:
    """What :func:`discover_anchors` found.

    Attributes:
        anchors: The discovered anchors; ``anchors.evidence`` holds the per-candidate figures, the
            thresholds, layers and image counts (JSON-ready, saved with :meth:`Anchors.save`).
        candidates: Every recurring id with its evidence, strongest first (assigned or not).
        skipped: Images that could not be read, in input order.
        config: The settings used.
        num_images: Images read.
        num_tokens: Visual tokens read (all images).
        sink_layer: The layer the LLM-sink figures were read at.
        cross_layer: The layer the cross-layer cosine compared with layer 0.
    """

    anchors: Anchors
    candidates: list[AnchorCandidate]
    skipped: list[SkippedImage]
    config: DiscoveryConfig
    num_images: int
    num_tokens: int
    sink_layer: int
    cross_layer: int

    @property
    def groups(self) -> dict[str, tuple[int, ...]]:
        """Anchor ids per group (``anchors.groups``)."""
        return self.anchors.groups

    def to_pandas(self) -> pd.DataFrame:
        """One row per candidate, indexed by ``id``, with the :class:`AnchorCandidate` fields as columns."""
        columns = [name for name in AnchorCandidate.__dataclass_fields__ if name != "id"]
        frame = pd.DataFrame([asdict(candidate) for candidate in self.candidates], columns=["id", *columns]).set_index(
            "id"
        )
        # keep None (not NaN) for candidates without a group, as in AnchorCandidate
        frame["group"] = pd.Series([c.group for c in self.candidates], index=frame.index, dtype=object)
        frame.attrs.update({"num_images": self.num_images, "num_tokens": self.num_tokens, "skipped": len(self.skipped)})
        return frame


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------- discovery
def discover_anchors(
    session: ModelContext,
    images: Iterable[ImageLike],
    prompts: str | Sequence[str] | None = None,
    *,
    config: DiscoveryConfig | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> Discovery:
    """Find ``session``'s model's anchor ids (ViT sink, LLM sink, dead) from a set of images.

    Args:
        session: The loaded model.
        images: Paths or PIL images (a single one is accepted too). Images that cannot be read are
            skipped and listed in :attr:`Discovery.skipped`.
        prompts: The question asked with every image (one string), one per image, or None for the
            default prompt.
        config: Thresholds and layers (default :class:`DiscoveryConfig`).
        batch_size: Images per forward pass.
        progress: Show a progress bar (tqdm, on stderr).

    Returns:
        A :class:`Discovery`; ``.anchors`` can be saved with :meth:`Anchors.save` and passed to
        :func:`embedlens.taxonomy.classify`.

    Raises:
        InputError: Bad settings, a prompt count that does not match the images, or no readable image.
    """
    config = config or DiscoveryConfig()
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise InputError(f"batch size must be a positive integer, got {batch_size!r}")
    sources: list[ImageLike] = [images] if isinstance(images, (str, Path, Image.Image)) else list(images)
    if prompts is None or isinstance(prompts, str):
        asked = [DEFAULT_PROMPT if prompts is None else prompts] * len(sources)
    else:
        asked = list(prompts)
        if len(asked) != len(sources):
            raise InputError(f"{len(sources)} images but {len(asked)} prompts")
    adapter = session.adapter
    sink, cross = config.layers(adapter.num_layers)
    table = adapter.input_embeddings.weight
    if config.top_k > table.shape[0]:
        raise InputError(f"top-k {config.top_k} is larger than the {table.shape[0]} vocabulary rows")
    lens = session.lens("embedding")
    tally = _Tally(vocab_rows=int(table.shape[0]), dim=int(table.shape[1]))
    skipped: list[SkippedImage] = []

    def run(batch_images: list[Image.Image], batch_prompts: list[str]) -> None:
        batch = session.prepare(batch_images, batch_prompts)
        captured = run_captured(adapter, batch.inputs, sorted({0, sink, cross}), vision_features=True)
        mask = batch.inputs.get("attention_mask")
        vectors, figures, image_of = [], {name: [] for name in _FIGURES}, []
        for sample, spans in enumerate(batch.spans):
            first, values = _sample_figures(adapter, captured, sample, spans, _first_valid(mask, sample), sink, cross)
            vectors.append(first)
            image_of.append(torch.full((first.shape[0],), sample, dtype=torch.long))
            for name in _FIGURES:
                figures[name].append(values[name].cpu())
        everything = torch.cat(vectors)  # [n, d]: all visual tokens of the batch, one lens search
        tally.add(
            len(batch.spans),
            lens.top_k(everything, config.top_k).ids,
            torch.cat(image_of),
            everything,
            {name: torch.cat(parts).numpy() for name, parts in figures.items()},
        )

    pending_images: list[Image.Image] = []
    pending_prompts: list[str] = []
    with tqdm(total=len(sources), desc="discovering anchors", unit="image", disable=not progress) as bar:
        for index, (source, prompt) in enumerate(zip(sources, asked, strict=True)):
            try:
                pending_images.append(load_image(source))
            except InputError as exc:
                skipped.append(SkippedImage(index=index, image=image_label(source), reason=str(exc)))
                bar.update(1)
                continue
            pending_prompts.append(prompt)
            if len(pending_images) == batch_size:
                run(pending_images, pending_prompts)
                bar.update(len(pending_images))
                pending_images, pending_prompts = [], []
        if pending_images:
            run(pending_images, pending_prompts)
            bar.update(len(pending_images))
    if tally.images == 0:
        detail = f": {skipped[0].reason}" if skipped else ""
        raise InputError(f"no readable images among the {len(sources)} given{detail}")
    return _conclude(session, tally, config, skipped, sink, cross)


def _candidate_ids(tally: _Tally, config: DiscoveryConfig) -> np.ndarray:
    """Ids recurring in enough images, shape ``[c]``."""
    fraction = tally.images_hit / tally.images
    keep = (tally.images_hit >= config.min_images) & (fraction >= config.min_image_fraction - 1e-12)
    return np.flatnonzero(keep)


def _conclude(
    session: ModelContext,
    tally: _Tally,
    config: DiscoveryConfig,
    skipped: list[SkippedImage],
    sink: int,
    cross: int,
) -> Discovery:
    """Turn the tally into candidates, groups and anchors."""
    ids = _candidate_ids(tally, config)
    # strongest first: most hitting tokens, then most often the nearest id, then the lower id
    ids = sorted(ids.tolist(), key=lambda i: (-tally.tokens_hit[i], -tally.nearest_hit[i], i))
    names = pieces(session.adapter.tokenizer, torch.tensor([ids], dtype=torch.long))[0] if ids else []
    candidates: list[AnchorCandidate] = []
    kept: dict[str, list[int]] = {name: [] for name in GROUPS}
    for token_id, piece in zip(ids, names, strict=True):
        hits = int(tally.tokens_hit[token_id])
        figures = {name: float(tally.sums[name][token_id] / hits) for name in _FIGURES}
        figures["independence"] = tally.independence(token_id)
        group, reason = _judge(figures, config, sink, cross)
        if group is not None:
            for leader in kept[group]:
                shared = tally.shared_tokens(leader, token_id) / hits
                if shared >= config.follower_overlap:
                    reason = (
                        f"follows {leader} ({group}): {shared:.0%} of its tokens also have {leader} "
                        f"among their top-{config.top_k}"
                    )
                    group = None
                    break
        if group is not None:
            kept[group].append(token_id)
        images_hit = int(tally.images_hit[token_id])
        candidates.append(
            AnchorCandidate(
                id=int(token_id),
                piece=piece,
                images=images_hit,
                image_fraction=images_hit / tally.images,
                tokens=hits,
                token_share=hits / tally.tokens,
                nearest_share=float(tally.nearest_hit[token_id]) / hits,
                group=group,
                reason=reason,
                **figures,
            )
        )
    evidence = {
        "method": DISCOVERY_METHOD,
        "images": tally.images,
        "skipped_images": len(skipped),
        "visual_tokens": tally.tokens,
        "sink_layer": sink,
        "cross_layer": cross,
        "thresholds": config.to_dict(),
        "candidates": [candidate.to_dict() for candidate in candidates],
    }
    anchors = Anchors.for_tokenizer(
        kept, session.adapter.tokenizer, model=session.adapter.source, top_k=config.top_k, evidence=evidence
    )
    return Discovery(
        anchors=anchors,
        candidates=candidates,
        skipped=skipped,
        config=config,
        num_images=tally.images,
        num_tokens=tally.tokens,
        sink_layer=sink,
        cross_layer=cross,
    )
