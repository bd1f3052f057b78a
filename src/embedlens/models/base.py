"""The adapter interface: where each model family keeps its parts and its visual tokens.

Everything above this layer (lenses, taxonomy, interventions, benchmarks) is written once against
:class:`ModelAdapter`. A new model family needs one adapter file that answers these questions:

* which modules are the vision tower, the projector, the decoder layers (with their attention and MLP
  submodules), the input embedding table, the final norm and the LM head;
* how a user's prompt becomes the model's text (chat template and image placeholder);
* where, in each sample's token ids, each image's visual tokens sit, and on what patch grid.

Layer numbering (used everywhere in EmbedLens) follows ``transformers``' ``hidden_states``: layer 0 is
the input of the first decoder layer (for visual tokens, the projector output), layer ``l`` is the
output of decoder layer ``l`` (1-based), so layers run ``0 .. num_layers``. One difference: for the
last layer, ``transformers`` returns the output *after* the final norm, while EmbedLens always reads
the residual stream *before* it, so every layer means the same thing; the logit lens applies the final
norm itself. Negative layers count from the end (``-1`` is ``num_layers``).
"""

from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, Generic, TypeVar, overload

import torch
from PIL import Image
from torch import nn

from embedlens.errors import EmbedLensError, InputError
from embedlens.models.cells import grid_cells, processed_picture_size
from embedlens.models.processing import run_processor, unnormalise
from embedlens.models.spans import PreparedBatch, VisualSpan
from embedlens.profiles import Profile, get_profile


@dataclass(frozen=True)
class ModulePaths:
    """Where a family keeps its parts: dotted attribute paths from the loaded ``transformers`` model.

    The defaults are the layout most ``*ForConditionalGeneration`` classes share (LLaVA, LLaVA-NeXT,
    InternVL, Gemma 3): ``model.language_model`` with its layers, ``embed_tokens`` and ``norm``,
    ``lm_head``, ``model.vision_tower`` and ``model.multi_modal_projector``. A family names only what
    differs (Qwen-VL: ``vision_tower="model.visual"``).

    Attributes:
        language_model: The decoder stack (embedding, layers, final norm, rotary embedding).
        decoder_layers: Its decoder layers, a module list.
        input_embeddings: The LLM's input embedding table.
        final_norm: The norm before the LM head.
        lm_head: The projection to vocabulary logits.
        vision_tower: The vision encoder.
        projector: What maps vision features to LLM inputs (its output is layer 0 of visual tokens).
        attention: The self-attention submodule, from inside one decoder layer.
        mlp: The MLP submodule, from inside one decoder layer.
    """

    language_model: str = "model.language_model"
    decoder_layers: str = "model.language_model.layers"
    input_embeddings: str = "model.language_model.embed_tokens"
    final_norm: str = "model.language_model.norm"
    lm_head: str = "lm_head"
    vision_tower: str = "model.vision_tower"
    projector: str = "model.multi_modal_projector"
    attention: str = "self_attn"
    mlp: str = "mlp"


_PartT = TypeVar("_PartT")


class _Part(Generic[_PartT]):
    """A read-only adapter attribute: the model part at the path of the same name in the adapter's
    :class:`ModulePaths` (``adapter.lm_head`` is ``model.<modules.lm_head>``)."""

    def __init__(self, doc: str) -> None:
        self.__doc__ = doc
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, adapter: None, owner: type | None = None) -> _Part[_PartT]: ...

    @overload
    def __get__(self, adapter: ModelAdapter, owner: type | None = None) -> _PartT: ...

    def __get__(self, adapter: ModelAdapter | None, owner: type | None = None) -> _PartT | _Part[_PartT]:
        if adapter is None:
            return self
        return operator.attrgetter(getattr(adapter.modules, self.name))(adapter.model)


class ModelAdapter(ABC):
    """Access to one model family's parts and inputs. Subclasses register with ``@register_adapter``.

    Args:
        model: The loaded ``transformers`` model (eval mode).
        processor: Its processor (tokenizer + image processor).
        source: The hub id or local path the model came from (for provenance).
        profile: Settings for feeding and reading the model (default: the ``default`` profile).
    """

    #: Short family name used in messages and results ("llava").
    family: ClassVar[str]
    #: ``config.model_type`` values this adapter handles.
    model_types: ClassVar[tuple[str, ...]]

    def __init__(self, model: nn.Module, processor: Any, source: str, profile: Profile | None = None) -> None:
        self.model = model
        self.processor = processor
        self.source = source
        #: How the model is fed and read (see :mod:`embedlens.profiles`).
        self.profile = profile if profile is not None else get_profile(None)

    # ----------------------------------------------------------------- loading
    #: Name of the ``transformers`` class that loads checkpoints of this family (imported on first use:
    #: importing a modeling module costs tens of milliseconds).
    transformers_class: ClassVar[str]

    @classmethod
    def model_class(cls) -> type[nn.Module]:
        """The ``transformers`` class to instantiate checkpoints of this family with."""
        import transformers

        return getattr(transformers, cls.transformers_class)

    @classmethod
    def num_layers_from_config(cls, config: Any) -> int:
        """Number of decoder layers, read from the config alone (to validate before loading weights)."""
        text = getattr(config, "text_config", None) or config
        return int(text.num_hidden_layers)

    # ----------------------------------------------------------------- structure
    #: Where this family keeps its parts (attribute paths from the loaded model; default: the standard
    #: layout, see :class:`ModulePaths`).
    modules: ClassVar[ModulePaths] = ModulePaths()

    decoder_layers: _Part[nn.ModuleList] = _Part("The LLM's decoder layers, in order.")
    input_embeddings: _Part[nn.Embedding] = _Part("The LLM's input embedding table, weight of shape ``[V, d]``.")
    final_norm: _Part[nn.Module] = _Part("The norm applied to the last layer's output before the LM head.")
    lm_head: _Part[nn.Linear] = _Part("The output projection to vocabulary logits, weight of shape ``[V, d]``.")
    language_model: _Part[nn.Module] = _Part(
        "The decoder stack whose forward takes ``inputs_embeds``, ``attention_mask``, ``position_ids`` and "
        "``cache`` (visual tokens already scattered in) and runs the decoder layers."
    )
    vision_tower: _Part[nn.Module] = _Part("The vision encoder.")
    projector: _Part[nn.Module] = _Part(
        "The module mapping vision features to LLM inputs; its output is layer 0 of visual tokens."
    )

    @property
    def num_layers(self) -> int:
        """Number of decoder layers ``L``; valid layer indices are ``0 .. L``."""
        return len(self.decoder_layers)

    def attention(self, layer: int) -> nn.Module:
        """Self-attention submodule of decoder layer ``layer`` (0-based)."""
        return operator.attrgetter(self.modules.attention)(self.decoder_layers[layer])

    def mlp(self, layer: int) -> nn.Module:
        """MLP submodule of decoder layer ``layer`` (0-based)."""
        return operator.attrgetter(self.modules.mlp)(self.decoder_layers[layer])

    def position_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor, layer: int = 0) -> Any:
        """What decoder layer ``layer`` receives as ``position_embeddings`` for these positions (by default
        the language model's ``rotary_emb``; families with per-layer rotary settings or several position
        planes override this).

        Args:
            hidden: Any tensor with the hidden states' dtype and device, shape ``[B, T, d]``.
            position_ids: Positions as the language model receives them: ``[B, T]``, or ``[P, B, T]`` for
                families with several position planes (Qwen's M-RoPE).
            layer: The decoder layer (0-based).
        """
        return self.language_model.rotary_emb(hidden, position_ids=position_ids)

    def layer_position_ids(self, position_ids: torch.Tensor) -> torch.Tensor | None:
        """What the decoder layers receive as ``position_ids`` when the language model gets
        ``position_ids`` (``[B, T]`` or ``[P, B, T]``); by default the same tensor."""
        return position_ids

    def mask_key(self, layer: int) -> str | None:
        """Which entry of a dict ``attention_mask`` (one 4-D mask per attention kind, as Gemma 3 passes
        its language model) decoder layer ``layer`` uses; None for families that pass one mask."""
        return None

    def pop_layer_additions(self, llm_kwargs: dict[str, Any], length: int) -> dict[int, torch.Tensor]:
        """Remove from the language model's keyword arguments whatever the decoder stack adds to the
        residual stream between layers (Qwen3-VL's DeepStack features), and return it as dense tensors.

        Args:
            llm_kwargs: The language model's forward keyword arguments at prefill (changed in place).
            length: Sequence length ``L`` of the (untouched) prefill.

        Returns:
            Decoder layer ``i`` (0-based) -> ``[B, L, d]`` added to that layer's output (zero at the
            positions that get nothing); empty for families without such additions (the default).
            Interventions then add these themselves, only at the tokens still present.
        """
        return {}

    @property
    def attention_implementation(self) -> str:
        """The LLM's attention implementation (``"sdpa"``, ``"eager"``, ...)."""
        config = getattr(self.language_model, "config", None)
        return str(getattr(config, "_attn_implementation", None) or "eager")

    @property
    def image_token_id(self) -> int:
        """The token id marking visual-token positions in ``input_ids`` (the config's ``image_token_id``)."""
        return int(self.model.config.image_token_id)

    @property
    def image_placeholder(self) -> str:
        """The text a prompt uses to place an image (the processor's ``image_token``, e.g. ``"<image>"``)."""
        return str(getattr(self.processor, "image_token", "<image>"))

    @property
    def tokenizer(self) -> Any:
        """The text tokenizer."""
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        """Device of the input embedding table (where inputs are sent)."""
        return self.input_embeddings.weight.device

    # ----------------------------------------------------------------- inputs
    @abstractmethod
    def format_prompt(self, prompt: str, num_images: int = 1) -> str:
        """Turn the user's question into the model's text with ``num_images`` image placeholders.

        Uses the model's chat template when it has one; otherwise the placeholders go before the text.
        """

    def prepare(
        self,
        images: Sequence[Sequence[Image.Image]],
        prompts: Sequence[str],
        *,
        raw: bool = False,
    ) -> PreparedBatch:
        """Process a batch: ``images[i]`` are sample ``i``'s images, ``prompts[i]`` its question.

        With ``raw=True`` each prompt is used verbatim and must contain the image placeholder once per
        image; otherwise it must not contain the placeholder and :meth:`format_prompt` places the images.
        The texts then go to :meth:`encode`.

        Raises:
            InputError: ``images`` and ``prompts`` differ in length, or a prompt breaks the rule above.
        """
        if len(images) != len(prompts):
            raise InputError(f"{len(images)} image lists but {len(prompts)} prompts")
        texts = [
            self._sample_text(prompt, len(sample_images), raw=raw)
            for sample_images, prompt in zip(images, prompts, strict=True)
        ]
        return self.encode(images, texts)

    def _sample_text(self, prompt: str, num_images: int, *, raw: bool) -> str:
        """One sample's model text: the raw prompt checked for one placeholder per image, or the prompt
        (checked to hold none) formatted by :meth:`format_prompt`."""
        placeholder = self.image_placeholder
        if raw:
            found = prompt.count(placeholder)
            if found != num_images:
                raise InputError(
                    f"the raw prompt must contain the image placeholder {placeholder!r} "
                    f"once per image ({num_images}); found {found}"
                )
            return prompt
        if placeholder in prompt:
            raise InputError(
                f"the prompt contains the image placeholder {placeholder!r}; the image is "
                "placed for you (use a raw prompt to place it yourself)"
            )
        return self.format_prompt(prompt, num_images=num_images)

    def encode(self, images: Sequence[Sequence[Image.Image]], texts: list[str]) -> PreparedBatch:
        """Run the processor on a batch whose texts already hold one image placeholder per image.

        The same four steps for every family; a family changes a step by overriding its hook:
        :meth:`processor_images` (what the processor takes as images), :meth:`model_texts` (the texts
        it tokenises), :attr:`processor_options` (more keyword arguments for it) and
        :meth:`view_pictures` (the picture of every view, for drawing and cell geometry).

        Args:
            images: ``images[i]`` are sample ``i``'s images, in placeholder order.
            texts: Sample ``i``'s model text (from :meth:`prepare`).

        Padding is on the left so that batched generation matches single-sample generation.
        """
        options = self.processor_options
        encoded, inputs = run_processor(self, self.model_texts(texts), self.processor_images(images), **options)
        views = self.view_pictures(encoded)
        return PreparedBatch(inputs=inputs, spans=self.find_spans(encoded), texts=texts, views=views)

    #: More keyword arguments for the processor call (e.g. Gemma 3's ``do_pan_and_scan=False``).
    processor_options: ClassVar[Mapping[str, Any]] = MappingProxyType({})

    #: Whether the processor takes one list of images per sample (Gemma 3, PaliGemma, LLaVA-OneVision)
    #: instead of one flat list.
    images_per_sample: ClassVar[bool] = False

    def processor_images(self, images: Sequence[Sequence[Image.Image]]) -> Any:
        """The batch's images as the processor takes them: RGB, in placeholder order, one flat list (or one
        list per sample with :attr:`images_per_sample`); None when there are none."""
        nested = [[image.convert("RGB") for image in sample_images] for sample_images in images]
        if not any(nested):
            return None
        return nested if self.images_per_sample else [image for sample_images in nested for image in sample_images]

    def model_texts(self, texts: list[str]) -> list[str]:
        """The texts the processor tokenises (default: as given; see
        :func:`~embedlens.models.processing.single_bos`)."""
        return list(texts)

    def view_pictures(self, encoded: Mapping[str, Any]) -> list[Image.Image]:
        """The picture of every view, in span order, from the processor's output (default: each entry of
        ``pixel_values`` ``[N, 3, H, W]`` un-normalised; empty without pixel values)."""
        pixel_values = encoded.get("pixel_values")
        return [] if pixel_values is None else [self.picture(view) for view in pixel_values]

    def picture(self, pixel_values: torch.Tensor) -> Image.Image:
        """Undo the image processor's normalisation of one view ``[3, H, W]``: what the tower sees, as RGB."""
        return unnormalise(self.processor.image_processor, pixel_values)

    @abstractmethod
    def find_spans(self, inputs: Mapping[str, Any]) -> list[list[VisualSpan]]:
        """Locate every image's visual tokens (every view of it) from the image token id.

        Args:
            inputs: The model's forward keyword arguments: ``input_ids`` ``[B, T]`` and whatever else
                the family needs to tell the grids (``pixel_values``, ``image_sizes``,
                ``image_grid_thw``, or, inside ``generate``, ``mm_encoder_outputs``).

        Returns:
            Per sample, its spans in sequence order: each image's views, images in placeholder order.

        Raises:
            InputError: The image tokens do not match the images given.
        """

    # ----------------------------------------------------------------- vision features
    def vision_token_features(self, features: torch.Tensor | None, span: VisualSpan) -> torch.Tensor:
        """The vision-tower features behind each grid token of ``span``: what the projector received for
        those tokens (read for the ViT-sink evidence: the vision-feature norm of each token).

        The default serves projectors that map vision tokens one to one, per image: ``features`` is the
        projector's input ``[N_images, n_extra + rows * cols, d_vision]`` and the span's rows follow its
        extra tokens. Families whose projector merges patches (Qwen's merger, Gemma 3's pooling) or
        rearranges them (LLaVA-NeXT's stitched tiles) override this.

        Args:
            features: The projector's input as :func:`~embedlens.capture.capture` records it, or None.
            span: One view of one image.

        Returns:
            ``[rows * cols, d_vision]``, one row per grid cell in row-major order.

        Raises:
            EmbedLensError: The features were not captured or do not map to the span's tokens.
        """
        if features is None:
            raise EmbedLensError("the projector's input was not captured")
        image = features[span.global_image]
        extra = int(span.extra_positions.numel())
        if image.ndim != 2 or image.shape[0] != extra + span.num_tokens:
            raise EmbedLensError(
                f"vision-tower norms need a projector that maps vision tokens one to one; it received "
                f"{tuple(image.shape)} for {extra + span.num_tokens} visual tokens"
            )
        return image[extra:]

    # ----------------------------------------------------------------- vision cost
    #: Vision-tower patches behind one grid token (Qwen's merger: ``merge_size ** 2``; InternVL's pixel
    #: shuffle: 4; Gemma 3's pooling: ``k ** 2``); 1 for projectors that map patches one to one.
    patches_per_token: int = 1

    @property
    def class_tokens(self) -> int:
        """Tokens the vision tower adds to each pass besides the patches (1 for a CLS token, else 0)."""
        for module in self.vision_tower.modules():
            if isinstance(getattr(module, "class_embedding", None), torch.Tensor) or isinstance(
                getattr(module, "cls_token", None), torch.Tensor
            ):
                return 1
        return 0

    def vision_passes(self, span: VisualSpan) -> list[int]:
        """Tokens of each vision-tower pass that produces this view (for FLOP accounting, ``[passes]``):
        by default one pass over the view's patches plus the tower's class token."""
        return [span.num_tokens * self.patches_per_token + self.class_tokens]

    # ----------------------------------------------------------------- benchmark geometry
    def benchmark_size(self) -> tuple[int, int]:
        """``(width, height)`` of the pictures ``make-patchbench`` draws, one the processor does not resample:
        by default the picture the image processor makes (the last two sides of its ``pixel_values``)."""
        return processed_picture_size(self.processor.image_processor)

    def cell_pixels(self, batch: PreparedBatch) -> list[list[torch.Tensor]]:
        """Per sample, per span (in order), the processed pixel values behind each grid cell, ``[rows * cols,
        k]``: by default row ``span.picture`` of ``pixel_values`` ``[N, 3, H, W]`` cut into the span's grid of
        equal cells. Raises InputError where the family's pixels do not show a view's cells that way."""
        pixels = batch.inputs.get("pixel_values")
        if pixels is None or pixels.ndim != 4:
            raise InputError(f"{self.family}'s pixel values are not one [3, H, W] picture per view")
        return [[grid_cells(pixels[s.picture], s.grid, f"the {s.view} view") for s in row] for row in batch.spans]

    # ----------------------------------------------------------------- layers
    def check_layer(self, layer: int) -> int:
        """Return ``layer`` as an index in ``0 .. L`` (negative counts from the end) or raise."""
        return resolve_layer(layer, self.num_layers)


def resolve_layer(layer: int, num_layers: int) -> int:
    """Map ``layer`` (``0 .. L``, or ``-(L+1) .. -1`` from the end) to ``0 .. L``; raise if out of range."""
    resolved = layer + num_layers + 1 if layer < 0 else layer
    if not 0 <= resolved <= num_layers:
        raise InputError(
            f"layer {layer} is out of range for this model: use 0..{num_layers} (or -{num_layers + 1}..-1)"
        )
    return resolved
