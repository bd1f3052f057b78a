"""The injection sweep (embedlens inject-sweep): settings, k = 0 against the baseline, tables, resume, CLI."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from embedlens import InputError
from embedlens.analysis import sweep
from embedlens.analysis.sweep import (
    SweepOptions,
    best_layer,
    render_scaling,
    run_inject_sweep,
    scaling_settings,
    sweep_settings,
)
from embedlens.bench.runner import EvalOptions
from embedlens.bench.vqa import read_questions
from embedlens.cli import parse_layer_list
from embedlens.interventions import Inject, Scale, Skip
from helpers import assert_user_error, run_cli

QUICK = SweepOptions(
    layers=(0, 2, 3),
    scales=(0.1, 1.0),
    timing_items=1,
    timing_repeats=1,
    eval=EvalOptions(batch_size=4, max_new_tokens=2, bootstrap=50),
)


@pytest.fixture(scope="module")
def swept(tiny, bench_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "out"
    return run_inject_sweep(tiny, [read_questions(bench_dir)], out, options=QUICK, progress=False)


class TestSettings:
    def test_default_layers_and_skip_row(self):
        chosen = sweep_settings(8, SweepOptions())
        inject = [c for c in chosen if c.kind == "inject"]
        assert [c.layer for c in inject] == list(range(8))
        assert all(c.setting.interventions == (Inject(c.layer),) for c in inject)
        (skip,) = [c for c in chosen if c.kind == "skip"]
        (item,) = skip.setting.interventions
        assert isinstance(item, Skip) and item.group == "visual"
        assert set(item.sublayers) == {(layer, part) for layer in range(4) for part in ("attn", "mlp")}

    def test_no_skip_row(self):
        assert all(c.kind == "inject" for c in sweep_settings(8, SweepOptions(skip_until=0)))

    @pytest.mark.parametrize(
        ("options", "fragment"),
        [
            (SweepOptions(layers=(0, 8)), "injection layers must be in 0..7"),
            (SweepOptions(layers=()), "injection layers"),
            (SweepOptions(skip_until=9), "skip-until"),
        ],
    )
    def test_bad_settings(self, options, fragment):
        with pytest.raises(InputError, match=fragment):
            sweep_settings(8, options)

    @pytest.mark.parametrize("bad", [{"scales": (0.0,)}, {"timing_items": -1}, {"timing_repeats": 0}])
    def test_bad_options(self, bad):
        with pytest.raises(InputError):
            SweepOptions(**bad)

    def test_scaling_settings(self):
        chosen = scaling_settings(5, (0.01, 1.0))
        items = [c.setting.interventions for c in chosen]
        assert items == [(Scale(0.01),), (Inject(5, scale=0.01),), (Inject(5),)]

    def test_best_layer_prefers_score_then_later_layer(self):
        rows = [
            {"kind": "baseline", "layer": 0, "mean_score": 0.9},
            {"kind": "inject", "layer": 0, "mean_score": 0.9},
            {"kind": "inject", "layer": 2, "mean_score": 0.5},
            {"kind": "inject", "layer": 4, "mean_score": 0.7},
            {"kind": "inject", "layer": 6, "mean_score": 0.7},
            {"kind": "skip", "layer": 4, "mean_score": 1.0},
        ]
        assert best_layer(rows) == 6
        assert best_layer(rows[:2]) is None

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("all", None),
            (None, None),
            ("0,4,8", (0, 4, 8)),
            ("2-4", (2, 3, 4)),
            ("0-8:4", (0, 4, 8)),
            ("3,1,3", (1, 3)),
        ],
    )
    def test_layer_lists(self, text, expected):
        assert parse_layer_list(text, "--layers") == expected

    @pytest.mark.parametrize("text", ["x", "4-2", "1-3:0", "-1", ","])
    def test_bad_layer_lists(self, text):
        with pytest.raises(InputError):
            parse_layer_list(text, "--layers")


class TestRun:
    def test_inject_at_zero_equals_the_baseline(self, swept, bench_dir):
        name = sweep.dataset_name(read_questions(bench_dir), 0)
        frame = pd.read_parquet(swept.out / f"sweep-{name}" / "items.parquet")
        base = frame[frame["setting"] == "baseline"].sort_values("index")
        zero = frame[frame["setting"] == "inject@0"].sort_values("index")
        assert len(base) == len(zero) > 0
        assert base["prediction"].tolist() == zero["prediction"].tolist()
        rows = {r["setting"]: r for r in swept.rows}
        assert rows["inject@0"]["flops_ratio"] == pytest.approx(1.0)
        assert rows["inject@0"]["deltas"][name] == 0

    def test_rows(self, swept, tiny):
        rows = {r["setting"]: r for r in swept.rows}
        assert list(rows) == ["baseline", "inject@0", "inject@2", "inject@3", "skip:visual@0-1.5"]
        # later injection: fewer tokens per layer on average, fewer FLOPs
        means = [rows[f"inject@{k}"]["tokens_mean"] for k in (0, 2, 3)]
        assert means[0] > means[1] > means[2]
        assert rows["inject@3"]["flops_ratio"] < rows["inject@2"]["flops_ratio"] < 1
        assert rows["skip:visual@0-1.5"]["flops_ratio"] < 1
        assert all(r["prefill_ms"] > 0 and r["time_ratio"] > 0 for r in swept.rows)
        assert rows["baseline"]["time_ratio"] == 1.0
        assert swept.best_layer in (2, 3)

    def test_scaling(self, swept):
        names = [r["setting"] for r in swept.scaling_rows]
        best = swept.best_layer
        assert names == ["baseline", "scale:0.1", f"inject@{best},scale=0.1", f"inject@{best}"]
        # the same setting in both stages gives the same answers and score
        sweep_row = next(r for r in swept.rows if r["setting"] == f"inject@{best}")
        scaled_row = next(r for r in swept.scaling_rows if r["setting"] == f"inject@{best}")
        assert sweep_row["scores"] == scaled_row["scores"]

    def test_files(self, swept):
        for name in ("sweep.parquet", "sweep.md", "sweep.json", "sweep.png", "scaling.md", "scaling.parquet"):
            assert (swept.out / name).is_file(), name
        summary = json.loads((swept.out / "sweep.json").read_text())
        assert summary["best_layer"] == swept.best_layer and len(summary["rows"]) == 5
        text = (swept.out / "sweep.md").read_text()
        assert f"inject@{swept.best_layer} (best)" in text
        assert "| 0.1 |" in (swept.out / "scaling.md").read_text()

    def test_resume_answers_nothing_again(self, tiny, bench_dir, swept, monkeypatch):
        from embedlens.bench import runner

        ran = []
        real = runner.collect

        def spy(*args, **kwargs):
            ran.append(real(*args, **kwargs))
            return ran[-1]

        monkeypatch.setattr(runner, "collect", spy)
        again = run_inject_sweep(tiny, [read_questions(bench_dir)], swept.out, options=QUICK, progress=False)
        assert len(ran) == 2 and ran == [0, 0]  # the sweep and the scaling evaluation, both complete
        assert [r["scores"] for r in again.rows] == [r["scores"] for r in swept.rows]

    def test_several_datasets(self, tiny, bench_dir, tmp_path):
        questions = read_questions(bench_dir)
        ocr = tmp_path / "ocr.jsonl"
        ocr.write_text(
            "".join(
                json.dumps({"image": str(q.image), "question": q.question, "answers": list(q.answers)}) + "\n"
                for q in questions.items
                if q.category == "ocr"
            )
        )
        options = SweepOptions(layers=(0, 1), skip_until=0, scales=(), timing_items=0, eval=QUICK.eval)
        result = run_inject_sweep(
            tiny, [questions, read_questions(ocr)], tmp_path / "out", options=options, progress=False
        )
        assert list(result.rows[0]["scores"]) == ["0-" + bench_dir.name, "1-ocr"]
        assert result.scaling_rows == [] and all(r["prefill_ms"] is None for r in result.rows)
        assert not (tmp_path / "out" / "scaling.md").exists()

    def test_timing_synchronises_the_device(self, tiny, bench_dir, monkeypatch):
        """Prefill on a GPU is asynchronous: every timed prefill must be fenced by a synchronisation on
        both sides, or the sweep times the launch of the kernels instead of their work."""
        from embedlens.bench import accounting

        events: list[str] = []
        real_prefill = accounting.prefill_once
        monkeypatch.setattr(accounting, "_sync", lambda device: events.append("sync"))
        monkeypatch.setattr(accounting, "prefill_once", lambda *a: (events.append("prefill"), real_prefill(*a)))
        options = SweepOptions(layers=(0,), skip_until=0, timing_items=2, timing_repeats=1, eval=QUICK.eval)
        chosen = sweep.sweep_settings(tiny.num_layers, options)
        seconds = sweep.time_settings(tiny, read_questions(bench_dir), [c.setting for c in chosen], options)
        assert set(seconds) == {"baseline", "inject@0"} and all(v > 0 for v in seconds.values())
        prefills = 2 * 2 * 2  # (warm-up + 1 round) x 2 questions x 2 settings
        assert events == ["sync", "prefill", "sync"] * prefills

    def test_bad_best_layer(self, tiny, bench_dir, tmp_path):
        options = SweepOptions(layers=(0,), best_layer=7, eval=QUICK.eval)
        with pytest.raises(InputError, match="best-layer"):
            run_inject_sweep(tiny, [read_questions(bench_dir)], tmp_path / "o", options=options, progress=False)

    def test_scaling_table_render(self):
        rows = [
            {"kind": "baseline", "layer": 0, "scale": 1.0, "scores": {"d": 0.5}, "deltas": {"d": 0.0}},
            {"kind": "scale", "layer": 0, "scale": 0.1, "scores": {"d": 0.25}, "deltas": {"d": -0.25}},
            {"kind": "scale", "layer": 3, "scale": 0.1, "scores": {"d": 0.5}, "deltas": {"d": 0.0}},
            {"kind": "scale", "layer": 3, "scale": 1.0, "scores": {"d": 0.75}, "deltas": {"d": 0.25}},
        ]
        for row in rows:
            row["relaxed"] = {"d": row["scores"]["d"] + 0.125}
        text = render_scaling(rows, ["d"], 3, (0.1, 1.0))
        assert "| 0.1 | 25.0 (Δ -25.0; relaxed 37.5) | 50.0 (Δ +0.0; relaxed 62.5) |" in text
        assert "| 1 | 50.0 (Δ +0.0; relaxed 62.5) | 75.0 (Δ +25.0; relaxed 87.5) |" in text


class TestCli:
    def test_command(self, capsys, tiny_dir, bench_dir, tmp_path):
        code, out, err = run_cli(
            capsys, "inject-sweep", bench_dir, "--model", tiny_dir, "--device", "cpu", "--out", tmp_path / "o",
            "--layers", "0,2", "--skip-until", "1", "--scales", "0.5,1", "--timing-items", "1", "--timing-repeats", "1",
            "--max-new-tokens", "2", "--bootstrap", "50", "--no-progress",
        )  # fmt: skip
        assert code == 0, err
        assert "inject@2" in out and "skip:visual@0,0.5" in out and "| 0.5 |" in out
        assert (tmp_path / "o" / "sweep.png").is_file()

    @pytest.mark.parametrize(
        ("extra", "fragment"),
        [
            (["--layers", "0,9"], "injection layers must be in 0..3"),
            (["--layers", "zero"], "--layers takes layers"),
            (["--scales", "a,b"], "--scales must be comma-separated numbers"),
            (["--scales", "0"], "scales must be a positive finite number, got 0"),
            (["--best-layer", "4"], "best-layer must be in 0..3"),
        ],
    )
    def test_bad_input(self, capsys, tiny_dir, bench_dir, tmp_path, extra, fragment):
        code, out, err = run_cli(
            capsys, "inject-sweep", bench_dir, "--model", tiny_dir, "--device", "cpu", "--out", tmp_path / "o", *extra
        )
        assert_user_error(code, out, err, fragment)

    def test_missing_dataset(self, capsys, tiny_dir, tmp_path):
        code, out, err = run_cli(
            capsys, "inject-sweep", tmp_path / "none.jsonl", "--model", tiny_dir, "--out", tmp_path / "o"
        )
        assert_user_error(code, out, err, "question file not found")
