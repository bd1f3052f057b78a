"""Training and evaluation sequences for the mini model: ChatML turns with answer-only labels.

One image becomes one sequence: the first user turn holds the image (as ``image_seq_length`` image
tokens) and a question; then assistant answer, next question, answer, ... Labels are -100 everywhere
except on each answer's tokens and the ``<|im_end|>`` that closes it, so the loss teaches answers only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

IGNORE = -100


@dataclass(frozen=True)
class Turn:
    """One question and its answer."""

    question: str
    answer: str


@dataclass
class Encoded:
    """A tokenised sequence.

    Attributes:
        input_ids: Shape ``[T]``.
        labels: Shape ``[T]``; ``IGNORE`` except on answer tokens (the token itself, not shifted).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor


class SequenceBuilder:
    """Tokenise ChatML conversations about one image, with the image tokens in the first turn.

    Args:
        tokenizer: The mini model's tokenizer (with ``<image>``).
        image_token_id: Id of ``<image>``.
        image_tokens: Visual tokens per image (256 at 224 px).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_token_id: int, image_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.image_tokens = image_tokens

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, turns: Sequence[Turn], *, answer_last: bool = True) -> Encoded:
        """Tokenise a conversation; with ``answer_last=False`` the last answer is left out (a prompt)."""
        ids: list[int] = []
        labels: list[int] = []
        for index, turn in enumerate(turns):
            user = self._ids("<|im_start|>user\n")
            if index == 0:
                user += [self.image_token_id] * self.image_tokens + self._ids("\n")
            user += self._ids(turn.question + "<|im_end|>\n<|im_start|>assistant\n")
            ids += user
            labels += [IGNORE] * len(user)
            if index == len(turns) - 1 and not answer_last:
                break
            answer = self._ids(turn.answer + "<|im_end|>")
            ids += answer
            labels += answer
            newline = self._ids("\n")
            ids += newline
            labels += [IGNORE] * len(newline)
        return Encoded(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long))


def collate(batch: Sequence[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad a batch for training: ``input_ids``, ``attention_mask``, ``labels``, each ``[B, T]``."""
    width = max(item.input_ids.numel() for item in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        n = item.input_ids.numel()
        ids[row, :n] = item.input_ids
        labels[row, :n] = item.labels
        mask[row, :n] = 1
    return ids, mask, labels


def answer_weights(targets: torch.Tensor) -> torch.Tensor:
    """Loss weights that make every answer count once, however many tokens it has.

    An answer is a run of consecutive labelled positions in a row. Each of its tokens gets
    ``1 / (run length * number of answers in the batch)``, so the weights sum to 1 and a 20-token
    caption weighs as much as a one-word answer (a plain token mean lets captions dominate).

    Args:
        targets: Labels, shape ``[B, T]`` (``IGNORE`` where there is no loss).

    Returns:
        Weights of the labelled positions in row-major order, shape ``[number of labelled positions]``.
    """
    keep = targets != IGNORE
    before = torch.zeros_like(keep)
    before[:, 1:] = keep[:, :-1]
    starts = (keep & ~before)[keep]
    answer = torch.cumsum(starts.long(), dim=0) - 1
    answers = int(starts.sum())
    if answers == 0:
        return torch.zeros(0)
    lengths = torch.bincount(answer, minlength=answers).float()
    return 1.0 / (lengths[answer] * answers)
