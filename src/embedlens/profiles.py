"""Profiles: named sets of settings that decide how a model is fed and read.

The ``default`` profile is what a user of the checkpoint's own processor and chat template expects.
The ``paper`` profile follows the reference implementation of the paper (EIT-NLP/EmbedLens on the original
LLaVA code base) wherever EmbedLens's defaults would move the paper's numbers:

* **Pad to square.** LLaVA-1.5's pipeline (``image_aspect_ratio = pad``) pads every image to a square in the
  image processor's mean colour before the CLIP resize; llava-hf's processor centre-crops instead, so other
  patches exist and boxes refer to another frame.
* **vicuna_v1 prompt.** The reference evaluates with the ``vicuna_v1`` conversation (its system sentence,
  ``USER:`` / ``ASSISTANT:``); llava-hf's chat template has no system prompt.
* **Base-vocabulary lens.** The reference searches only LLaMA's 32000 rows; llava-hf's table has 32064 rows,
  whose extra rows sit near the mean embedding and can fill a token's top-3.
* **Membership targets.** The reference prunes or skips every token whose top-3 holds a group's anchor,
  whatever else it matches, not only tokens *labelled* that group under the precedence order.
* **Kept positions, eager attention, the reference's task settings** (``max_new_tokens`` 1 for MME and
  MMStar).

A profile is chosen when a model is loaded (``embedlens.load(..., profile="paper")``, ``--profile paper``)
and recorded in every result's provenance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from embedlens.errors import InputError

#: The system sentence of the ``vicuna_v1`` conversation used by LLaVA-1.5's evaluation.
VICUNA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@dataclass(frozen=True)
class Profile:
    """How a model is fed and read.

    Attributes:
        name: The profile's name (recorded in provenance).
        pad_to_square: Pad each image to a square in the image processor's mean colour before processing.
        conversation: ``None`` for the checkpoint's chat template, or ``"vicuna_v1"``.
        base_vocabulary: Let lenses return only ids of the anchors' base vocabulary (``base_vocab_size``)
            when the model has built-in anchors that declare one.
        target_match: How group targets of interventions choose tokens: ``"label"`` (the token's group
            after precedence) or ``"member"`` (any token whose top-k holds the group's anchor).
        attn_implementation: Attention implementation to load the model with (None: the library default).
        task_settings: Per lmms-eval task, generation settings the reference used.
    """

    name: str
    pad_to_square: bool = False
    conversation: Literal["vicuna_v1"] | None = None
    base_vocabulary: bool = False
    target_match: Literal["label", "member"] = "label"
    attn_implementation: str | None = None
    task_settings: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (for provenance)."""
        return asdict(self)


PROFILES: dict[str, Profile] = {
    "default": Profile("default"),
    "paper": Profile(
        "paper",
        pad_to_square=True,
        conversation="vicuna_v1",
        base_vocabulary=True,
        target_match="member",
        attn_implementation="eager",
        task_settings={"mme": {"max_new_tokens": 1}, "mmstar": {"max_new_tokens": 1}},
    ),
}


def get_profile(profile: str | Profile | None) -> Profile:
    """The profile called ``profile`` (None: ``default``), or the given :class:`Profile` itself.

    Raises:
        InputError: For an unknown name.
    """
    if profile is None:
        return PROFILES["default"]
    if isinstance(profile, Profile):
        return profile
    if profile not in PROFILES:
        raise InputError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
    return PROFILES[profile]


def pad_to_square(image, fill: tuple[int, int, int]):
    """``image`` centred on a square canvas of its longer side, filled with ``fill`` (RGB)."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def vicuna_v1(prompt: str, placeholders: str) -> str:
    """The ``vicuna_v1`` conversation text for one user turn, ready for the assistant's answer."""
    return f"{VICUNA_V1_SYSTEM} USER: {placeholders}\n{prompt} ASSISTANT:"
