"""The model families the conformance suite (``test_conformance.py``) runs over: one tiny entry each.

An entry builds a tiny random checkpoint of its family -- configs at toy sizes, the family's real
``transformers`` model and processor classes, random weights -- saves it to a directory and returns
the directory the suite then loads by path through ``embedlens.load``. Besides the builder, an entry
states the few facts the checks compare against (what the processor should lay out for one image),
so a wrong adapter cannot pass by agreeing with itself.

Import as ``from families import FAMILIES`` (pytest puts ``tests/`` on ``sys.path``). The conformance
modules share one loader, :func:`load_family` (a tiny checkpoint built to a temporary directory and
loaded by path on the CPU), returning a :class:`Loaded`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration, LlavaProcessor

import embedlens
import tiny_gemma3
import tiny_internvl
import tiny_mistral3
import tiny_paligemma
from embedlens.models.base import ModelAdapter
from embedlens.models.tiny import LLAVA_15_TEMPLATE, TinySpec, build_tiny_llava, save_tiny_llava
from helpers import CHATML_TEMPLATE, random_image
from tiny_llava_next import save_llava_next, save_llava_onevision
from tiny_qwen_vl import build_qwen2_5_vl, build_qwen2_vl, build_qwen3_vl


@dataclass(frozen=True)
class View:
    """One view of an image as the processor lays it out: its run of image tokens in sequence order.

    Attributes:
        name: The span's ``view`` (``"full"``, ``"base"``, ``"tiles"``, ``"tile-0"``, ``"thumbnail"``...).
        grid: ``(rows, cols)`` of its patch grid.
        extra_offsets: Where, within this view's run of image tokens, the tokens that are not grid cells
            sit (a CLS token, row-end newline slots...); the grid cells fill the other ``rows * cols``
            positions in row-major order.
        projector_order: Whether the grid cells, row-major, follow the projector's output rows in order
            (False where the model rearranges them, as LLaVA-NeXT stitches its tiles).
    """

    name: str = "full"
    grid: tuple[int, int] = (4, 4)
    extra_offsets: tuple[int, ...] = ()
    projector_order: bool = True

    @property
    def tokens(self) -> int:
        """Image-token positions the view occupies."""
        return self.grid[0] * self.grid[1] + len(self.extra_offsets)


@dataclass(frozen=True)
class Family:
    """One model family (or one variant of its layout) as the conformance suite sees it.

    Attributes:
        name: Test id (``"llava"``, ``"llava-cls"``, ...).
        build: Saves a tiny random checkpoint (model + processor) under the given directory and
            returns the directory to load by path. Must take well under a second.
        image: ``image(seed)`` -> a valid RGB input image for this family (size, aspect).
        prompts: Two questions of different lengths (so a batch of both is left-padded).
        views: What the processor lays out for one ``image``: its views in sequence order (one image's
            image tokens are the views' runs, one after the other).
        multi_image: Whether a sample may hold several images (the spans check then places two).
        generated_token_type: The token type a generated token gets in per-token type inputs
            (``token_type_ids``, ``mm_token_type_ids``): 0 (text) for most families, 1 for PaliGemma,
            whose prompt (type 0) attends both ways and whose generated tokens (type 1) do not.
    """

    name: str
    build: Callable[[Path], Path]
    image: Callable[[int], Image.Image]
    prompts: tuple[str, str] = ("what is this", "is there a red thing in the picture")
    views: tuple[View, ...] = (View(),)
    multi_image: bool = True
    generated_token_type: int = 0

    @property
    def tokens_per_image(self) -> int:
        """Image-token positions one image occupies in ``input_ids``."""
        return sum(view.tokens for view in self.views)

    @property
    def smallest_grid(self) -> int:
        """Cells of the smallest view (grid indices below it exist in every view)."""
        return min(view.grid[0] * view.grid[1] for view in self.views)

    def __str__(self) -> str:
        return self.name


#: Two ordinary token ids whose input embedding rows the decoy builder makes identical (a planted tie).
TIED_IDS = (600, 601)


def _plant_decoys(model: LlavaForConditionalGeneration, processor: LlavaProcessor, image: Image.Image) -> None:
    """Make the rows past the tokenizer the best match of ``image``'s visual tokens at layer 0: the input
    embedding rows become those tokens (cosine 1) and the LM head rows ten times them (the largest logits),
    so a lens that searched padding rows would return them. Also plant a tie among real tokens: input
    embedding rows :data:`TIED_IDS` both become the second visual token, so a lens must list the lower id
    first."""
    encoded = processor(images=[image], text=[processor.image_token], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**encoded, output_hidden_states=True).hidden_states[0]
        visual = hidden[0, encoded["input_ids"][0] == model.config.image_token_id]
        tokens = len(processor.tokenizer)
        rows = min(visual.shape[0], model.get_input_embeddings().weight.shape[0] - tokens)
        model.get_input_embeddings().weight[tokens : tokens + rows] = visual[:rows]
        model.get_output_embeddings().weight[tokens : tokens + rows] = 10 * visual[:rows]
        for tied in TIED_IDS:
            model.get_input_embeddings().weight[tied] = visual[1]


def _llava(
    spec: TinySpec | None = None,
    chat_template: str | None = LLAVA_15_TEMPLATE,
    padded_rows: int = 0,
    decoys_for: Image.Image | None = None,
) -> Callable[[Path], Path]:
    """A builder for a tiny LLaVA: ``spec``, a chat template (default: LLaVA-1.5's), and optionally its
    embedding table and LM head padded by ``padded_rows`` rows past the tokenizer (as llava-hf's are),
    the first of them planted as decoys for the image ``decoys_for`` (see :func:`_plant_decoys`)."""

    spec = spec or TinySpec()

    def build(directory: Path) -> Path:
        if not padded_rows:
            return save_tiny_llava(directory, spec, chat_template)
        model, processor = build_tiny_llava(spec, chat_template)
        model.resize_token_embeddings(spec.vocab_size + padded_rows, mean_resizing=False)
        if decoys_for is not None:
            _plant_decoys(model, processor, decoys_for)
        model.save_pretrained(directory)
        processor.save_pretrained(directory)
        return directory

    return build


def _noise(size: int) -> Callable[[int], Image.Image]:
    return lambda seed: random_image(seed, size, size)


FAMILIES: tuple[Family, ...] = (
    # LLaVA-1.5 layout: CLS dropped, one run of 4 x 4 image tokens per image, LLaVA-1.5 chat template.
    Family("llava", _llava(), _noise(56)),
    # 'full' feature selection: the CLS token is kept in front of the grid (one extra position per image).
    Family("llava-cls", _llava(TinySpec(strategy="full")), _noise(56), views=(View(extra_offsets=(0,)),)),
    # ChatML template, and tables padded past the tokenizer (1000 tokens, 1064 rows) like llava-hf's, with
    # decoy padding rows that a lens searching past the tokenizer would return for image 0.
    Family(
        "llava-chatml",
        _llava(chat_template=CHATML_TEMPLATE, padded_rows=64, decoys_for=random_image(0)),
        _noise(56),
    ),
    # No chat template at all (placeholder before the text), and a 6 x 6 grid from 84 px images.
    Family(
        "llava-no-template",
        _llava(TinySpec(image_size=84), chat_template=None),
        _noise(84),
        views=(View(grid=(6, 6)),),
    ),
    # InternVL (-hf): 56 px tiles, 4 x 4 patches pixel-shuffled to 2 x 2 tokens per view; a wide 112 x 56 image
    # is cut into 2 tiles side by side, then the thumbnail follows, all three between <img> and </img>.
    Family(
        "internvl",
        tiny_internvl.build,
        lambda seed: random_image(seed, 112, 56),
        views=(View("tile-0", (2, 2)), View("tile-1", (2, 2)), View("thumbnail", (2, 2))),
    ),
    # InternVL with a square image: one tile and no thumbnail.
    Family("internvl-square", tiny_internvl.build, _noise(56), views=(View("tile-0", (2, 2)),)),
    # Gemma 3: <start_of_image>, a 4 x 4 grid pooled from 8 x 8 SigLIP patches, <end_of_image>; sliding, full, sliding
    # attention layers (window longer than the sequences); 80 x 60 images resized to 112 x 112.
    Family("gemma3", tiny_gemma3.build, lambda seed: random_image(seed, 80, 60)),
    # Qwen2-VL: one dynamic grid per image; an 84 x 56 (wide) image -> 4 x 6 patches of 14 px -> 2 x 3 tokens.
    Family("qwen2_vl", build_qwen2_vl, lambda seed: random_image(seed, 84, 56), views=(View(grid=(2, 3)),)),
    # Qwen2.5-VL: 112 x 56 -> 2 x 4 tokens over two windows of 2 x 2 tokens: the merger's rows come in window
    # order, the language model's in row-major order. (The pruned cells then empty column 0, so renumbering
    # M-RoPE positions differs from keeping them; on a 3 x 4 grid every row and column keeps a cell.)
    Family(
        "qwen2_5_vl",
        build_qwen2_5_vl,
        lambda seed: random_image(seed, 112, 56),
        views=(View(grid=(2, 4), projector_order=False),),
    ),
    # Qwen3-VL: 16 px patches, a tall 64 x 96 image -> 4 x 6 patches -> 3 x 2 tokens; DeepStack levels.
    Family("qwen3_vl", build_qwen3_vl, lambda seed: random_image(seed, 64, 96), views=(View(grid=(3, 2)),)),
    # LLaVA-NeXT (CLIP + LLaMA, [INST] template), a wide 200 x 40 image: a 4 x 4 base view, then 1 x 3
    # tiles stitched to 4 x 12 and unpadded to 2 x 12, each row followed by a newline slot.
    Family(
        "llava-next",
        save_llava_next,
        lambda seed: random_image(seed, 200, 40),
        views=(View("base", (4, 4)), View("tiles", (2, 12), extra_offsets=(12, 25), projector_order=False)),
    ),
    # LLaVA-OneVision (SigLIP + Qwen2, ChatML), the same layout for one image per sample; a sample with
    # several images gets base views only (tests/test_family_llava_next.py checks that layout).
    Family(
        "llava-onevision",
        save_llava_onevision,
        lambda seed: random_image(seed, 200, 40),
        views=(View("base", (4, 4)), View("tiles", (2, 12), extra_offsets=(12, 25), projector_order=False)),
        multi_image=False,
    ),
    # Mistral 3 (Pixtral tower, 14 px patches merged 2 x 2, Mistral decoder): a wide 112 x 84 image -> 3 rows of
    # 4 [IMG] tokens, each row closed by [IMG_BREAK] (the last by [IMG_END]): text tokens, reported as markers.
    Family("mistral3", tiny_mistral3.build, lambda seed: random_image(seed, 112, 84), views=(View(grid=(3, 4)),)),
    # PaliGemma 2 (SigLIP, one linear per patch, Gemma 2 decoder with sliding and full layers): 80 x 60 images
    # resized to 56 x 56 -> a 4 x 4 grid; <image> runs, then <bos> and the prompt, all of it attended both ways.
    # Without the final logit soft-capping, which the suite's hand-built reference cannot apply.
    Family("paligemma", tiny_paligemma.build_uncapped, lambda seed: random_image(seed, 80, 60), generated_token_type=1),
)


@dataclass
class Loaded:
    """One family's tiny checkpoint, loaded by path."""

    family: Family
    session: embedlens.Session
    path: Path

    @property
    def adapter(self) -> ModelAdapter:
        return self.session.adapter


def load_family(family: Family, tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    """Build ``family``'s tiny checkpoint to a fresh temporary directory (from pytest's
    ``tmp_path_factory``) and load it by path through ``embedlens.load`` on the CPU."""
    path = family.build(tmp_path_factory.mktemp(f"family-{family.name}") / "model")
    return Loaded(family, embedlens.load(str(path), device="cpu"), Path(path))
