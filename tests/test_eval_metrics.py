"""Evaluation question files and metrics (embedlens.bench.vqa): normalised exact match, VQA accuracy,
yes/no parsing and F1, per-type scores, and a JSONL reader that skips bad rows with their line numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embedlens import InputError
from embedlens.bench.vqa import (
    Question,
    contains_answer,
    exact_match,
    read_questions,
    relaxed_score,
    score,
    vqa_accuracy,
    yes_no,
    yes_no_f1,
)
from helpers import random_image


def question(answers: tuple[str, ...], kind: str) -> Question:
    return Question(index=0, id="q", image=Path("x.png"), question="?", answers=answers, type=kind)


class TestRelaxed:
    """Chatty replies ("The shape is a triangle.") get relaxed credit when the answer is in them as whole
    words; letters and yes/no stay strict, because nearly every sentence contains the word "a"."""

    @pytest.mark.parametrize(
        ("prediction", "answers", "expected"),
        [
            ("The shape is a triangle.", ["triangle"], 1.0),
            ("triangles everywhere", ["triangle"], 0.0),  # whole words only
            ("It is dark blue, I think", ["dark blue"], 1.0),
            ("blue and dark", ["dark blue"], 0.0),
            ("There are 2 of them", ["two"], 1.0),  # normalised first
            ("", ["cat"], 0.0),
        ],
    )
    def test_contains(self, prediction, answers, expected):
        assert contains_answer(prediction, answers) == expected

    @pytest.mark.parametrize(
        ("prediction", "answers", "kind", "expected"),
        [
            ("The shape is a triangle.", ("triangle",), "exact", 1.0),
            ("The letter is a B", ("a",), "exact", 0.0),  # one character: strict
            ("A", ("a",), "exact", 1.0),
            ("Yes, there is a no-entry sign", ("no",), "yesno", 0.0),  # yes/no: the first word
            ("It is a cat", ("cat", "cat", "dog", "cat"), "vqa", 1.0),
            ("It is a dog", ("cat", "cat", "dog", "cat"), "vqa", 1 / 3),
        ],
    )
    def test_relaxed_score(self, prediction, answers, kind, expected):
        assert relaxed_score(question(answers, kind), prediction) == pytest.approx(expected)


class TestExactMatch:
    """Models answer in free text ("Two.", "The cat"); scoring must not punish case, articles, digit
    spelling or punctuation, or every model looks worse than it is, and differently so."""

    @pytest.mark.parametrize(
        ("prediction", "answers"),
        [
            ("Cat", ["cat"]),
            ("CAT", ["Cat"]),
            ("the cat", ["cat"]),
            ("A dog.", ["dog"]),
            ("an apple", ["apple"]),
            ("2", ["two"]),
            ("Two.", ["2"]),
            ("10", ["ten"]),
            ("red!", ["red"]),
            ("  star,  ", ["star"]),
            ("color", ["colour"]),
            ("gray", ["grey"]),
            ("dog", ["cat", "Dog"]),  # any accepted answer
            ("A", ["a"]),  # the letter A is not an article when it is the whole answer
        ],
    )
    def test_matches(self, prediction, answers):
        assert exact_match(prediction, answers) == 1.0

    @pytest.mark.parametrize(
        ("prediction", "answers"),
        [
            ("dog", ["cat"]),
            ("two cats", ["two"]),
            ("3", ["two"]),
            ("", ["cat"]),
            ("cat dog", ["cat"]),
            ("B", ["A"]),
        ],
    )
    def test_mismatches(self, prediction, answers):
        assert exact_match(prediction, answers) == 0.0


class TestVqaAccuracy:
    """VQA accuracy credits an answer by how many of the human annotators gave it (full credit from
    three); the hand cases pin the formula so results compare with published VQA numbers."""

    @pytest.mark.parametrize(("matching", "expected"), [(0, 0.0), (1, 1 / 3), (2, 2 / 3), (3, 1.0), (5, 1.0)])
    def test_ten_annotations(self, matching, expected):
        annotations = ["cat"] * matching + ["dog", "bird", "fish", "cow", "horse", "pig", "hen", "ox", "emu", "elk"]
        annotations = annotations[:10]
        assert len(annotations) == 10 and annotations.count("cat") == matching
        assert vqa_accuracy("cat", annotations) == pytest.approx(expected)

    def test_normalised(self):
        assert vqa_accuracy("Two", ["2", "two", "2.", "three"] + ["x"] * 6) == 1.0
        assert vqa_accuracy("The Cat", ["cat", "a cat"] + ["x"] * 8) == pytest.approx(2 / 3)


class TestYesNo:
    """POPE-style yes/no scoring reads the first word of an answer; anything else is neither yes nor
    no, so hedged answers are never credited as agreeing."""

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("Yes, it is.", "yes"),
            ("yes", "yes"),
            ("YES!", "yes"),
            ("No.", "no"),
            ("no, there is not", "no"),
            ("maybe", "other"),
            ("I think yes", "other"),
            ("", "other"),
            ("Yesterday", "other"),
        ],
    )
    def test_parse(self, text, expected):
        assert yes_no(text) == expected

    def test_f1_by_hand(self):
        predicted = ["yes", "yes", "no", "other", "yes", "no"]
        truth = ["yes", "no", "yes", "yes", "yes", "no"]
        # tp = 2 (0, 4), fp = 1 (1), fn = 2 (2, 3: "other" is a wrong no) -> 2*2 / (2*2 + 1 + 2)
        assert yes_no_f1(predicted, truth) == pytest.approx(4 / 7)
        assert yes_no_f1(["yes", "no"], ["yes", "no"]) == 1.0

    @pytest.mark.parametrize(
        ("predicted", "truth"),
        [(["no", "no"], ["no", "no"]), (["no", "other"], ["yes", "yes"]), (["yes"], ["no"]), ([], [])],
    )
    def test_f1_undefined_or_no_true_positive(self, predicted, truth):
        assert yes_no_f1(predicted, truth) == 0.0

    def test_f1_needs_equal_lengths(self):
        with pytest.raises(ValueError):
            yes_no_f1(["yes"], ["yes", "no"])


class TestScore:
    """Each question is scored by its own type's metric; mixing them up would silently change results."""

    def test_exact(self):
        q = question(("two",), "exact")
        assert score(q, "2") == 1.0 and score(q, "three") == 0.0

    def test_vqa(self):
        q = question(("cat", "cat", "dog") + ("x",) * 7, "vqa")
        assert score(q, "cat") == pytest.approx(2 / 3)
        assert score(q, "dog") == pytest.approx(1 / 3)
        assert score(q, "x") == 1.0

    def test_yesno(self):
        q = question(("Yes",), "yesno")
        assert score(q, "Yes, it is.") == 1.0
        assert score(q, "no") == 0.0
        assert score(q, "maybe") == 0.0
        assert score(question(("no",), "yesno"), "No, there is none.") == 1.0

    def test_exact_is_not_first_word(self):
        """An exact question is not credited for an answer that merely starts right."""
        assert score(question(("yes",), "exact"), "yes it is") == 0.0


def write_rows(folder: Path, rows: list[object | str], name: str = "q.jsonl") -> Path:
    """Write rows (objects as JSON, strings verbatim) one per line to ``folder/name``."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path = folder / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A folder with two images, ``a.png`` and ``sub/b.png``."""
    random_image(0).save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    random_image(1).save(tmp_path / "sub" / "b.png")
    return tmp_path


GOOD = {"image": "a.png", "question": "What is it?", "answers": ["cat"]}


class TestReadQuestions:
    """Real question files have broken rows; each must be skipped with its line number and counted, the
    rest read as written (paths relative to the file, types inferred), and a file with nothing usable
    refused with the first problem named, not run as an empty evaluation."""

    def test_good_rows(self, folder):
        rows = [
            {**GOOD, "id": "first", "category": "animals", "type": "vqa", "answers": ["cat"] * 3 + ["dog"]},
            {"image": "sub/b.png", "question": "Is it red?", "answers": ["Yes"]},
            {"image": "sub/b.png", "question": "How many?", "answers": "2"},
            {**GOOD, "target_patches": [3, 5], "prune_target": True},
        ]
        qs = read_questions(write_rows(folder, rows))
        assert qs.skipped == [] and qs.source == folder / "q.jsonl"
        a, b, c, d = qs.items
        assert [q.index for q in qs.items] == [0, 1, 2, 3]
        assert a.id == "first" and a.category == "animals" and a.type == "vqa" and a.answers == ("cat",) * 3 + ("dog",)
        assert a.image == folder / "a.png" and a.image.is_file()
        assert b.id == "line 2" and b.category == "all" and b.type == "yesno" and b.image == folder / "sub" / "b.png"
        assert c.answers == ("2",) and c.type == "exact"  # answers given as one string
        assert d.target_patches == (3, 5) and d.prune_target and not a.prune_target and a.target_patches is None

    @pytest.mark.parametrize(
        ("answers", "expected"),
        [(["yes"], "yesno"), (["No", "yes"], "yesno"), ("no", "yesno"), (["yes", "maybe"], "exact"), (["2"], "exact")],
    )
    def test_type_inferred(self, folder, answers, expected):
        qs = read_questions(write_rows(folder, [{**GOOD, "answers": answers}]))
        assert qs.items[0].type == expected

    def test_explicit_type_wins(self, folder):
        qs = read_questions(write_rows(folder, [{**GOOD, "answers": ["yes"], "type": "exact"}]))
        assert qs.items[0].type == "exact"

    def test_null_type_is_inferred(self, folder):
        """``"type": null`` (as many JSON writers emit for a missing value) means: infer it."""
        qs = read_questions(write_rows(folder, [{**GOOD, "answers": ["no"], "type": None}, {**GOOD, "type": None}]))
        assert qs.skipped == [] and [q.type for q in qs.items] == ["yesno", "exact"]

    def test_bad_rows_are_skipped_with_line_numbers(self, folder):
        rows: list[object | str] = [
            GOOD,  # 1
            "{not json",  # 2
            "",  # 3: blank lines are ignored, but counted in line numbers
            ["a", "list"],  # 4
            {"question": "q?", "answers": ["x"]},  # 5
            {"image": "a.png", "answers": ["x"]},  # 6
            {"image": "a.png", "question": "q?"},  # 7
            {**GOOD, "answers": []},  # 8
            {**GOOD, "answers": [1, 2]},  # 9
            {**GOOD, "type": "multiple-choice"},  # 10
            {**GOOD, "image": "missing.png"},  # 11
            {**GOOD, "prune_target": True},  # 12
            {**GOOD, "prune_target": True, "target_patches": []},  # 13
            {**GOOD, "target_patches": ["a"]},  # 14
            {**GOOD, "question": "   "},  # 15
            {**GOOD, "answers": ""},  # 16
            {**GOOD, "answers": ["cat", " "]},  # 17
            {**GOOD, "answers": ["Yes, it is"], "type": "yesno"},  # 18
            {**GOOD, "id": "last"},  # 19
        ]
        qs = read_questions(write_rows(folder, rows))
        assert [q.id for q in qs.items] == ["line 1", "last"]
        assert [q.index for q in qs.items] == [0, 1]
        assert len(qs.skipped) == 16
        expected = {
            2: "not valid JSON",
            4: "not a JSON object",
            5: "missing field 'image'",
            6: "missing field 'question'",
            7: "missing field 'answers'",
            8: "answers must be a non-empty list of text",
            9: "answers must be a non-empty list of text",
            10: "type must be one of exact, vqa, yesno, got 'multiple-choice'",
            11: "image not found",
            12: "prune_target needs target_patches",
            13: "prune_target needs target_patches",
            14: "target_patches must be a list of integers",
            15: "question must be non-empty text",
            16: "empty",
            17: "empty",
            18: "yesno answers must be yes or no",
        }
        for message, (line, fragment) in zip(qs.skipped, expected.items(), strict=True):
            assert message.startswith(f"line {line}: "), message
            assert fragment in message, message
        assert str(folder / "missing.png") in qs.skipped[8]

    def test_blank_answers_are_not_free_points(self, folder):
        """An empty answer would credit a model that says nothing; such rows are refused."""
        rows = [{**GOOD, "answers": ""}, {**GOOD, "answers": [""]}, {**GOOD, "answers": ["?"]}, GOOD]
        qs = read_questions(write_rows(folder, rows))
        assert len(qs.items) == 1 and [m.split(":")[0] for m in qs.skipped] == ["line 1", "line 2", "line 3"]
        assert all(score(q, "") == 0.0 for q in qs.items)

    def test_directory_resolves_to_items_jsonl(self, folder):
        write_rows(folder, [GOOD, GOOD], name="items.jsonl")
        write_rows(folder, [GOOD], name="control.jsonl")
        qs = read_questions(folder)
        assert qs.source == folder / "items.jsonl" and len(qs.items) == 2

    def test_image_paths_relative_to_the_file(self, folder):
        (folder / "nested").mkdir()
        path = write_rows(folder / "nested", [{**GOOD, "image": "../a.png"}, {**GOOD, "image": str(folder / "a.png")}])
        qs = read_questions(path)
        assert [q.image.resolve() for q in qs.items] == [(folder / "a.png").resolve()] * 2

    def test_nothing_usable_names_the_first_problem(self, folder):
        path = write_rows(folder, ["{broken", {**GOOD, "image": "nope.png"}])
        with pytest.raises(InputError, match=r"no usable questions; first problem: line 1: not valid JSON"):
            read_questions(path)

    def test_empty_file(self, folder):
        path = folder / "empty.jsonl"
        path.write_text("\n\n", encoding="utf-8")
        with pytest.raises(InputError, match=r"no usable questions$"):
            read_questions(path)

    @pytest.mark.parametrize("name", ["absent.jsonl", "absent-dir"])
    def test_missing_file(self, folder, name):
        with pytest.raises(InputError, match="question file not found"):
            read_questions(folder / name)

    def test_directory_without_items(self, folder):
        with pytest.raises(InputError, match=r"question file not found: .*items\.jsonl"):
            read_questions(folder / "sub")

    def test_not_utf8(self, folder):
        path = folder / "latin.jsonl"
        path.write_bytes(b'{"image": "a.png", "question": "caf\xe9?", "answers": ["x"]}\n')
        with pytest.raises(InputError, match="cannot read"):
            read_questions(path)
