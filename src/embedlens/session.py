"""The Python API: ``embedlens.load(model)`` returns a :class:`Session`, the facade users hold.

A :class:`Session` is a :class:`~embedlens.context.ModelContext` (the loaded model, its lenses, and
the ``prepare`` / ``probe_batch`` services every lower layer uses) with the user-facing verbs on top:
:meth:`Session.probe`, :meth:`Session.classify` and :meth:`Session.generate`. Each takes one image
and one prompt, or lists of them, the same way: a list in gives a list out. Questions go in
``prompt`` (placed through the model's chat template); the model's full text goes in ``raw_prompt``
(used verbatim; it must hold the image placeholder).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from embedlens.context import DEFAULT_PROMPT, LayerSpec, ModelContext
from embedlens.images import ImageLike
from embedlens.inputs import Texts, one_or_many
from embedlens.interventions import Intervention, InterventionRun
from embedlens.interventions.generation import check_context, generate_batch
from embedlens.models.base import ModelAdapter, PreparedBatch
from embedlens.models.loading import load_adapter
from embedlens.profiles import Profile
from embedlens.result import MultiLayerProbe, ProbeResult
from embedlens.taxonomy import Anchors, ClassifiedResult
from embedlens.taxonomy.anchors import builtin_anchors
from embedlens.taxonomy.classify import classify_batch

__all__ = ["DEFAULT_PROMPT", "Session", "load"]


def load(
    model: str = "embedlens-mini",
    *,
    device: str | None = "auto",
    dtype: str | torch.dtype = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
    profile: str | Profile | None = None,
) -> Session:
    """Load a model for probing.

    Args:
        model: Built-in name, local directory or hub id (e.g. ``"llava-hf/llava-1.5-7b-hf"``).
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda:0"``, ...
        dtype: ``"auto"`` (the checkpoint's), ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        revision: Hub revision.
        trust_remote_code: Off by default.
        device_map: Passed to ``from_pretrained`` to split a model over devices (e.g. ``"auto"``).
        profile: How the model is fed and read: ``"default"`` (the checkpoint's processor and chat template)
            or ``"paper"`` (the reference's LLaVA-1.5 settings; see :mod:`embedlens.profiles`).

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
        profile=profile,
    )
    return Session(adapter)


class Session(ModelContext):
    """A loaded model with the probe / classify / generate verbs (see :func:`load`).

    Under a profile that asks for the base vocabulary (``paper``), lenses return only ids of the base
    vocabulary the model's built-in anchors declare (LLaMA's 32000 rows for LLaVA-1.5).

    Args:
        adapter: The model's adapter.
    """

    def __init__(self, adapter: ModelAdapter) -> None:
        super().__init__(adapter)
        if adapter.profile.base_vocabulary:
            anchors = builtin_anchors(adapter.source)
            self.vocab_limit = anchors.base_vocab_size if anchors is not None else None

    def probe(
        self,
        image: ImageLike | Sequence[ImageLike],
        prompt: Texts = None,
        *,
        raw_prompt: Texts = None,
        layer: int = 0,
        layers: LayerSpec | None = None,
        top_k: int = 10,
        lens: str | Sequence[str] = "embedding",
        exclude: Iterable[str] = (),
    ) -> ProbeResult | list[ProbeResult] | MultiLayerProbe | list[MultiLayerProbe]:
        """What every visual token of ``image`` encodes, by its nearest vocabulary tokens.

        Args:
            image: Path or PIL image, or a list of them (one forward pass, left-padded).
            prompt: The user's question (one per image, or one for all); placed with the image through
                the model's chat template. Default: :data:`DEFAULT_PROMPT`.
            raw_prompt: Alternatively, the model's full text, used verbatim; must contain the image
                placeholder (e.g. ``"<image>"``).
            layer: 0 = projector output (decoder input); ``l`` = output of decoder layer ``l``;
                negative counts from the end.
            layers: Several layers from one forward pass instead: ``"all"``, ``"0,8,16"``, ``"0-32:4"``
                or a list of ints (see :meth:`~embedlens.context.ModelContext.probe_layers`).
            top_k: Tokens per visual token.
            lens: ``"embedding"`` (input embedding table, cosine) or ``"logit"`` (final norm + LM head);
                with ``layers``, also a list of both.
            exclude: Token kinds the lens never returns: ``"special"``, ``"bytes"``.

        Returns:
            A :class:`ProbeResult` for one image, a list of them for a list of images; with ``layers``, a
            :class:`~embedlens.result.MultiLayerProbe` (one row per token, layer and lens) or a list of them.

        Example:
            >>> probe = session.probe("cat.jpg", layers="0-32:8", lens=["embedding", "logit"])  # doctest: +SKIP
            >>> probe.get(16, "logit").top_tokens[0]  # doctest: +SKIP
            >>> probe.save("out/")  # tokens.parquet (lens, layer columns), result.json, view.png  # doctest: +SKIP
        """
        given = one_or_many(image, prompt, raw_prompt)
        options = {"layer": layer, "layers": layers, "top_k": top_k, "lens": lens, "exclude": exclude}
        results = self.probe_batch(given.images, given.prompts, raw_prompts=given.raw_prompts, **options)
        return given.unwrap(results)

    def classify(
        self,
        image: ImageLike | Sequence[ImageLike],
        prompt: Texts = None,
        *,
        raw_prompt: Texts = None,
        anchors: Anchors | str | Path | None = None,
        top_k: int | None = None,
        layer: int = 0,
        precedence: Sequence[str] | None = None,
    ) -> ClassifiedResult | list[ClassifiedResult]:
        """Label every visual token ViT sink, LLM sink, dead or alive (the paper's rule).

        A token joins a group when any of its ``top_k`` nearest input-embedding ids is one of the
        group's anchor ids; see :func:`embedlens.taxonomy.classify`.

        Args:
            image: Path or PIL image, or a list of them.
            prompt: The user's question (one per image, or one for all).
            raw_prompt: Alternatively, the model's full text, used verbatim.
            anchors: Anchors, an anchors JSON path, or None for the model's built-in anchors (an
                :class:`~embedlens.errors.InputError` when it has none).
            top_k: Nearest ids the rule looks at (default: the anchors' ``top_k``, 3 for LLaVA-1.5).
            layer: Layer read (0 = projector output, as in the paper).
            precedence: Group order for tokens matching several groups (default vit_sink > llm_sink > dead).

        Returns:
            A :class:`ClassifiedResult` for one image, a list of them for a list of images.
        """
        given = one_or_many(image, prompt, raw_prompt)
        results = classify_batch(
            self,
            given.images,
            given.prompts,
            raw_prompts=given.raw_prompts,
            anchors=anchors,
            top_k=top_k,
            layer=layer,
            precedence=precedence,
        )
        return given.unwrap(results)

    def generate(
        self,
        image: ImageLike | Sequence[ImageLike],
        prompt: Texts = None,
        *,
        raw_prompt: Texts = None,
        max_new_tokens: int = 32,
        interventions: Sequence[Intervention] = (),
        anchors: Anchors | str | Path | None = None,
    ) -> str | list[str]:
        """Greedy answers, in the model's prompt format.

        Batches are left-padded with the attention mask and position ids following it, so a sample's
        answer does not depend on its neighbours (up to the rounding of batched kernels).

        Args:
            image: Path or PIL image, or a list of them.
            prompt: The question (one per image, or one for all). Default: :data:`DEFAULT_PROMPT`.
            raw_prompt: Alternatively, the model's full text, used verbatim.
            max_new_tokens: Longest answer, in tokens.
            interventions: Prune / Skip / Inject / Exit / Scale objects applied while generating (see
                :func:`embedlens.interventions.intervene`, which also returns what they did).
            anchors: Anchors for group targets (default: the model's built-in anchors).

        Returns:
            The answer for one image, a list of answers for a list of images.
        """
        given = one_or_many(image, prompt, raw_prompt)
        batch = self.prepare(given.images, given.prompts, raw_prompts=given.raw_prompts)
        check_context(self, batch, max_new_tokens)
        answers, _ = self.generate_batch(
            batch, max_new_tokens=max_new_tokens, interventions=interventions, anchors=anchors
        )
        return given.unwrap(answers)

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

        See :func:`embedlens.interventions.generation.generate_batch`.
        """
        return generate_batch(
            self,
            batch,
            max_new_tokens=max_new_tokens,
            interventions=interventions,
            anchors=anchors,
            sample_ids=sample_ids,
            targets=targets,
        )
