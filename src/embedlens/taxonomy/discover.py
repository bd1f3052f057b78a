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
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from embedlens.capture import Captured, run_captured
from embedlens.context import DEFAULT_PROMPT
from embedlens.errors import InputError
from embedlens.images import ImageLike, image_label, load_image
from embedlens.lens import pieces
from embedlens.models.base import VisualSpan
from embedlens.taxonomy.anchors import Anchors
from embedlens.taxonomy.diagnostics import _vision_features, cosine
from embedlens.taxonomy.groups import GROUPS

if TYPE_CHECKING:
    from embedlens.context import ModelContext

#: ``"method"`` value written into the anchors' evidence.
DISCOVERY_METHOD = "embedlens.taxonomy.discover_anchors"
_TINY = torch.finfo(torch.float64).tiny


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class DiscoveryConfig:
    """Thresholds and layers of anchor discovery (see the module docs for each figure).

    Attributes:
        top_k: Nearest ids per visual token, as in the rule the anchors will serve (paper: 3).
        min_image_fraction: A candidate must hit at least this fraction of the images (default 0.5).
        min_images: ... and at least this many images (default 2; independence needs two).
        min_independence: Mean cross-image cosine of the per-image mean vectors below which a
            candidate is image-dependent and rejected (default 0.9).
        vit_norm_ratio: Vision-feature norm over the image's median norm from which a candidate's
            tokens are ViT sinks (default 3.0).
        sink_layer: Layer whose hidden states show LLM sinks (default 2: after the 2nd decoder layer,
            whose MLP makes them in LLaVA-1.5); clipped to ``1 .. L``.
        llm_bos_cosine: Cosine with the first position's hidden state from which the tokens are LLM
            sinks (default 0.6).
        llm_massive_ratio: Massive-activation ratio (vs the image's other visual tokens) from which
            the tokens are LLM sinks (default 10.0).
        cross_layer: Layer compared with layer 0 for dead tokens (``1 .. L``, negative from the end),
            or None for the middle layer ``L // 2`` (at least 1).
        dead_cross_cosine: Cross-layer cosine from which a recurring, image-independent, non-sink
            candidate is dead (default 0.9).
        follower_overlap: Fraction of a candidate's hitting tokens that must also hit a stronger id of
            its group for it to be dropped as that id's follower (default 0.9).
    """

    top_k: int = 3
    min_image_fraction: float = 0.5
    min_images: int = 2
    min_independence: float = 0.9
    vit_norm_ratio: float = 3.0
    sink_layer: int = 2
    llm_bos_cosine: float = 0.6
    llm_massive_ratio: float = 10.0
    cross_layer: int | None = None
    dead_cross_cosine: float = 0.9
    follower_overlap: float = 0.9

    def __post_init__(self) -> None:
        for name in ("top_k", "min_images", "sink_layer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        cross = self.cross_layer
        if cross is not None and (isinstance(cross, bool) or not isinstance(cross, int)):
            raise InputError(f"cross_layer must be an integer or None, got {self.cross_layer!r}")
        for name in ("min_image_fraction", "follower_overlap"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
                raise InputError(f"{name} must be a number in (0, 1], got {value!r}")
        for name in ("min_independence", "vit_norm_ratio", "llm_bos_cosine", "llm_massive_ratio", "dead_cross_cosine"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise InputError(f"{name} must be a finite number, got {value!r}")

    def layers(self, num_layers: int) -> tuple[int, int]:
        """``(sink_layer, cross_layer)`` resolved for a model of ``num_layers`` decoder layers, each in ``1 .. L``."""
        sink = min(max(self.sink_layer, 1), num_layers)
        if self.cross_layer is None:
            return sink, max(num_layers // 2, 1)
        cross = self.cross_layer + num_layers + 1 if self.cross_layer < 0 else self.cross_layer
        if not 1 <= cross <= num_layers:
            raise InputError(
                f"cross_layer {self.cross_layer} is out of range: use 1..{num_layers} (or -{num_layers}..-1)"
            )
        return sink, cross

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict."""
        return asdict(self)


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


# --------------------------------------------------------------------------- streaming tally
_FIGURES = ("norm_ratio", "bos_cosine", "massive_ratio", "cross_layer_cosine")


@dataclass
class _Tally:
    """Running sums per vocabulary id over every visual token read so far (see :meth:`add`)."""

    vocab_rows: int
    dim: int
    images: int = 0
    tokens: int = 0
    images_hit: np.ndarray = field(init=False)
    tokens_hit: np.ndarray = field(init=False)
    nearest_hit: np.ndarray = field(init=False)
    sums: dict[str, np.ndarray] = field(init=False)
    #: Id -> row of ``unit_sum`` (-1: never hit).
    row_of: np.ndarray = field(init=False)
    #: Per hit id, the sum over images of the unit per-image mean layer-0 vector, ``[rows, d]`` float32.
    unit_sum: torch.Tensor = field(init=False)
    used_rows: int = 0
    #: Sorted keys ``a * V + b`` (``a < b``) of id pairs sharing a token's top-k, and their token counts.
    pair_keys: np.ndarray = field(init=False)
    pair_counts: np.ndarray = field(init=False)
    pending: list[np.ndarray] = field(default_factory=list)
    pending_size: int = 0

    def __post_init__(self) -> None:
        size = self.vocab_rows
        self.images_hit = np.zeros(size, dtype=np.int64)
        self.tokens_hit = np.zeros(size, dtype=np.int64)
        self.nearest_hit = np.zeros(size, dtype=np.int64)
        self.sums = {name: np.zeros(size, dtype=np.float64) for name in _FIGURES}
        self.row_of = np.full(size, -1, dtype=np.int64)
        self.unit_sum = torch.zeros(0, self.dim, dtype=torch.float32)
        self.pair_keys = np.zeros(0, dtype=np.int64)
        self.pair_counts = np.zeros(0, dtype=np.int64)

    def add(
        self,
        num_images: int,
        ids: torch.Tensor,
        image_of: torch.Tensor,
        first: torch.Tensor,
        figures: dict[str, np.ndarray],
    ) -> None:
        """Count one batch of images.

        Args:
            num_images: Images in the batch.
            ids: Top-k ids per token, best first, shape ``[n, k]`` (int64).
            image_of: Image of each token within the batch (``0 .. num_images - 1``), shape ``[n]``.
            first: Layer-0 vectors, shape ``[n, d]`` (any device and dtype).
            figures: Per-token figures named as in ``_FIGURES``, float64 arrays of shape ``[n]``.
        """
        ids = ids.detach().cpu().long()
        image_of = image_of.detach().cpu().long()
        n, k = ids.shape
        size = self.vocab_rows
        flat = ids.reshape(-1).numpy()  # [n * k], token-major
        token_of = np.repeat(np.arange(n), k)
        self.tokens += n
        self.images += num_images
        self.tokens_hit += np.bincount(flat, minlength=size)
        self.nearest_hit += np.bincount(ids[:, 0].numpy(), minlength=size)
        for name in _FIGURES:
            self.sums[name] += np.bincount(flat, weights=figures[name][token_of], minlength=size)

        # per (image, id): the mean layer-0 vector of the hitting tokens, as a unit vector
        keys = (image_of.unsqueeze(1) * size + ids).reshape(-1)  # [n * k]
        unique_keys, inverse = torch.unique(keys, return_inverse=True)
        inverse = inverse.view(n, k).to(first.device)
        vectors = first.detach().float()
        means = torch.zeros(unique_keys.numel(), vectors.shape[1], dtype=torch.float32, device=vectors.device)
        for rank in range(k):
            means.index_add_(0, inverse[:, rank], vectors)
        units = means / means.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        pair_ids = unique_keys % size
        self.images_hit += np.bincount(pair_ids.numpy(), minlength=size)
        hit_ids, back = torch.unique(pair_ids, return_inverse=True)
        per_id = torch.zeros(hit_ids.numel(), units.shape[1], dtype=torch.float32, device=units.device)
        per_id.index_add_(0, back.to(units.device), units)
        rows = torch.from_numpy(self._rows(hit_ids.numpy()))  # may grow unit_sum: before reading it
        self.unit_sum.index_add_(0, rows, per_id.cpu())

        # id pairs sharing a token's top-k (to spot followers)
        for a in range(k):
            for b in range(a + 1, k):
                low = torch.minimum(ids[:, a], ids[:, b])
                high = torch.maximum(ids[:, a], ids[:, b])
                self.pending.append((low * size + high).numpy())
                self.pending_size += n
        if self.pending_size > max(1_000_000, self.pair_keys.size):
            self._compact()

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows of ``unit_sum`` for ``ids``, allocating rows for ids never hit before."""
        new = ids[self.row_of[ids] < 0]
        if new.size:
            self.row_of[new] = np.arange(self.used_rows, self.used_rows + new.size)
            self.used_rows += new.size
            if self.used_rows > self.unit_sum.shape[0]:
                capacity = max(self.used_rows, self.unit_sum.shape[0] * 3 // 2, 256)
                grown = torch.zeros(capacity, self.dim, dtype=torch.float32)
                grown[: self.unit_sum.shape[0]] = self.unit_sum
                self.unit_sum = grown
        return self.row_of[ids]

    def _compact(self) -> None:
        if not self.pending:
            return
        keys = np.concatenate([self.pair_keys, *self.pending])
        counts = np.concatenate([self.pair_counts, *(np.ones(len(p), dtype=np.int64) for p in self.pending)])
        self.pair_keys, inverse = np.unique(keys, return_inverse=True)
        self.pair_counts = np.bincount(inverse, weights=counts, minlength=self.pair_keys.size).astype(np.int64)
        self.pending, self.pending_size = [], 0

    def shared_tokens(self, a: int, b: int) -> int:
        """Tokens whose top-k holds both ids ``a`` and ``b``."""
        self._compact()
        key = min(a, b) * self.vocab_rows + max(a, b)
        where = int(np.searchsorted(self.pair_keys, key))
        return int(self.pair_counts[where]) if where < self.pair_keys.size and self.pair_keys[where] == key else 0

    def independence(self, token_id: int) -> float:
        """Mean cosine over pairs of images between the id's per-image mean vectors (NaN below 2 images)."""
        count = int(self.images_hit[token_id])
        if count < 2:
            return float("nan")
        total = self.unit_sum[int(self.row_of[token_id])].double()
        value = (float(total @ total) - count) / (count * (count - 1))
        return min(max(value, -1.0), 1.0)


# --------------------------------------------------------------------------- per-batch figures
def _first_valid(mask: torch.Tensor | None, sample: int) -> int:
    """The first non-padding position of ``sample`` (batches are left-padded)."""
    if mask is None:
        return 0
    valid = torch.nonzero(mask[sample]).flatten()
    return int(valid[0]) if valid.numel() else 0


def _peak_ratio(hidden: torch.Tensor) -> torch.Tensor:
    """``max |dim| / median |dim|`` of each vector ``[n, d]`` in float64, shape ``[n]``."""
    magnitude = hidden.double().abs()
    return magnitude.max(dim=1).values / magnitude.median(dim=1).values.clamp_min(_TINY)


def _relative(values: torch.Tensor) -> torch.Tensor:
    """``values`` ``[n]`` divided by their median."""
    return values / values.median().clamp_min(_TINY)


def _sample_figures(
    captured: Captured, sample: int, spans: list[VisualSpan], first_position: int, sink: int, cross: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One sample's layer-0 visual vectors ``[n, d]`` and per-token figures (float64, shape ``[n]`` each)."""
    device = captured.hidden[0].device
    positions = torch.cat([span.positions for span in spans]).to(device)
    first = captured.hidden[0][sample, positions]
    at_sink = captured.hidden[sink][sample, positions]
    reference = captured.hidden[sink][sample, first_position].unsqueeze(0).expand_as(at_sink)
    norms = [_vision_features(captured.vision_features, span).double().norm(dim=-1) for span in spans]
    figures = {
        "norm_ratio": torch.cat([_relative(norm) for norm in norms]).to(device),
        "bos_cosine": cosine(at_sink, reference),
        "massive_ratio": _relative(_peak_ratio(at_sink)),
        "cross_layer_cosine": cosine(first, captured.hidden[cross][sample, positions]),
    }
    return first, figures


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
            first, values = _sample_figures(captured, sample, spans, _first_valid(mask, sample), sink, cross)
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


def _judge(figures: dict[str, float], config: DiscoveryConfig, sink: int, cross: int) -> tuple[str | None, str]:
    """The group a candidate's figures point to, and why (or why none)."""
    independence = figures["independence"]
    if not independence >= config.min_independence:  # NaN included
        return None, f"image-dependent: independence {independence:.3f} < {config.min_independence}"
    if figures["norm_ratio"] >= config.vit_norm_ratio:
        return "vit_sink", (
            f"vision-feature norm {figures['norm_ratio']:.2f}x the image median (>= {config.vit_norm_ratio})"
        )
    bos, massive = figures["bos_cosine"], figures["massive_ratio"]
    signs = []
    if bos >= config.llm_bos_cosine:
        signs.append(f"cosine {bos:.3f} with the first position (>= {config.llm_bos_cosine})")
    if massive >= config.llm_massive_ratio:
        signs.append(f"massive activation {massive:.2f}x (>= {config.llm_massive_ratio})")
    if signs:
        return "llm_sink", f"at layer {sink}: " + " and ".join(signs)
    value = figures["cross_layer_cosine"]
    if value >= config.dead_cross_cosine:
        return "dead", f"not a sink; cosine {value:.3f} between layers 0 and {cross} (>= {config.dead_cross_cosine})"
    return None, f"not a sink and changes across layers: cosine {value:.3f} between layers 0 and {cross}"


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
