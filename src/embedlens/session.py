"""The Python API: ``embedlens.load(model)`` returns a :class:`Session` that probes images."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import transformers

from embedlens.capture import run_captured
from embedlens.errors import InputError
from embedlens.images import ImageLike, image_label, load_image
from embedlens.lens import Lens, LensOutput, lens_class, vocabulary_hash
from embedlens.models.base import ModelAdapter, PreparedBatch
from embedlens.models.registry import load_adapter
from embedlens.result import ProbeResult, Provenance, config_hash

if TYPE_CHECKING:
    from embedlens.interventions import Intervention, InterventionRun
    from embedlens.taxonomy import Anchors, ClassifiedResult

DEFAULT_PROMPT = "Describe the image."


def load(
    model: str = "embedlens-mini",
    *,
    device: str | None = "auto",
    dtype: str | torch.dtype = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
) -> Session:
    """Load a model for probing.

    Args:
        model: Built-in name, local directory or hub id (e.g. ``"llava-hf/llava-1.5-7b-hf"``).
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda:0"``, ...
        dtype: ``"auto"`` (the checkpoint's), ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        revision: Hub revision.
        trust_remote_code: Off by default.
        device_map: Passed to ``from_pretrained`` to split a model over devices (e.g. ``"auto"``).

    Example:
        >>> import embedlens
        >>> session = embedlens.load("llava-hf/llava-1.5-7b-hf")  # doctest: +SKIP
        >>> result = session.probe("cat.jpg", prompt="What is this?", top_k=3)  # doctest: +SKIP
        >>> result.to_pandas().head()  # doctest: +SKIP
    """
    adapter = load_adapter(
        model,
        device=device,
        dtype=dtype,
        revision=revision,
        trust_remote_code=trust_remote_code,
        device_map=device_map,
    )
    return Session(adapter)


class Session:
    """A loaded model with its lenses (built on first use and cached).

    Args:
        adapter: The model's adapter (see :func:`load`).
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
        self, images: Sequence[ImageLike], prompts: Sequence[str] | None = None, *, raw: bool = False
    ) -> PreparedBatch:
        """Model inputs for one image per sample, with visual-token spans."""
        prompts = list(prompts) if prompts is not None else [DEFAULT_PROMPT] * len(images)
        if len(prompts) != len(images):
            raise InputError(f"{len(images)} images but {len(prompts)} prompts")
        loaded = [[load_image(image)] for image in images]
        return self.adapter.prepare(loaded, prompts, raw=raw)

    def generate(
        self,
        images: Sequence[ImageLike],
        prompts: Sequence[str],
        *,
        raw: bool = False,
        max_new_tokens: int = 32,
        interventions: Sequence[Intervention] = (),
        anchors: Anchors | str | Path | None = None,
    ) -> list[str]:
        """Greedy answers, one per (image, prompt) pair, in the model's prompt format.

        Batches are left-padded with the attention mask and position ids following it, so a sample's
        answer does not depend on its neighbours (up to the rounding of batched kernels).

        Args:
            images: One image per sample.
            prompts: One question per sample (or the model's full text with ``raw=True``).
            raw: Use the prompts verbatim.
            max_new_tokens: Longest answer, in tokens.
            interventions: Prune / Skip / Inject / Exit / Scale objects applied while generating (see
                :func:`embedlens.interventions.intervene`, which also returns what they did).
            anchors: Anchors for group targets (default: the model's built-in anchors).
        """
        batch = self.prepare(images, prompts, raw=raw)
        answers, _ = self.generate_batch(
            batch, max_new_tokens=max_new_tokens, interventions=interventions, anchors=anchors
        )
        return answers

    def generate_batch(
        self,
        batch: PreparedBatch,
        *,
        max_new_tokens: int = 32,
        interventions: Sequence[Intervention] = (),
        anchors: Anchors | str | Path | None = None,
        sample_ids: Sequence[int] | None = None,
        targets: Sequence[Sequence[int]] | None = None,
    ) -> tuple[list[str], InterventionRun]:
        """Greedy answers for a prepared batch, and the record of what the interventions did.

        ``sample_ids`` and ``targets`` are passed to :func:`embedlens.interventions.intervene`.
        """
        if max_new_tokens <= 0:
            raise InputError(f"max_new_tokens must be positive, got {max_new_tokens}")
        from embedlens.interventions import intervene

        with (
            intervene(self, interventions, anchors=anchors, sample_ids=sample_ids, targets=targets) as run,
            torch.inference_mode(),
        ):
            output = self.adapter.model.generate(
                **batch.inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1
            )
        new_tokens = output[:, batch.inputs["input_ids"].shape[1] :]
        texts = self.adapter.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [text.strip() for text in texts], run

    def probe(
        self,
        image: ImageLike,
        prompt: str | None = None,
        *,
        raw_prompt: str | None = None,
        layer: int = 0,
        top_k: int = 10,
        lens: str = "embedding",
        exclude: Iterable[str] = (),
    ) -> ProbeResult:
        """What every visual token of ``image`` encodes, by its nearest vocabulary tokens.

        Args:
            image: Path or PIL image.
            prompt: The user's question; placed with the image through the model's chat template.
            raw_prompt: Alternatively, the model's full text, used verbatim; must contain the image
                placeholder (e.g. ``"<image>"``).
            layer: 0 = projector output (decoder input); ``l`` = output of decoder layer ``l``;
                negative counts from the end.
            top_k: Tokens per visual token.
            lens: ``"embedding"`` (input embedding table, cosine) or ``"logit"`` (final norm + LM head).
            exclude: Token kinds the lens never returns: ``"special"``, ``"bytes"``.
        """
        return self.probe_batch(
            [image],
            None if prompt is None else [prompt],
            raw_prompts=None if raw_prompt is None else [raw_prompt],
            layer=layer,
            top_k=top_k,
            lens=lens,
            exclude=exclude,
        )[0]

    def classify(
        self,
        image: ImageLike,
        prompt: str | None = None,
        *,
        raw_prompt: str | None = None,
        anchors: Anchors | str | Path | None = None,
        top_k: int | None = None,
        layer: int = 0,
        precedence: Sequence[str] | None = None,
    ) -> ClassifiedResult:
        """Label every visual token ViT sink, LLM sink, dead or alive (the paper's rule).

        A token joins a group when any of its ``top_k`` nearest input-embedding ids is one of the
        group's anchor ids; see :func:`embedlens.taxonomy.classify`.

        Args:
            image: Path or PIL image.
            prompt: The user's question; or ``raw_prompt``, the model's full text with the placeholder.
            raw_prompt: The model's full text, used verbatim.
            anchors: Anchors, an anchors JSON path, or None for the model's built-in anchors (an
                :class:`~embedlens.errors.InputError` when it has none).
            top_k: Nearest ids the rule looks at (default: the anchors' ``top_k``, 3 for LLaVA-1.5).
            layer: Layer read (0 = projector output, as in the paper).
            precedence: Group order for tokens matching several groups (default vit_sink > llm_sink > dead).
        """
        from embedlens.taxonomy.classify import classify

        return classify(
            self,
            image,
            prompt,
            raw_prompt=raw_prompt,
            anchors=anchors,
            top_k=top_k,
            layer=layer,
            precedence=precedence,
        )

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
        """:meth:`probe` for several images in one forward pass (left-padded batch)."""
        if prompts is not None and raw_prompts is not None:
            raise InputError("give either prompts or raw prompts, not both")
        if top_k <= 0:
            raise InputError(f"top-k must be a positive integer, got {top_k}")
        resolved = self.adapter.check_layer(layer)
        chosen = self.lens(lens, exclude)
        raw = raw_prompts is not None
        asked = list(raw_prompts) if raw else list(prompts) if prompts is not None else [DEFAULT_PROMPT] * len(images)
        batch = self.prepare(images, asked, raw=raw)
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
