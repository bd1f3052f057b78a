"""The model context: what every layer above the adapter works with.

A :class:`ModelContext` holds one loaded model's adapter, its lenses (built on first use and cached),
and the two services the rest of the package is written against: :meth:`ModelContext.prepare` (images
and prompts to model inputs with visual-token spans) and :meth:`ModelContext.probe_batch` (the lens
over every visual token of a batch). Taxonomy, interventions, benchmarks and analyses take a context;
:class:`embedlens.session.Session` is the facade users hold, built on top of one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import cached_property

import numpy as np
import torch
import transformers

from embedlens.capture import run_captured
from embedlens.errors import InputError
from embedlens.images import ImageLike, image_label, load_image
from embedlens.lens import Lens, LensOutput, lens_class, vocabulary_hash
from embedlens.models.base import ModelAdapter, PreparedBatch, VisualSpan, resolve_layer
from embedlens.result import MultiLayerProbe, ProbeResult, Provenance, config_hash, with_layer
from embedlens.views import views_from_spans

#: The prompt used when none is given.
DEFAULT_PROMPT = "Describe the image."
#: One part of a layer list: a layer (negative counts from the end), or a range ``a-b`` with an optional step.
_LAYER_PART = re.compile(r"(?P<first>-?\d+)(?:-(?P<last>\d+)(?::(?P<step>\d+))?)?")
#: Layers as the CLI spells them (``"all"``, ``"0,8,16"``, ``"0-32:4"``), one layer, or a list of layers.
LayerSpec = str | int | Sequence[int]


def parse_layers(spec: LayerSpec, num_layers: int) -> tuple[int, ...]:
    """The layers ``spec`` names, resolved to ``0 .. num_layers``, ascending and unique.

    ``spec`` is ``"all"`` (every layer ``0 .. L``), comma-separated parts each a layer (``"16"``, or
    ``"-1"`` counting from the end), a range ``"0-32"`` (both ends included) or a range with a step
    ``"0-32:4"`` (0, 4, ..., 32); or an int, or a sequence of ints (negatives count from the end).

    Raises:
        InputError: For a malformed spelling, an empty or reversed range, a step below 1, or a layer
            out of range for the model.
    """
    if isinstance(spec, bool):
        raise InputError(f"layers must be numbers or text like 0,8,16, got {spec!r}")
    if isinstance(spec, int):
        return (resolve_layer(spec, num_layers),)
    if not isinstance(spec, str):
        listed = tuple(sorted({resolve_layer(int(layer), num_layers) for layer in spec}))
        if not listed:
            raise InputError("no layers given")
        return listed
    text = spec.strip()
    if text == "all":
        return tuple(range(num_layers + 1))
    layers: set[int] = set()
    for part in text.split(","):
        match = _LAYER_PART.fullmatch(part.strip())
        if match is None:
            raise InputError(f"layers are written like all, 0,8,16 or 0-32:4; cannot read {part!r} in {spec!r}")
        first = int(match["first"])
        last = int(match["last"]) if match["last"] is not None else first
        stride = int(match["step"]) if match["step"] is not None else 1
        if match["last"] is not None and (first < 0 or last < first):
            raise InputError(f"layer range {part.strip()!r} must run upwards from a layer >= 0")
        if stride < 1:
            raise InputError(f"a layer step must be at least 1, got {part.strip()!r}")
        layers.update(resolve_layer(layer, num_layers) for layer in range(first, last + 1, stride))
    return tuple(sorted(layers))


def prompt_texts(count: int, prompts: Sequence[str] | None, raw_prompts: Sequence[str] | None) -> list[str]:
    """The text of each of ``count`` samples: the raw prompts, the questions, or the default question.

    Raises:
        InputError: When both kinds are given, or their number differs from ``count``.
    """
    if prompts is not None and raw_prompts is not None:
        raise InputError("give either prompts or raw prompts, not both")
    given = raw_prompts if raw_prompts is not None else prompts
    asked = list(given) if given is not None else [DEFAULT_PROMPT] * count
    if len(asked) != count:
        raise InputError(f"{count} images but {len(asked)} prompts")
    return asked


class ModelContext:
    """A loaded model with its lenses (built on first use and cached).

    Args:
        adapter: The model's adapter (see :func:`embedlens.models.load_adapter`).
    """

    def __init__(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter
        #: Lenses return only ids below this unless told otherwise (None: every row the tokenizer has).
        self.vocab_limit: int | None = None
        self._lenses: dict[tuple[str, tuple[str, ...], int | None], Lens] = {}

    @property
    def model(self) -> torch.nn.Module:
        """The underlying ``transformers`` model."""
        return self.adapter.model

    @property
    def num_layers(self) -> int:
        """Number of decoder layers; probe layers run ``0 .. num_layers``."""
        return self.adapter.num_layers

    @cached_property
    def vocab_hash(self) -> str:
        """SHA-256 of the tokenizer vocabulary."""
        return vocabulary_hash(self.adapter.tokenizer)

    @cached_property
    def config_hash(self) -> str:
        """SHA-256 of the model config."""
        return config_hash(self.adapter.model.config)

    @property
    def model_identity(self) -> dict[str, str]:
        """What identifies the loaded model and how it is fed, for run identities and summaries: the name, the
        config and vocabulary hashes and the profile."""
        return {
            "model": self.adapter.source,
            "config_hash": self.config_hash,
            "vocab_hash": self.vocab_hash,
            "profile": self.adapter.profile.name,
        }

    def lens(self, name: str = "embedding", exclude: Iterable[str] = (), vocab_limit: int | None = None) -> Lens:
        """The lens called ``name`` with the given exclusions (normalised tables are cached).

        ``vocab_limit`` restricts it to ids below that (a base vocabulary); None means :attr:`vocab_limit`.
        """
        limit = self.vocab_limit if vocab_limit is None else vocab_limit
        key = (name, tuple(sorted(set(exclude))), limit)
        if key not in self._lenses:
            self._lenses[key] = lens_class(name)(self.adapter, exclude=key[1], vocab_limit=limit)
        return self._lenses[key]

    def prepare(
        self,
        images: Sequence[ImageLike],
        prompts: Sequence[str] | None = None,
        *,
        raw_prompts: Sequence[str] | None = None,
    ) -> PreparedBatch:
        """Model inputs for one image per sample, with visual-token spans.

        Args:
            images: One image (path or PIL image) per sample.
            prompts: One question per sample, placed with the image through the model's chat template
                (default: :data:`DEFAULT_PROMPT` for every sample).
            raw_prompts: Alternatively, the model's full text per sample, used verbatim; each must hold
                the image placeholder.
        """
        asked = prompt_texts(len(images), prompts, raw_prompts)
        loaded = [[load_image(image)] for image in images]
        return self.adapter.prepare(loaded, asked, raw=raw_prompts is not None)

    def probe_batch(
        self,
        images: Sequence[ImageLike],
        prompts: Sequence[str] | None = None,
        *,
        raw_prompts: Sequence[str] | None = None,
        layer: int = 0,
        layers: LayerSpec | None = None,
        top_k: int = 10,
        lens: str | Sequence[str] = "embedding",
        exclude: Iterable[str] = (),
        vocab_limit: int | None = None,
    ) -> list[ProbeResult] | list[MultiLayerProbe]:
        """What every visual token of several images encodes, in one forward pass (left-padded batch).

        Args:
            images: One image (path or PIL image) per sample.
            prompts: One question per sample (default: :data:`DEFAULT_PROMPT`).
            raw_prompts: Alternatively, the model's full text per sample, used verbatim.
            layer: 0 = projector output (decoder input); ``l`` = output of decoder layer ``l``;
                negative counts from the end.
            layers: Several layers instead (see :func:`parse_layers`: ``"all"``, ``"0,8,16"``,
                ``"0-32:4"`` or a list of ints); then the result per sample is a
                :class:`~embedlens.result.MultiLayerProbe` (see :meth:`probe_layers`).
            top_k: Tokens per visual token.
            lens: ``"embedding"`` (input embedding table, cosine) or ``"logit"`` (final norm + LM head);
                with ``layers``, also a list of both.
            exclude: Token kinds the lens never returns: ``"special"``, ``"bytes"``.
            vocab_limit: Return only ids below this (a base vocabulary; default: :attr:`vocab_limit`).

        Returns:
            One :class:`~embedlens.result.ProbeResult` per sample, each holding the ``rows * cols`` grid
            tokens of every view of its image;
            with ``layers``, one :class:`~embedlens.result.MultiLayerProbe` per sample.
        """
        if layers is not None:
            if layer != 0:
                raise InputError("give either layer or layers, not both")
            options = {"top_k": top_k, "lens": lens, "exclude": exclude, "vocab_limit": vocab_limit}
            return self.probe_layers(images, prompts, raw_prompts=raw_prompts, layers=layers, **options)
        if not isinstance(lens, str):
            raise InputError("several lenses need layers= (e.g. layers=[0])")
        per_sample = self._probe_forward(images, prompts, raw_prompts, (layer,), (lens,), top_k, exclude, vocab_limit)
        return [results[0] for results in per_sample]

    def probe_layers(
        self,
        images: Sequence[ImageLike],
        prompts: Sequence[str] | None = None,
        *,
        raw_prompts: Sequence[str] | None = None,
        layers: LayerSpec = "all",
        top_k: int = 10,
        lens: str | Sequence[str] = "embedding",
        exclude: Iterable[str] = (),
        vocab_limit: int | None = None,
    ) -> list[MultiLayerProbe]:
        """Every visual token at several layers, with one or both lenses, from ONE forward pass.

        Each (layer, lens) is searched exactly as :meth:`probe_batch` searches one layer (same ids and
        scores). Hooks keep each requested layer's residual stream (``[B, T, d]``, model dtype) until its
        visual rows are copied out; the lens then runs layer by layer, so only one layer's search
        scratch is alive at a time.

        Memory bound (beyond the model): ``len(layers) * B * T * d * itemsize`` for the captured states
        (LLaVA-1.5-7B in float16, one image, T ~ 600, d = 4096, all 33 layers: ~160 MiB), plus one
        search's scratch (:attr:`~embedlens.nearest.ExactSearch.search_memory_bound`, 197 MiB at
        32000 x 4096), plus the results (``n * k`` ids and scores per layer and lens: 576 x 10 x 33 x 16
        bytes ~ 3 MiB, and the token strings). Time: one forward (stopping after the last requested
        layer) plus one exact search per layer and lens.

        Args:
            images: One image (path or PIL image) per sample.
            prompts: One question per sample (default: :data:`DEFAULT_PROMPT`).
            raw_prompts: Alternatively, the model's full text per sample, used verbatim.
            layers: ``"all"``, ``"0,8,16"``, ``"0-32:4"``, an int or a list of ints (see :func:`parse_layers`).
            top_k: Tokens per visual token.
            lens: ``"embedding"``, ``"logit"``, or a list of both.
            exclude: Token kinds the lenses never return.
            vocab_limit: Return only ids below this (default: :attr:`vocab_limit`).

        Returns:
            One :class:`~embedlens.result.MultiLayerProbe` per sample.
        """
        chosen = parse_layers(layers, self.adapter.num_layers)
        names = (lens,) if isinstance(lens, str) else tuple(dict.fromkeys(lens))
        if not names:
            raise InputError("no lens given")
        per_sample = self._probe_forward(images, prompts, raw_prompts, chosen, names, top_k, exclude, vocab_limit)
        return [MultiLayerProbe(results) for results in per_sample]

    def _probe_forward(
        self,
        images: Sequence[ImageLike],
        prompts: Sequence[str] | None,
        raw_prompts: Sequence[str] | None,
        layers: Sequence[int],
        lenses: Sequence[str],
        top_k: int,
        exclude: Iterable[str],
        vocab_limit: int | None,
    ) -> list[list[ProbeResult]]:
        """One forward pass; per sample, one result per (lens, layer), lens-major, layers as given."""
        if top_k <= 0:
            raise InputError(f"top-k must be a positive integer, got {top_k}")
        resolved = [self.adapter.check_layer(layer) for layer in layers]
        chosen = [self.lens(name, exclude, vocab_limit) for name in lenses]
        asked = prompt_texts(len(images), prompts, raw_prompts)
        batch = self.prepare(images, prompts, raw_prompts=raw_prompts)
        captured = run_captured(self.adapter, batch.inputs, resolved)
        # Every view of the sample's image: its grid tokens in sequence order, view after view.
        spans = batch.spans
        positions = [
            torch.cat([span.positions for span in sample_spans]) if sample_spans else torch.zeros(0, dtype=torch.long)
            for sample_spans in spans
        ]
        # Copy out the visual rows of each layer and let the full [B, T, d] state go at once.
        visual: dict[int, list[torch.Tensor]] = {}
        for layer in resolved:
            hidden = captured.hidden.pop(layer)
            visual[layer] = [hidden[i, where.to(hidden.device)] for i, where in enumerate(positions)]
            del hidden
        provenance = Provenance(
            model=self.adapter.source,
            revision=getattr(self.adapter.model.config, "_commit_hash", None),
            config_hash=self.config_hash,
            vocab_hash=self.vocab_hash,
            layer=resolved[0],
            lens=chosen[0].name,
            k=top_k,
            exclude=chosen[0].exclude,
            dtype=str(self.adapter.model.dtype).removeprefix("torch."),
            transformers_version=transformers.__version__,
            torch_version=torch.__version__,
            profile=self.adapter.profile.name,
            vocab_limit=chosen[0].vocab_limit,
            rows_left_out=chosen[0].rows_left_out,
        )
        out: list[list[ProbeResult]] = [[] for _ in spans]
        for lens in chosen:
            for layer in resolved:
                per_sample = visual[layer]
                # One search for every token of the batch: one shortlist matmul instead of one per image.
                everything = lens.top_k(torch.cat(per_sample), top_k)
                start = 0
                for sample, (sample_spans, vectors) in enumerate(zip(spans, per_sample, strict=True)):
                    stop = start + int(vectors.shape[0])
                    found = LensOutput(
                        everything.ids[start:stop], everything.scores[start:stop], everything.tokens[start:stop]
                    )
                    start = stop
                    out[sample].append(
                        self._result(
                            images[sample],
                            asked[sample],
                            batch,
                            sample_spans,
                            vectors,
                            found,
                            with_layer(provenance, layer, lens.name),
                        )
                    )
                del everything
        return out

    def _result(
        self,
        image: ImageLike,
        prompt: str,
        batch: PreparedBatch,
        spans: Sequence[VisualSpan],
        vectors: torch.Tensor,
        found: LensOutput,
        provenance: Provenance,
    ) -> ProbeResult:
        """One sample's :class:`ProbeResult` from its spans (one per view, in sequence order), the grid
        tokens' visual vectors ``[n, d]`` (views laid end to end) and their top-k."""
        if not spans:
            raise InputError(f"sample {image_label(image)!r} has no visual tokens to probe")
        cells = [span.rows_cols() for span in spans]
        pictures = tuple(batch.views[s.picture] if 0 <= s.picture < len(batch.views) else None for s in spans)
        return ProbeResult(
            image=image_label(image),
            prompt=prompt,
            text=batch.texts[spans[0].sample],
            grid=spans[0].grid,
            index=np.concatenate([np.arange(span.num_tokens, dtype=np.int64) for span in spans]),
            row=torch.cat([rows for rows, _ in cells]).numpy(),
            col=torch.cat([cols for _, cols in cells]).numpy(),
            position=torch.cat([span.positions for span in spans]).numpy().astype(np.int64),
            norm=vectors.float().norm(dim=-1).cpu().numpy(),
            top_ids=found.ids.cpu().numpy(),
            top_tokens=found.tokens,
            top_sims=found.scores.cpu().numpy(),
            provenance=provenance,
            view=pictures[0],
            views=views_from_spans(spans),
            pictures=pictures,
        )
