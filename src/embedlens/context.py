"""The model context: what every layer above the adapter works with.

A :class:`ModelContext` holds one loaded model's adapter, its lenses (built on first use and cached),
and the two services the rest of the package is written against: :meth:`ModelContext.prepare` (images
and prompts to model inputs with visual-token spans) and :meth:`ModelContext.probe_batch` (the lens
over every visual token of a batch). Taxonomy, interventions, benchmarks and analyses take a context;
:class:`embedlens.session.Session` is the facade users hold, built on top of one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cached_property

import numpy as np
import torch
import transformers

from embedlens.capture import run_captured
from embedlens.errors import InputError
from embedlens.images import ImageLike, image_label, load_image
from embedlens.lens import Lens, LensOutput, lens_class, vocabulary_hash
from embedlens.models.base import ModelAdapter, PreparedBatch
from embedlens.result import ProbeResult, Provenance, config_hash

#: The prompt used when none is given.
DEFAULT_PROMPT = "Describe the image."


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
        self._lenses: dict[tuple[str, tuple[str, ...]], Lens] = {}

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

    def lens(self, name: str = "embedding", exclude: Iterable[str] = ()) -> Lens:
        """The lens called ``name`` with the given exclusions (normalised tables are cached)."""
        key = (name, tuple(sorted(set(exclude))))
        if key not in self._lenses:
            self._lenses[key] = lens_class(name)(self.adapter, exclude=key[1])
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
        top_k: int = 10,
        lens: str = "embedding",
        exclude: Iterable[str] = (),
    ) -> list[ProbeResult]:
        """What every visual token of several images encodes, in one forward pass (left-padded batch).

        Args:
            images: One image (path or PIL image) per sample.
            prompts: One question per sample (default: :data:`DEFAULT_PROMPT`).
            raw_prompts: Alternatively, the model's full text per sample, used verbatim.
            layer: 0 = projector output (decoder input); ``l`` = output of decoder layer ``l``;
                negative counts from the end.
            top_k: Tokens per visual token.
            lens: ``"embedding"`` (input embedding table, cosine) or ``"logit"`` (final norm + LM head).
            exclude: Token kinds the lens never returns: ``"special"``, ``"bytes"``.

        Returns:
            One :class:`~embedlens.result.ProbeResult` per sample, each holding ``rows * cols`` tokens.
        """
        if top_k <= 0:
            raise InputError(f"top-k must be a positive integer, got {top_k}")
        resolved = self.adapter.check_layer(layer)
        chosen = self.lens(lens, exclude)
        asked = prompt_texts(len(images), prompts, raw_prompts)
        batch = self.prepare(images, prompts, raw_prompts=raw_prompts)
        captured = run_captured(self.adapter, batch.inputs, [resolved])
        hidden = captured.hidden[resolved]
        provenance = Provenance(
            model=self.adapter.source,
            revision=getattr(self.adapter.model.config, "_commit_hash", None),
            config_hash=self.config_hash,
            vocab_hash=self.vocab_hash,
            layer=resolved,
            lens=chosen.name,
            k=top_k,
            exclude=chosen.exclude,
            dtype=str(self.adapter.model.dtype).removeprefix("torch."),
            transformers_version=transformers.__version__,
            torch_version=torch.__version__,
        )
        spans = [sample_spans[0] for sample_spans in batch.spans]
        per_sample = [hidden[i, span.positions.to(hidden.device)] for i, span in enumerate(spans)]
        # One search for every token of the batch: one shortlist matmul instead of one per image.
        everything = chosen.top_k(torch.cat(per_sample), top_k)
        results = []
        start = 0
        for sample, (span, vectors) in enumerate(zip(spans, per_sample, strict=True)):
            stop = start + span.num_tokens
            found = LensOutput(everything.ids[start:stop], everything.scores[start:stop], everything.tokens[start:stop])
            start = stop
            rows, cols = span.rows_cols()
            results.append(
                ProbeResult(
                    image=image_label(images[sample]),
                    prompt=asked[sample],
                    text=batch.texts[sample],
                    grid=span.grid,
                    index=np.arange(span.num_tokens, dtype=np.int64),
                    row=rows.numpy(),
                    col=cols.numpy(),
                    position=span.positions.numpy().astype(np.int64),
                    norm=vectors.float().norm(dim=-1).cpu().numpy(),
                    top_ids=found.ids.cpu().numpy(),
                    top_tokens=found.tokens,
                    top_sims=found.scores.cpu().numpy(),
                    provenance=provenance,
                    view=batch.views[span.global_image],
                )
            )
        return results
