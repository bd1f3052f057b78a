"""Exact-match evaluation of a model on held-out generated questions, with a shuffled-image control.

The control asks every question about another image of the same set (a seeded derangement): a model
that answers from the image scores well with the real image and near chance with the shuffled one; a
model that answers from the question alone scores the same on both.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tqdm.auto import tqdm

from embedlens.synth.qa import CHANCE, QA, Sample, answers_match
from embedlens.synth.scenes import generate

#: The question kinds the mini model's quality targets are set on.
KINDS = ("colour", "shape", "count", "letter")


@dataclass(frozen=True)
class Item:
    """One evaluation question about one image."""

    sample: Sample
    qa: QA


def held_out_items(per_kind: int, seed: int, kinds: Sequence[str] = KINDS, image_size: int = 224) -> list[Item]:
    """``per_kind`` questions of each kind, at most one per kind per image, from images of ``seed``."""
    counts: dict[str, int] = defaultdict(int)
    items: list[Item] = []
    for sample in generate(10**9, seed, image_size=image_size):
        seen: set[str] = set()
        for qa in sample.qas:
            if qa.kind in kinds and qa.kind not in seen and counts[qa.kind] < per_kind:
                items.append(Item(sample, qa))
                counts[qa.kind] += 1
                seen.add(qa.kind)
        if all(counts[kind] >= per_kind for kind in kinds):
            return items
    raise AssertionError("unreachable: the generator is endless")


def derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation of ``range(n)`` with no fixed point (n >= 2)."""
    rng = random.Random(seed)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        if all(i != j for i, j in enumerate(order)):
            return order


def answer_all(session, items: Sequence[Item], images: Sequence, batch_size: int = 16) -> list[str]:
    """Greedy answers of ``session`` to every item's question about ``images[i]``."""
    answers: list[str] = []
    for start in tqdm(range(0, len(items), batch_size), desc="answering", unit="batch", leave=False):
        chunk = items[start : start + batch_size]
        prompts = [item.qa.question for item in chunk]
        replies = session.generate(images[start : start + batch_size], prompts, max_new_tokens=6)
        answers += [reply.splitlines()[0] if reply else "" for reply in replies]
    return answers


def score(items: Sequence[Item], answers: Iterable[str]) -> dict[str, float]:
    """Exact-match accuracy per kind (after :func:`~embedlens.synth.qa.normalize_answer`)."""
    right: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for item, answer in zip(items, answers, strict=True):
        total[item.qa.kind] += 1
        right[item.qa.kind] += answers_match(answer, item.qa.answer)
    return {kind: right[kind] / total[kind] for kind in total}


def evaluate(session, items: Sequence[Item], *, shuffle_seed: int = 0, batch_size: int = 16) -> dict[str, dict]:
    """Accuracy per kind with the real image and with a shuffled image, beside chance.

    Returns:
        ``{kind: {"real": acc, "shuffled": acc, "chance": p, "n": count}}``.
    """
    real_images = [item.sample.image for item in items]
    # Derange whole images (several items can share one), so no question keeps its own image.
    samples = list({id(item.sample): item.sample for item in items}.values())
    position = {id(sample): i for i, sample in enumerate(samples)}
    order = derangement(len(samples), shuffle_seed)
    shuffled_images = [samples[order[position[id(item.sample)]]].image for item in items]
    real = score(items, answer_all(session, items, real_images, batch_size))
    shuffled = score(items, answer_all(session, items, shuffled_images, batch_size))
    counts: dict[str, int] = defaultdict(int)
    for item in items:
        counts[item.qa.kind] += 1
    return {
        kind: {"real": real[kind], "shuffled": shuffled[kind], "chance": CHANCE[kind], "n": counts[kind]}
        for kind in real
    }
