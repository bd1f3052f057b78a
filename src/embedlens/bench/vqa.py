"""Question sets for evaluation: JSONL rows of (image, question, answers, type) and their metrics.

A row is ``{"image": PATH, "question": TEXT, "answers": [TEXT, ...], "type": "exact" | "vqa" | "yesno"}``
with optional ``"category"`` (default ``"all"``), ``"id"``, ``"target_patches"`` (grid cells, as the
patch-compression benchmark writes them) and ``"prune_target"`` (remove those cells' tokens). ``PATH``
is relative to the JSONL file. ``answers`` may be a single string; ``type`` defaults to ``"yesno"``
when every answer is yes or no, else ``"exact"``. Rows with missing fields or images are reported with
their line numbers, skipped and counted.

Metrics, per item (all answers normalised by :func:`embedlens.synth.qa.normalize_answer`):

* ``exact``: 1 if the prediction equals any answer, else 0 (normalised exact match);
* ``vqa``: ``min(#answers equal to the prediction / 3, 1)`` (VQA accuracy: the answers are the human
  annotations, repeated as given);
* ``yesno``: 1 if the prediction's first word is the answer (``yes``/``no``); per category also
  accuracy and F1 with ``yes`` as the positive class (POPE style).

Beside each score the runner reports a **relaxed** score (:func:`relaxed_score`): credit when an
answer appears as whole words anywhere in the reply ("The shape is a triangle." for ``triangle``).
It tells a model that knows the answer but words it as a sentence from one that does not know it;
single-character answers (letters) and yes/no items still need the strict match, since a sentence
almost always contains the word "a".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from embedlens.datasets import read_jsonl
from embedlens.errors import InputError
from embedlens.synth.qa import normalize_answer

TYPES = ("exact", "vqa", "yesno")


@dataclass(frozen=True)
class Question:
    """One evaluation item.

    Attributes:
        index: Position among the usable rows (0-based).
        id: The row's ``id``, or ``"line N"``.
        image: Image path.
        question: The question text.
        answers: Accepted answers (for ``vqa``: every annotation).
        type: ``"exact"``, ``"vqa"`` or ``"yesno"``.
        category: Reporting category.
        target_patches: Grid cells of the item's target, if known.
        prune_target: Remove the target cells' tokens (the benchmark's control split).
    """

    index: int
    id: str
    image: Path
    question: str
    answers: tuple[str, ...]
    type: str
    category: str = "all"
    target_patches: tuple[int, ...] | None = None
    prune_target: bool = False


@dataclass
class QuestionSet:
    """The usable rows of a JSONL file and what was skipped.

    Attributes:
        source: The JSONL file.
        items: Usable questions, ``items[i].index == i``.
        skipped: One message per skipped line, ``"line N: why"``.
    """

    source: Path
    items: list[Question]
    skipped: list[str] = field(default_factory=list)


def _row_problem(row: object, folder: Path) -> str | None:
    if not isinstance(row, dict):
        return "not a JSON object"
    for name in ("image", "question", "answers"):
        if name not in row:
            return f"missing field {name!r}"
    if not isinstance(row["question"], str) or not row["question"].strip():
        return "question must be non-empty text"
    answers = row["answers"]
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        return "answers must be a non-empty list of text"
    if any(not normalize_answer(a) for a in answers):
        return "an answer is empty once case, punctuation and spaces are dropped (it would credit empty replies)"
    kind = row.get("type")  # null: inferred, like a missing type
    if kind is not None and kind not in TYPES:
        return f"type must be one of {', '.join(TYPES)}, got {kind!r}"
    if kind == "yesno" and any(normalize_answer(a) not in ("yes", "no") for a in answers):
        return "yesno answers must be yes or no"
    image = folder / str(row["image"])
    if not image.is_file():
        return f"image not found: {image}"
    cells = row.get("target_patches")
    if cells is not None and (
        not isinstance(cells, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in cells)
    ):
        return "target_patches must be a list of integers"
    if row.get("prune_target") and not cells:
        return "prune_target needs target_patches"
    return None


def read_questions(source: str | Path) -> QuestionSet:
    """Read a JSONL question file, or a benchmark directory's ``items.jsonl``.

    Raises:
        InputError: The file is missing or unreadable, or no row is usable.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "items.jsonl"
    if not path.is_file():
        raise InputError(f"question file not found: {path}")
    items: list[Question] = []
    skipped: list[str] = []
    for number, row in read_jsonl(path, "question file", skipped):
        problem = _row_problem(row, path.parent)
        if problem is not None:
            skipped.append(f"line {number}: {problem}")
            continue
        answers = (row["answers"],) if isinstance(row["answers"], str) else tuple(row["answers"])
        kind = row.get("type") or ("yesno" if {normalize_answer(a) for a in answers} <= {"yes", "no"} else "exact")
        cells = row.get("target_patches")
        items.append(
            Question(
                index=len(items),
                id=str(row.get("id") or f"line {number}"),
                image=path.parent / str(row["image"]),
                question=row["question"],
                answers=answers,
                type=kind,
                category=str(row.get("category") or "all"),
                target_patches=tuple(cells) if cells is not None else None,
                prune_target=bool(row.get("prune_target", False)),
            )
        )
    if not items:
        first = f"; first problem: {skipped[0]}" if skipped else ""
        raise InputError(f"{path} has no usable questions{first}")
    return QuestionSet(source=path, items=items, skipped=skipped)


# --------------------------------------------------------------------------- metrics
def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised answer, else 0.0."""
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(answer) for answer in answers))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """``min(#answers equal to the prediction / 3, 1)`` after normalisation."""
    predicted = normalize_answer(prediction)
    return min(sum(predicted == normalize_answer(answer) for answer in answers) / 3.0, 1.0)


def yes_no(prediction: str) -> str:
    """``"yes"``, ``"no"`` or ``"other"``: the first word of the normalised prediction."""
    words = normalize_answer(prediction).split()
    return words[0] if words and words[0] in ("yes", "no") else "other"


def score(question: Question, prediction: str) -> float:
    """The item's score under its type's metric."""
    if question.type == "vqa":
        return vqa_accuracy(prediction, question.answers)
    if question.type == "yesno":
        return float(yes_no(prediction) == normalize_answer(question.answers[0]))
    return exact_match(prediction, question.answers)


def contains_answer(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if a normalised answer occurs as a run of whole words in the normalised prediction."""
    words = normalize_answer(prediction).split()
    for answer in answers:
        wanted = normalize_answer(answer).split()
        if wanted and any(words[i : i + len(wanted)] == wanted for i in range(len(words) - len(wanted) + 1)):
            return 1.0
    return 0.0


def relaxed_score(question: Question, prediction: str) -> float:
    """The relaxed score (see the module docs): containment, except for yes/no and one-character answers."""
    if question.type == "yesno" or all(len(normalize_answer(a)) <= 1 for a in question.answers):
        return score(question, prediction)
    if question.type == "vqa":
        predicted = normalize_answer(prediction)
        matches = sum(
            predicted == normalize_answer(a) or bool(contains_answer(prediction, [a])) for a in question.answers
        )
        return min(matches / 3.0, 1.0)
    return contains_answer(prediction, question.answers)


def yes_no_f1(predicted: Sequence[str], truth: Sequence[str]) -> float:
    """F1 with ``yes`` as the positive class (``other`` counts as a wrong ``no``); 0.0 when undefined."""
    tp = sum(p == "yes" and t == "yes" for p, t in zip(predicted, truth, strict=True))
    fp = sum(p == "yes" and t != "yes" for p, t in zip(predicted, truth, strict=True))
    fn = sum(p != "yes" and t == "yes" for p, t in zip(predicted, truth, strict=True))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)
