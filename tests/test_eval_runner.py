"""Evaluation with interventions side by side (embedlens.bench.runner) on the tiny model: identical
answers when nothing is removed, resume after an interrupt, settings checks, the control split, presets,
the summary table, unreadable images, and the ``make-patchbench`` / ``eval`` commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from embedlens import InputError
from embedlens.bench import runner
from embedlens.bench.runner import (
    BASELINE,
    ITEMS_FILE,
    TABLE_JSON,
    TABLE_MD,
    EvalOptions,
    Setting,
    parse_setting,
    preset,
    run_eval,
    with_baseline,
)
from embedlens.bench.vqa import QuestionSet, read_questions, score, yes_no
from embedlens.interventions import Inject, Prune
from embedlens.runs import directory as run_directory
from embedlens.synth.qa import normalize_answer
from helpers import as_launched, assert_user_error, free_port, random_image, run_cli

#: Small and fast: 4 questions per batch, 2 new tokens, few bootstrap resamples.
OPTIONS = EvalOptions(batch_size=4, max_new_tokens=2, bootstrap=200)
GRID = 16  # the tiny model's 4 x 4 grid


@pytest.fixture(scope="module")
def bench_questions(bench_dir) -> QuestionSet:
    return read_questions(bench_dir)


#: The settings of the shared uninterrupted run: one that removes nothing, one that removes the targets.
WHOLE_SETTINGS = ("prune:[]", "prune:target")


@pytest.fixture(scope="module")
def whole(tiny, bench_questions, tmp_path_factory) -> tuple[dict[str, Any], Path]:
    """One uninterrupted run of the baseline and :data:`WHOLE_SETTINGS` on the benchmark: (table, folder)."""
    out = tmp_path_factory.mktemp("whole")
    table = evaluate(tiny, bench_questions, [parse_setting(s) for s in WHOLE_SETTINGS], out)
    return table, out


def evaluate(session, questions: QuestionSet, settings: list[Setting], out: Path, **kwargs) -> dict[str, Any]:
    return run_eval(session, questions, settings, out, options=kwargs.pop("options", OPTIONS), progress=False, **kwargs)


def items(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / ITEMS_FILE)


def by_setting(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    chosen = frame[frame["setting"] == name].reset_index(drop=True)
    assert len(chosen), name
    return chosen


class TestEmptyRemoval:
    """Baseline and settings run through one code path; a setting that removes nothing must then answer
    exactly like the baseline, or every delta in the table would contain noise from the machinery."""

    def test_identical_predictions(self, whole, bench_questions):
        table, out = whole
        frame = items(out)
        assert len(frame) == 3 * len(bench_questions.items) == 36
        base, empty = by_setting(frame, BASELINE), by_setting(frame, "prune:[]")
        assert base["id"].tolist() == empty["id"].tolist() == [q.id for q in bench_questions.items]
        assert base["prediction"].tolist() == empty["prediction"].tolist()
        assert all(isinstance(p, str) for p in base["prediction"])
        for column in ("score", "pruned", "tokens_layer0", "tokens_mean"):
            assert base[column].tolist() == empty[column].tolist(), column
        assert (base["status"] == "ok").all() and (empty["pruned"] == 0).all()
        entry = table["settings"][1]
        assert entry["name"] == "prune:[]"
        assert all(cell["delta"] == 0 for cell in entry["categories"].values())
        assert entry["overall"] == table["settings"][0]["overall"]

    def test_batching_does_not_change_answers(self, tiny, bench_questions, whole, tmp_path):
        """Left-padded batches: a question's answer does not depend on its neighbours."""
        first = QuestionSet(source=bench_questions.source, items=bench_questions.items[:6])
        evaluate(tiny, first, [], tmp_path / "one", options=EvalOptions(batch_size=1, max_new_tokens=2))
        batched = by_setting(items(whole[1]), BASELINE)["prediction"].tolist()[:6]
        assert items(tmp_path / "one")["prediction"].tolist() == batched


class TestResume:
    """Evaluations of real models run for hours; an interrupted run must resume from its committed parts,
    never redo them, and end with exactly the files an uninterrupted run writes."""

    @pytest.mark.parametrize("kill_after", [1, 4])
    def test_interrupted_run_resumes_to_the_same_result(
        self, tiny, bench_questions, whole, tmp_path, monkeypatch, kill_after
    ):
        settings = [parse_setting(s) for s in WHOLE_SETTINGS]
        table, whole_dir = whole
        batches = 3 * 3  # 12 questions in batches of 4, under 3 settings (the baseline first)

        real_write = run_directory.atomic_write_text
        committed: list[Path] = []

        def dies_after_commit(path, text):
            real_write(path, text)
            if path.parent.name == "parts":
                committed.append(path)
                if len(committed) == kill_after:
                    raise KeyboardInterrupt

        out = tmp_path / "killed"
        monkeypatch.setattr(run_directory, "atomic_write_text", dies_after_commit)
        with pytest.raises(KeyboardInterrupt):
            evaluate(tiny, bench_questions, settings, out)
        monkeypatch.setattr(run_directory, "atomic_write_text", real_write)
        parts = sorted((out / "parts").glob("*.json"))
        assert parts == sorted(committed) and len(parts) == kill_after
        assert not (out / ITEMS_FILE).exists() and not (out / TABLE_JSON).exists()
        before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in parts}

        real_answer = runner._answer_batch
        calls: list[tuple[str, list[int]]] = []

        def counting(session, setting, batch, options):
            calls.append((setting.name, [q.index for q in batch]))
            return real_answer(session, setting, batch, options)

        monkeypatch.setattr(runner, "_answer_batch", counting)
        resumed = evaluate(tiny, bench_questions, settings, out)
        assert len(calls) == batches - kill_after
        assert len(set(map(repr, calls))) == len(calls)
        assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in parts} == before  # not recomputed
        assert resumed == table
        assert json.loads((out / TABLE_JSON).read_text()) == json.loads((whole_dir / TABLE_JSON).read_text())
        assert (out / TABLE_MD).read_text() == (whole_dir / TABLE_MD).read_text()
        pd.testing.assert_frame_equal(items(out), items(whole_dir))

        calls.clear()  # a finished run: nothing is answered again, the same files come out
        assert evaluate(tiny, bench_questions, settings, out) == table
        assert calls == []
        pd.testing.assert_frame_equal(items(out), items(whole_dir))

    def test_other_settings_refused_then_restart(self, tiny, bench_questions, tmp_path):
        out = tmp_path / "out"
        settings = [parse_setting("prune:[]"), parse_setting("prune:target")]
        evaluate(tiny, bench_questions, settings, out)
        assert len(list((out / "parts").glob("s002-*.json"))) == 3
        with pytest.raises(InputError, match=r"other settings \(settings\); pass --restart"):
            evaluate(tiny, bench_questions, [parse_setting("prune:[]")], out)
        with pytest.raises(InputError, match=r"other settings \(max_new_tokens\); pass --restart"):
            evaluate(tiny, bench_questions, settings, out, options=EvalOptions(batch_size=4, max_new_tokens=3))
        table = evaluate(tiny, bench_questions, [parse_setting("prune:[]")], out, restart=True)
        assert [s["name"] for s in table["settings"]] == [BASELINE, "prune:[]"]
        assert not list((out / "parts").glob("s002-*.json"))  # the old parts went with the restart
        assert set(items(out)["setting"]) == {BASELINE, "prune:[]"}
        assert json.loads((out / "run.json").read_text())["settings"][1]["name"] == "prune:[]"

    def test_other_questions_refused(self, tiny, bench_dir, bench_questions, tmp_path):
        out = tmp_path / "out"
        evaluate(tiny, bench_questions, [], out)
        with pytest.raises(InputError, match="pass --restart"):
            evaluate(tiny, read_questions(bench_dir / "control.jsonl"), [], out)

    def test_parts_without_run_file_refused(self, tiny, bench_questions, tmp_path):
        (tmp_path / "out" / "parts").mkdir(parents=True)
        with pytest.raises(InputError, match=r"without run\.json; pass --restart"):
            evaluate(tiny, bench_questions, [], tmp_path / "out")

    def test_out_is_a_file(self, tiny, bench_questions, tmp_path):
        (tmp_path / "out").write_text("x")
        with pytest.raises(InputError, match="is a file"):
            evaluate(tiny, bench_questions, [], tmp_path / "out")


def _eval_worker(rank: int, world: int, port: int, model_dir: str, questions: str, out: str) -> None:
    """One process of an ``accelerate launch`` running the plain ``run_eval``."""
    import torch

    import embedlens
    from embedlens.runs import process_state

    as_launched(rank, world, port)
    try:
        torch.set_num_threads(1)
        session = embedlens.load(model_dir, device="cpu")
        settings = [parse_setting(s) for s in WHOLE_SETTINGS]
        table = evaluate(session, read_questions(questions), settings, Path(out))
        assert (table is not None) == (rank == 0)  # rank 0 merges and returns the table
    finally:
        process_state().destroy_process_group()


class TestTwoProcesses:
    """Under ``accelerate launch`` every process answers its share and rank 0 merges: the files must be
    exactly those of one process."""

    def test_gloo_equals_one_process(self, tiny_dir, bench_dir, whole, tmp_path):
        import torch.multiprocessing as mp

        _, whole_dir = whole
        args = (2, free_port(), str(tiny_dir), str(bench_dir), str(tmp_path / "two"))
        mp.start_processes(_eval_worker, args=args, nprocs=2, join=True, start_method="spawn")
        two = tmp_path / "two"
        assert json.loads((two / TABLE_JSON).read_text()) == json.loads((whole_dir / TABLE_JSON).read_text())
        pd.testing.assert_frame_equal(items(two), items(whole_dir))
        firsts = sorted({int(p.stem.split("-b")[1]) for p in (two / "parts").glob("s000-*.json")})
        assert firsts == [0, 4, 6, 10]  # two shares of six questions, each in batches of at most four
        assert not (two / "run.lock").exists()


class TestControlSplit:
    """The control split asks the same questions with the target patches' tokens removed; the count
    removed must be exactly the target's, and it must equal what an explicit ``prune:target`` setting
    removes, or the control would not measure what the paper claims."""

    def test_control_prunes_exactly_the_targets(self, tiny, bench_dir, tmp_path):
        control = read_questions(bench_dir / "control.jsonl")
        assert all(q.prune_target and q.id.endswith("-control") for q in control.items)
        table = evaluate(tiny, control, [parse_setting("prune:[]")], tmp_path / "control")
        frame = items(tmp_path / "control")
        expected = [len(q.target_patches) for q in control.items]
        assert max(expected) > 1  # count items have several targets
        for name in (BASELINE, "prune:[]"):
            assert by_setting(frame, name)["pruned"].tolist() == expected, name
        assert table["settings"][0]["pruned"] == pytest.approx(np.mean(expected))

    def test_prune_target_setting_matches_the_control(self, tiny, bench_dir, bench_questions, whole, tmp_path):
        evaluate(tiny, read_questions(bench_dir / "control.jsonl"), [], tmp_path / "control")
        control = by_setting(items(tmp_path / "control"), BASELINE)
        plain = items(whole[1])
        targeted = by_setting(plain, "prune:target")
        assert [i + "-control" for i in targeted["id"]] == control["id"].tolist()
        assert targeted["pruned"].tolist() == control["pruned"].tolist()
        assert targeted["pruned"].tolist() == [len(q.target_patches) for q in bench_questions.items]
        assert targeted["prediction"].tolist() == control["prediction"].tolist()
        assert targeted["tokens_layer0"].tolist() == control["tokens_layer0"].tolist()
        assert (by_setting(plain, BASELINE)["pruned"] == 0).all()

    def test_batches_never_mix_control_and_plain_rows(self, tiny, bench_dir, tmp_path):
        rows = [json.loads(line) for line in (bench_dir / "items.jsonl").read_text().splitlines()]
        control = [json.loads(line) for line in (bench_dir / "control.jsonl").read_text().splitlines()]
        mixed = [row for pair in zip(rows[:3], control[:3], strict=True) for row in pair]
        for row in mixed:
            row["image"] = str(bench_dir / row["image"])
        (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mixed))
        evaluate(tiny, read_questions(tmp_path / "mixed.jsonl"), [], tmp_path / "out")
        pruned = items(tmp_path / "out")["pruned"].tolist()
        assert pruned == [0 if i % 2 == 0 else len(mixed[i]["target_patches"]) for i in range(6)]


class TestSettings:
    """Settings name the table's columns and decide the run's identity: presets must have the paper's
    structure, the text notation must parse into the right interventions, and mistakes must stop early."""

    def test_paper_pruning_preset(self):
        settings = preset("paper-pruning", seeds=[0, 1])
        assert [s.name for s in settings] == [
            "-vit_sink",
            "-llm_sink",
            "-sinks",
            "-dead",
            "-sink+dead",
            "random(sink+dead) seed 0",
            "random(sink+dead) seed 1",
        ]
        assert [s.interventions for s in settings[:5]] == [
            (Prune(group=g, match="member"),) for g in ("vit_sink", "llm_sink", "sink", "dead", "sink+dead")
        ]
        assert [s.family for s in settings] == [None] * 5 + ["random control for sink+dead"] * 2
        for seed, setting in zip((0, 1), settings[5:], strict=True):
            assert setting.interventions == (
                Prune(group="sink+dead", select="matched_random", seed=seed, match="member"),
            )
        assert len(preset("paper-pruning")) == 5 + 5  # five seeds by default

    def test_with_baseline(self):
        settings = with_baseline(preset("paper-pruning", seeds=[0, 1]), num_layers=4)
        assert settings[0] == Setting(BASELINE) and settings[0].interventions == () and settings[0].family is None
        assert len(settings) == 8
        assert settings[0].to_dict() == {"name": "baseline", "interventions": [], "family": None}

    @pytest.mark.parametrize(
        "settings",
        [
            preset("paper-pruning", seeds=[0, 0]),
            [parse_setting("prune:dead"), parse_setting("prune:dead")],
            [*preset("paper-pruning", seeds=[0]), Setting("-dead", (Prune(group="dead"),))],
            [Setting(BASELINE, (Prune(group="dead"),))],
        ],
    )
    def test_duplicates_refused(self, settings):
        with pytest.raises(InputError, match="settings given twice"):
            with_baseline(settings, num_layers=4)

    def test_setting_checked_against_the_model(self):
        with pytest.raises(InputError, match=r"inject layer 9 is out of range for this model: use 0\.\.3"):
            with_baseline([parse_setting("inject@9")], num_layers=4)

    @pytest.mark.parametrize(("name", "seeds"), [("paper-prunning", [0]), ("", [0]), ("paper-pruning", [])])
    def test_bad_preset(self, name, seeds):
        with pytest.raises(InputError, match=r"unknown preset|at least one seed"):
            preset(name, seeds=seeds)

    @pytest.mark.parametrize("text", ["prune:dead inject@2", "prune:dead;inject@2", "  prune:dead ;  inject@2 "])
    def test_parse_setting(self, text):
        setting = parse_setting(text)
        assert setting.interventions == (Prune(group="dead"), Inject(2))
        assert setting.name == "prune:dead inject@2" and setting.family is None
        assert setting.to_dict()["interventions"] == ["prune:dead", "inject@2"]

    @pytest.mark.parametrize(
        ("text", "fragment"),
        [
            ("", "at least one intervention"),
            (" ; ", "at least one intervention"),
            ("prune:", "malformed intervention"),
            ("prune:dead !!", "malformed intervention"),
            ("prune:shiny", "unknown group"),
            ("teleport@2", "unknown intervention"),
            ("prune:dead,color=red", "unknown option"),
        ],
    )
    def test_bad_setting(self, text, fragment):
        with pytest.raises(InputError, match=fragment):
            parse_setting(text)

    @pytest.mark.parametrize("bad", [{"batch_size": 0}, {"max_new_tokens": -1}, {"bootstrap": True}, {"confidence": 1}])
    def test_bad_options(self, bad):
        with pytest.raises(InputError):
            EvalOptions(**bad)


# --------------------------------------------------------------------------- the summary table
CATEGORY = {0: "a", 1: "a", 2: "a", 3: "a", 4: "a", 5: "a", 6: "b", 7: "b", 8: "b", 9: "b"}
KIND = {4: "yesno", 5: "yesno", 6: "vqa", 7: "vqa"}


@pytest.fixture(scope="module")
def scored(tiny, tmp_path_factory) -> QuestionSet:
    """Ten questions on noise images whose answers are built from the tiny model's own baseline answers,
    so that scores are neither all 0 nor all 1: even exact questions are answered right, odd ones wrong,
    VQA questions by 2 of 10 annotators (2/3), yes/no questions half yes, half no."""
    folder = tmp_path_factory.mktemp("scored")
    rows = []
    for i in range(10):
        random_image(i).save(folder / f"{i}.png")
        rows.append({"id": f"q{i}", "image": f"{i}.png", "question": "What is it?", "answers": ["?x"]})
    (folder / "draft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    draft = read_questions(folder / "draft.jsonl")
    evaluate(tiny, draft, [], folder / "draft-run")
    predictions = by_setting(items(folder / "draft-run"), BASELINE)["prediction"].tolist()
    for i, (row, prediction) in enumerate(zip(rows, predictions, strict=True)):
        usable = bool(normalize_answer(prediction))
        row["category"] = CATEGORY[i]
        if KIND.get(i) == "yesno":
            row.update(type="yesno", answers=["yes" if i % 2 == 0 else "no"])
        elif KIND.get(i) == "vqa":
            row.update(type="vqa", answers=[prediction if usable else "zz"] * 2 + [f"other{k}" for k in range(8)])
        else:
            row["answers"] = [prediction if usable and i % 2 == 0 else "zzz"]
    (folder / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return read_questions(folder / "q.jsonl")


@pytest.fixture(scope="module")
def preset_run(tiny, scored, tiny_anchor_file, tmp_path_factory) -> tuple[dict[str, Any], pd.DataFrame, Path]:
    """The paper-pruning preset (two seeds) on the scored questions, with anchors that hit tiny's tokens."""
    out = tmp_path_factory.mktemp("preset")
    options = EvalOptions(batch_size=4, max_new_tokens=2, bootstrap=300, anchors=str(tiny_anchor_file))
    table = run_eval(tiny, scored, preset("paper-pruning", seeds=[0, 1]), out, options=options, progress=False)
    return table, items(out), out


def contains(interval: list[float], value: float) -> bool:
    return interval[0] - 1e-9 <= value <= interval[1] + 1e-9


class TestTable:
    """The table is what gets reported: per category scores with intervals that contain them, paired
    deltas against the baseline only, yes/no F1 where asked, and the random control summarised over
    seeds; each number must follow from items.parquet."""

    def test_baseline_scores_follow_the_answers(self, preset_run, scored):
        _, frame, _ = preset_run
        base = by_setting(frame, BASELINE)
        expected = [score(q, p) for q, p in zip(scored.items, base["prediction"], strict=True)]
        assert base["score"].tolist() == pytest.approx(expected)
        assert 0 < np.mean(expected) < 1, "the scored questions should give mixed scores"
        assert base["score"][0] == 1.0 and base["score"][1] == 0.0 and base["score"][6] == pytest.approx(2 / 3)

    def test_structure(self, preset_run, scored):
        table, frame, out = preset_run
        assert table["categories"] == ["a", "b"]
        assert table["items"] == table["answered_in_every_setting"] == 10 and table["skipped_rows"] == 0
        names = [s["name"] for s in table["settings"]]
        assert names == [BASELINE, *(s.name for s in preset("paper-pruning", seeds=[0, 1]))]
        assert json.loads((out / TABLE_JSON).read_text()) == table
        markdown = (out / TABLE_MD).read_text()
        for name in names:
            assert f"| {name} |" in markdown
        assert "random control for sink+dead (2 seeds)" in markdown
        assert len(frame) == 8 * 10

    def test_scores_deltas_and_intervals(self, preset_run):
        table, frame, _ = preset_run
        base = table["settings"][0]
        for number, entry in enumerate(table["settings"]):
            mine = frame[frame["setting_index"] == number]
            assert entry["overall"] == pytest.approx(mine["score"].mean())
            assert entry["overall_relaxed"] == pytest.approx(mine["relaxed"].mean())
            assert contains(entry["overall_interval"], entry["overall"])
            for category, cell in entry["categories"].items():
                scores = mine[mine["category"] == category]["score"]
                assert cell["n"] == len(scores) == (6 if category == "a" else 4)
                assert cell["score"] == pytest.approx(scores.mean())
                assert contains(cell["interval"], cell["score"])
                relaxed = mine[mine["category"] == category]["relaxed"]
                assert cell["relaxed"] == pytest.approx(relaxed.mean()) and cell["relaxed"] >= cell["score"]
                if number == 0:
                    assert "delta" not in cell and "delta_interval" not in cell
                else:
                    delta = cell["score"] - base["categories"][category]["score"]
                    assert cell["delta"] == pytest.approx(delta)
                    assert contains(cell["delta_interval"], cell["delta"])
        assert base["flops_ratio"] == 1.0

    def test_yes_no_columns(self, preset_run, scored):
        table, frame, _ = preset_run
        truth = [normalize_answer(q.answers[0]) for q in scored.items if q.type == "yesno"]
        for number, entry in enumerate(table["settings"]):
            assert "yesno_f1" not in entry["categories"]["b"]
            cell = entry["categories"]["a"]
            rows = frame[(frame["setting_index"] == number) & (frame["type"] == "yesno")]
            predicted = rows["yesno"].tolist()
            assert predicted == [yes_no(p) for p in rows["prediction"]]
            assert cell["yesno_n"] == 2 == len(truth)
            assert cell["yesno_accuracy"] == pytest.approx(
                np.mean([p == t for p, t in zip(predicted, truth, strict=True)])
            )
            assert 0 <= cell["yesno_f1"] <= 1

    def test_pruning_and_the_random_control(self, preset_run):
        table, frame, _ = preset_run
        union = by_setting(frame, "-sink+dead")["pruned"].to_numpy()
        assert union.sum() > 0, "the anchors should hit some tokens"
        for seed in (0, 1):
            random = by_setting(frame, f"random(sink+dead) seed {seed}")
            assert random["pruned"].tolist() == np.minimum(union, GRID - union).tolist()  # matched counts
            assert all(json.loads(s) for s in random["seeds"])
        sinks = by_setting(frame, "-sinks")["pruned"].to_numpy()
        for part in ("-vit_sink", "-llm_sink"):
            assert (by_setting(frame, part)["pruned"].to_numpy() <= sinks).all()
        assert (sinks <= union).all() and (by_setting(frame, "-dead")["pruned"].to_numpy() <= union).all()
        base = table["settings"][0]
        for entry in table["settings"][1:]:
            assert entry["tokens_layer0"] == pytest.approx(base["tokens_layer0"] - entry["pruned"])
            assert entry["flops_ratio"] <= 1.0

    def test_family_summary(self, preset_run):
        table, _, _ = preset_run
        (family,) = table["families"]
        members = [e for e in table["settings"] if e["family"] == "random control for sink+dead"]
        assert family["name"] == "random control for sink+dead" and family["seeds"] == len(members) == 2
        assert set(family["categories"]) == {"a", "b", "overall"}
        for category, cell in family["categories"].items():
            values = [m["overall"] if category == "overall" else m["categories"][category]["score"] for m in members]
            assert cell["mean"] == pytest.approx(np.mean(values))
            assert cell["spread"] == pytest.approx(np.std(values))
        assert family["pruned"] == pytest.approx(np.mean([m["pruned"] for m in members]))


def test_target_setting_needs_target_patches(tiny, tmp_path):
    """prune:target on questions without target patches would silently prune nothing: it is refused."""
    random_image(0).save(tmp_path / "0.png")
    row = {"image": "0.png", "question": "What is it?", "answers": ["cat"]}
    (tmp_path / "q.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(InputError, match="prunes 'target' but question line 1 has no target_patches"):
        evaluate(tiny, read_questions(tmp_path / "q.jsonl"), [parse_setting("prune:target")], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before any answer, nothing to resume or restart


class TestRows:
    """A row the model would refuse must not abort an evaluation after parts were committed: it is
    skipped and listed before any answer, and the rest runs."""

    def test_placeholder_in_a_question_is_skipped_and_listed(self, tiny, tmp_path):
        rows = []
        for i, question in enumerate(["What is it?", "Where is <image> the cat?", "Which colour?"]):
            random_image(i).save(tmp_path / f"{i}.png")
            rows.append({"image": f"{i}.png", "question": question, "answers": ["cat"]})
        (tmp_path / "q.jsonl").write_text("\ufeff" + "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        questions = read_questions(tmp_path / "q.jsonl")
        table = evaluate(tiny, questions, [parse_setting("prune:[0]")], tmp_path / "out")
        assert table["items"] == 2 and table["skipped_rows"] == 1
        frame = items(tmp_path / "out")
        assert sorted(set(frame["id"])) == ["line 1", "line 3"] and (frame["status"] == "ok").all()
        with pytest.raises(InputError, match="--suffix: the prompt contains the image placeholder"):
            evaluate(tiny, questions, [], tmp_path / "o2", options=EvalOptions(suffix=" <image>"))


class TestUnreadableImages:
    """A file that is not an image must not stop an hours-long run: it is recorded as unreadable in every
    setting and left out of every score; when nothing at all can be read, the run says so clearly."""

    @pytest.fixture
    def with_broken(self, tmp_path) -> QuestionSet:
        rows = []
        for i in range(4):
            name = f"{i}.png"
            if i == 2:
                (tmp_path / name).write_bytes(b"not an image")
            else:
                random_image(i).save(tmp_path / name)
            rows.append({"image": name, "question": "What is it?", "answers": ["cat"], "category": "c"})
        (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return read_questions(tmp_path / "q.jsonl")

    def test_recorded_and_excluded(self, tiny, with_broken, tmp_path):
        table = evaluate(tiny, with_broken, [parse_setting("prune:[0]")], tmp_path / "out")
        frame = items(tmp_path / "out")
        for name in (BASELINE, "prune:[0]"):
            rows = by_setting(frame, name)
            assert rows["status"].tolist() == ["ok", "ok", "unreadable", "ok"]
            assert rows["prediction"].isna().tolist() == [False, False, True, False]
            assert rows["score"].isna().tolist() == [False, False, True, False]
        assert table["items"] == 4 and table["answered_in_every_setting"] == 3
        for entry in table["settings"]:
            assert entry["categories"]["c"]["n"] == 3
        assert "3 of 4 questions answered in every setting" in (tmp_path / "out" / TABLE_MD).read_text()
        assert by_setting(frame, "prune:[0]")["pruned"].dropna().tolist() == [1, 1, 1]

    def test_nothing_readable(self, tiny, tmp_path):
        (tmp_path / "a.png").write_bytes(b"junk")
        (tmp_path / "q.jsonl").write_text(json.dumps({"image": "a.png", "question": "q?", "answers": ["x"]}) + "\n")
        with pytest.raises(InputError, match=r"none of the 1 questions was answered .*cannot read image"):
            evaluate(tiny, read_questions(tmp_path / "q.jsonl"), [], tmp_path / "out")
        assert not (tmp_path / "out" / TABLE_JSON).exists()


class TestCli:
    """The commands users run: ``make-patchbench`` then ``eval`` on its folder print the table and write
    the files; every mistake exits 2 with one line naming it, before any model time is spent where possible."""

    def test_make_then_eval(self, capsys, tiny_dir, tmp_path):
        bench, results = tmp_path / "bench", tmp_path / "results"
        code, out, err = run_cli(
            capsys, "make-patchbench", "--model", tiny_dir, "--out", bench, "--per-category", 2, "--no-progress"
        )
        assert code == 0, err
        assert "wrote 8 items (object 2, colour 2, count 2, ocr 2) for a 4x4 grid of 14 px patches" in out
        assert f"embedlens eval {bench}" in out
        assert len(list((bench / "images").glob("*.png"))) == 8
        assert {"items.jsonl", "control.jsonl", "meta.json"} <= {p.name for p in bench.iterdir()}

        args = ["eval", bench, "--model", tiny_dir, "--out", results, "--intervention", "prune:target"]
        args += ["--max-new-tokens", 2, "--no-progress", "--bootstrap", 50, "--device", "cpu"]
        code, out, err = run_cli(capsys, *args)
        assert code == 0, err
        assert "8 of 8 questions answered in every setting." in out
        assert "| setting | colour | count | object | ocr | overall | pruned | tokens L0 | FLOPs |" in out
        assert "| baseline |" in out and "| prune:target |" in out
        assert out.rstrip().endswith(f"wrote {results / ITEMS_FILE}, {results / TABLE_MD} and {results / TABLE_JSON}")
        assert (results / TABLE_MD).read_text() in out
        table = json.loads((results / TABLE_JSON).read_text())
        assert [s["name"] for s in table["settings"]] == [BASELINE, "prune:target"]
        frame = items(results)
        assert len(frame) == 16 and (by_setting(frame, "prune:target")["pruned"] >= 1).all()

        code, again, err = run_cli(capsys, *args)  # everything committed: the same table again
        assert code == 0, err
        assert again == out
        code, out, err = run_cli(capsys, *args[:7], "prune:[]", *args[8:])
        assert_user_error(code, out, err, "other settings (settings); pass --restart")

    @pytest.mark.parametrize(
        ("extra", "fragment"),
        [
            (["--preset", "paper-prunning"], "unknown preset 'paper-prunning'"),
            (["--preset", "paper-pruning", "--seeds", "1,x"], "--seeds must be comma-separated integers"),
            (["--intervention", "prune:dead !!"], "malformed intervention"),
            (["--intervention", ""], "at least one intervention"),
            (["--intervention", "inject@9"], "inject layer 9 is out of range for this model: use 0..3"),
            (["--batch-size", 0], "batch-size must be a positive integer"),
        ],
    )
    def test_bad_eval_options(self, capsys, tiny_dir, bench_dir, tmp_path, extra, fragment):
        code, out, err = run_cli(capsys, "eval", bench_dir, "--model", tiny_dir, "--out", tmp_path / "r", *extra)
        assert_user_error(code, out, err, fragment)
        assert not (tmp_path / "r").exists()

    def test_missing_dataset(self, capsys, tiny_dir, tmp_path):
        code, out, err = run_cli(capsys, "eval", tmp_path / "nope.jsonl", "--model", tiny_dir, "--out", tmp_path / "r")
        assert_user_error(code, out, err, "question file not found")

    def test_eval_out_is_a_file(self, capsys, tiny_dir, bench_dir, tmp_path):
        (tmp_path / "r").write_text("x")
        code, out, err = run_cli(capsys, "eval", bench_dir, "--model", tiny_dir, "--out", tmp_path / "r")
        assert_user_error(code, out, err, "is a file")

    @pytest.mark.parametrize(
        ("extra", "fragment"),
        [
            (["--categories", "object,shoes"], "unknown categories ['shoes']"),
            (["--per-category", 0], "--per-category must be a positive integer"),
        ],
    )
    def test_bad_make_patchbench(self, capsys, tiny_dir, tmp_path, extra, fragment):
        args = ["make-patchbench", "--model", tiny_dir, "--out", tmp_path / "b", "--no-progress", *extra]
        code, out, err = run_cli(capsys, *args)
        assert_user_error(code, out, err, fragment)
        assert not (tmp_path / "b" / "items.jsonl").exists()

    def test_make_patchbench_out_is_a_file(self, capsys, tiny_dir, tmp_path):
        (tmp_path / "b").write_text("x")
        code, out, err = run_cli(capsys, "make-patchbench", "--model", tiny_dir, "--out", tmp_path / "b")
        assert_user_error(code, out, err, "is a file")
