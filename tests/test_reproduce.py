"""``embedlens reproduce`` without running anything: the plan for a LLaVA-1.5-7B-shaped config (no weights),
its predicted FLOPs and commands, and the roll-up of hand-written lmms-eval results into the paper's table.

The 7B config is built here (CLIP ViT-L/14-336 vision tower, LLaMA-7B decoder, 32064-row vocabulary) and
saved as ``config.json`` alone: the dry run must not need weights, a processor or the network.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import typer
from lmms_eval.utils import simple_parse_args_string
from typer.testing import CliRunner

from embedlens import InputError
from embedlens.bench.lmms_model import parse_interventions
from embedlens.cli.reproduce import parse_tasks, reproduce
from embedlens.interventions import Prune, describe, parse
from embedlens.reproduce.costs import Shares, cost_model
from embedlens.reproduce.paper import DOCUMENTS, PAPER_SUITE, PUBLISHED, TaskMetric, TaskSuite, llava15_7b_config
from embedlens.reproduce.plan import PlanOptions, build_plan, paper_rows, random_control, render, target
from embedlens.reproduce.runner import best_layer, current_shares
from embedlens.reproduce.table import render_markdown, rollup, write_table


@pytest.fixture(scope="module")
def llava7b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding only the config.json of a LLaVA-1.5-7B-shaped model."""
    config = llava15_7b_config()
    folder = tmp_path_factory.mktemp("llava7b")
    config.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cost(llava7b):
    return cost_model(str(llava7b))


def _options(llava7b: Path, out: Path, **kwargs) -> PlanOptions:
    return PlanOptions(model=str(llava7b), out=out, **kwargs)


class TestCostModel:
    """FLOPs come from the config alone and must agree with the model's parameter count."""

    def test_built_without_weights(self, llava7b, cost):
        assert sorted(p.name for p in llava7b.iterdir()) == ["config.json"]
        assert (cost.dims.layers, cost.dims.hidden, cost.dims.vocab, cost.visual_tokens) == (32, 4096, 32064, 576)

    def test_baseline_matches_twice_the_parameters_per_token(self, llava7b, cost):
        """Decoder FLOPs ~ 2 x decoder parameters x tokens (plus attention scores, a few percent at 640 tokens)."""
        import torch
        from transformers import AutoConfig, LlavaForConditionalGeneration

        with torch.device("meta"):
            model = LlavaForConditionalGeneration(AutoConfig.from_pretrained(llava7b))
        params = sum(p.numel() for p in model.model.language_model.layers.parameters() if p.dim() == 2)
        tokens = cost.length
        decoder = cost.sample_flops([], Shares.paper()) - cost.vision - 2 * 4096 * 32064
        assert decoder == pytest.approx(2 * params * tokens, rel=0.03)
        assert decoder > 2 * params * tokens  # the attention scores come on top
        # Vision: 2 x tower parameters x 577 tokens (576 patches + CLS), attention scores, the projector per patch.
        tower = sum(p.numel() for p in model.model.vision_tower.parameters() if p.dim() == 2)
        projector = sum(p.numel() for p in model.model.multi_modal_projector.parameters() if p.dim() == 2)
        expected = 2 * tower * 577 + 24 * 4 * 577 * 577 * 1024 + 2 * projector * 576
        assert cost.vision == pytest.approx(expected, rel=0.02)

    def test_fewer_tokens_cost_less(self, cost):
        shares = Shares.paper()

        def flops(text: str) -> float:
            return cost.sample_flops([parse(s) for s in text.split()], shares)

        base = flops("")
        assert flops("prune:sink+dead") < flops("prune:dead") < flops("prune:sink") < flops("prune:llm_sink") < base
        assert flops("prune:sink+dead,select=matched_random,seed=1") == flops("prune:sink+dead")
        assert flops("inject@16") < flops("inject@8") < flops("inject@2") < base
        assert flops("skip:llm_sink@0.5-1.5") < flops("skip:llm_sink@1.5") < base
        assert flops("scale:0.01") == base
        # 40% of 576 visual tokens gone from 640: the decoder share shrinks by about 36%.
        assert flops("prune:sink+dead") / base == pytest.approx(0.65, abs=0.03)


class TestPlan:
    """The run list is the reference's experiment set; every command is one lmms-eval accepts."""

    def test_runs_of_the_full_set(self, llava7b, cost, tmp_path):
        images = tmp_path / "images"
        images.mkdir()
        runs = build_plan(_options(llava7b, tmp_path / "out", images=images), cost, Shares.paper())
        names = [run.name for run in runs]
        assert len(set(names)) == len(names)
        # stats + 13 rows x 4 groups (baseline, 3 sinks, dead, sink+dead, 3 seeds, 4 skips) + 5 injects + 2 scales
        assert len(runs) == 1 + 13 * 4 + 5 + 2 and runs[0].kind == "stats"
        rows = {run.row for run in runs[1:]}
        assert "inject@0" not in rows and "inject@16" in rows
        random = [run for run in runs if run.row == "random"]
        assert sorted({run.seed for run in random}) == [0, 1, 2]
        for run in random:
            assert parse(run.interventions) == Prune(
                group="sink+dead", select="matched_random", seed=run.seed, match="member"
            )
        skips = sorted({run.interventions for run in runs if run.row.startswith("skip")})
        assert [describe(parse(s)) for s in skips] == skips
        assert {parse(s).sublayers for s in skips} == {
            ((1, "mlp"),),
            ((0, "mlp"), (1, "attn")),
            ((0, "mlp"), (1, "attn"), (1, "mlp")),
        }
        cv = set(PAPER_SUITE.groups["CV-centric"])
        assert all(set(run.tasks) <= cv for run in runs if run.row.startswith(("inject", "scale")))
        pending = [run for run in runs if run.pending]
        assert [run.row for run in pending] == ["inject@best,scale=0.01"]

    def test_commands_are_well_formed(self, llava7b, cost, tmp_path):
        options = _options(llava7b, tmp_path / "out", limit=5, batch_size=4, anchors=tmp_path / "a.json")
        for run in build_plan(options, cost, Shares.paper()):
            argv = shlex.split(run.shell())
            assert argv == run.command
            assert argv[1:7] == ["-m", "lmms_eval", "eval", "--model", "embedlens", "--model_args"]
            args = simple_parse_args_string(argv[7])
            assert args["pretrained"] == str(llava7b) and args["profile"] == "paper"
            assert args["anchors"] == str(tmp_path / "a.json")
            assert parse_interventions(args.get("interventions")) == tuple(parse(s) for s in run.interventions.split())
            assert "--log_samples" in argv
            rest = [arg for arg in argv[8:] if arg != "--log_samples"]
            flags = dict(zip(rest[::2], rest[1::2], strict=True))
            assert flags["--tasks"] == ",".join(run.tasks) and flags["--limit"] == "5"
            assert flags["--batch_size"] == "4"
            assert Path(flags["--output_path"]) == tmp_path / "out" / "runs" / run.name / "lmms"
            assert run.documents == 5 * len(run.tasks)

    def test_several_processes_go_through_accelerate(self, llava7b, cost, tmp_path):
        options = _options(llava7b, tmp_path, num_processes=4, device="cuda", stages=("baseline",))
        run = build_plan(options, cost, Shares.paper())[0]
        assert run.command[1:5] == ["-m", "accelerate.commands.launch", "--num_processes", "4"]
        assert "device=" not in run.command[run.command.index("--model_args") + 1]

    def test_target_is_the_one_notation_builder(self):
        assert target("prune", "sink+dead") == "prune:sink+dead,match=member"
        assert target("skip", "llm_sink", at="0.5,1") == "skip:llm_sink@0.5,1,match=member"
        assert target("skip", "alive", at="1.5") == "skip:alive@1.5"  # no anchor: label and member agree
        assert random_control(2) == "prune:sink+dead,select=matched_random,seed=2,match=member"
        for row in paper_rows():
            if row.interventions and "best" not in row.interventions:
                assert describe(parse(row.interventions)) == row.interventions

    def test_measured_shares_replace_the_papers(self, llava7b, cost, tmp_path):
        out = tmp_path / "out"
        assert current_shares(out).source.startswith("the paper's")
        (out / "stats").mkdir(parents=True)
        groups = {"vit_sink": 0.01, "llm_sink": 0.02, "dead": 0.5, "alive": 0.47}
        summary = {"groups": {k: {"fraction": v} for k, v in groups.items()}, "images": {"used": 9}}
        (out / "stats" / "summary.json").write_text(json.dumps(summary))
        shares = current_shares(out)
        assert shares.dead == 0.5 and "9 images" in shares.source
        options = _options(llava7b, out, stages=("dead",), seeds=(0,))
        measured = {run.row: run.flops for run in build_plan(options, cost, shares)}
        paper = {run.row: run.flops for run in build_plan(options, cost, Shares.paper())}
        assert measured["-dead"] < paper["-dead"]
        assert measured["random"] > measured["-sink+dead"]  # 53% targeted, only 47% alive to draw from

    def test_bad_options_refused(self, llava7b, tmp_path):
        with pytest.raises(InputError, match="unknown experiment stage"):
            _options(llava7b, tmp_path, stages=("baseline", "bogus"))
        with pytest.raises(InputError, match="at least one seed"):
            _options(llava7b, tmp_path, seeds=())
        with pytest.raises(InputError, match="unknown task 'refcoco_bbox_val'"):
            parse_tasks("General,refcoco_bbox_val")
        assert parse_tasks("hallucination,mme") == ("pope", "hallusion_bench_image", "mme")


class TestDryRunCommand:
    """The typer command prints the plan from the config alone and refuses bad input in one line."""

    def _app(self) -> typer.Typer:
        app = typer.Typer()
        app.command("reproduce")(reproduce)

        @app.callback()
        def _root() -> None:
            pass

        return app

    def test_dry_run_prints_runs_costs_and_commands(self, llava7b, tmp_path):
        result = CliRunner().invoke(self._app(), ["reproduce", str(llava7b), "--dry-run", "--out", str(tmp_path / "o")])
        assert result.exit_code == 0, result.output
        text = result.output
        assert "64 nominal text tokens" in text and "200 TFLOP/s" in text and "the paper's figures" in text
        assert text.count("$ ") == 59 and "total:" in text
        assert not (tmp_path / "o").exists()  # a dry run writes nothing

    @pytest.mark.parametrize(
        ("args", "fragment"),
        [
            (["--tasks", "nope"], "unknown task"),
            (["--seeds", "a"], "comma-separated integers"),
            (["--profile", "papr"], "unknown profile"),
            (["--images", "/nonexistent"], "not a folder"),
        ],
    )
    def test_user_errors(self, llava7b, tmp_path, args, fragment):
        result = CliRunner().invoke(self._app(), ["reproduce", str(llava7b), "--dry-run", *args])
        assert isinstance(result.exception, InputError) and fragment in str(result.exception)


# --------------------------------------------------------------------------- the roll-up
SUITE = TaskSuite(
    groups={"General": ("mme", "gqa"), "OCR": ("ocrbench",), "CV-centric": (), "Hallucination": ("pope",)},
    metrics={t: PAPER_SUITE.metrics[t] for t in ("mme", "gqa", "ocrbench", "pope")},
)


def _fake_run(out: Path, name: str, row: str, results: dict, seed: int | None = None, done: bool = True) -> None:
    """A run folder as the runner and lmms-eval 0.7.3 leave it."""
    folder = out / "runs" / name
    lmms = folder / "lmms" / "llava-hf__llava-1.5-7b-hf"
    lmms.mkdir(parents=True)
    record = {"kind": "lmms", "row": row, "seed": seed, "tasks": list(results), "interventions": row}
    (folder / "run.json").write_text(json.dumps(record))
    stale = {task: {k: 0.0 for k in metrics} for task, metrics in results.items()}
    (lmms / "20260101_000000_results.json").write_text(json.dumps({"results": stale}))  # older attempt
    (lmms / "20260102_000000_results.json").write_text(json.dumps({"results": results, "configs": {}}))
    if done:
        (folder / "done.json").write_text("{}")


class TestTable:
    """Scores are read from lmms-eval's layout, scaled to 0..100, averaged per group, and compared."""

    @pytest.fixture
    def out(self, tmp_path) -> Path:
        _fake_run(
            tmp_path,
            "base_g",
            "original",
            {
                "mme": {"mme_perception_score,none": 1500.0, "mme_cognition_score,none": 300.0, "alias": "mme"},
                "gqa": {"exact_match,none": 0.62},
            },
        )
        _fake_run(tmp_path, "base_o", "original", {"ocrbench": {"ocrbench_accuracy,none": 0.3}})
        _fake_run(tmp_path, "base_h", "original", {"pope": {"pope_accuracy,none": 0.86}})
        _fake_run(tmp_path, "dead_g", "-sink+dead", {"gqa": {"exact_match,none": 0.60}})
        for seed, value in ((0, 0.50), (1, 0.54)):
            _fake_run(tmp_path, f"rand{seed}", "random", {"gqa": {"exact_match,none": value}}, seed=seed)
        _fake_run(tmp_path, "unfinished", "-dead", {"gqa": {"exact_match,none": 0.99}}, done=False)
        return tmp_path

    def test_group_averages_and_deltas(self, out):
        rows = [("original", "original"), ("-dead", "- dead"), ("-sink+dead", "- sink+dead"), ("random", "random")]
        table = {r["row"]: r for r in rollup(out, SUITE, rows)["rows"]}
        base = table["original"]["columns"]
        mme = 1800 / 2800 * 100
        assert table["original"]["tasks"]["mme"]["mean"] == pytest.approx(mme)
        assert base["General"]["mean"] == pytest.approx((mme + 62) / 2) and base["General"]["held"] == 2
        assert base["OCR"]["mean"] == pytest.approx(30.0) and base["CV-centric"]["mean"] is None
        assert base["Avg"]["mean"] == pytest.approx(((mme + 62) / 2 + 30 + 86) / 3) and base["Avg"]["held"] == 3
        assert base["General"]["paper"] == PUBLISHED["original"]["General"] and base["General"]["delta"] == 0
        dead = table["-sink+dead"]["columns"]["General"]
        assert dead["mean"] == pytest.approx(60.0) and dead["held"] == 1
        assert dead["delta"] == pytest.approx(60.0 - (mme + 62) / 2)
        assert table["-dead"]["runs"] == 0 and table["-dead"]["columns"]["General"]["mean"] is None
        random = table["random"]["columns"]["General"]
        assert table["random"]["seeds"] == [0, 1]
        assert random["mean"] == pytest.approx(52.0) and random["sd"] == pytest.approx(2.828427, rel=1e-5)

    def test_markdown_and_files(self, out):
        md, data = write_table(out, SUITE, [("original", "original"), ("-dead", "- dead"), ("random", "random")])
        text = md.read_text()
        assert "| original | " in text and "\\| 58.7" in text  # the paper's figure beside ours
        assert "[2/2]" not in text and "[3/4]" in text  # Avg over three of four groups says so
        assert "| - dead | — | — | — | — | — |" in text
        assert "52.0 ± 2.8 [1/2]" in text
        assert "(perception + cognition) / 2800" in text
        assert json.loads(data.read_text()) == json.loads(
            json.dumps(rollup(out, SUITE, [("original", "original"), ("-dead", "- dead"), ("random", "random")]))
        )
        assert render_markdown(json.loads(data.read_text())) == text

    def test_best_injection_layer(self, tmp_path, llava7b):
        suite = TaskSuite(groups={"CV-centric": ("pope",)}, metrics={"pope": PAPER_SUITE.metrics["pope"]})
        options = _options(llava7b, tmp_path, suite=suite, inject_layers=(0, 4, 8))
        _fake_run(tmp_path, "b", "original", {"pope": {"pope_accuracy,none": 0.5}})
        _fake_run(tmp_path, "i4", "inject@4", {"pope": {"pope_accuracy,none": 0.7}})
        assert best_layer(tmp_path, options) is None  # inject@8 has not run
        _fake_run(tmp_path, "i8", "inject@8", {"pope": {"pope_accuracy,none": 0.6}})
        assert best_layer(tmp_path, options) == 4


class TestPaperFacts:
    def test_metrics_scale_to_percent(self):
        assert PAPER_SUITE.metrics["hallusion_bench_image"].score({"aAcc,none": 47.5}) == 47.5
        assert PAPER_SUITE.metrics["docvqa_val"].score({"anls,none": 0.281}) == pytest.approx(28.1)
        assert PAPER_SUITE.metrics["mme"].score({"mme_perception_score,none": 1500.0}) is None
        assert TaskMetric("x", ("m",), 100.0).score({"m,none": float("nan")}) is None

    def test_suite_covers_the_papers_eleven_benchmarks(self):
        assert len(PAPER_SUITE.tasks) == 12 and set(DOCUMENTS) == set(PAPER_SUITE.tasks)
        assert "refcoco_bbox_val" not in PAPER_SUITE.tasks  # captioning, not grounding
        published = PUBLISHED["original"]
        assert published["Avg"] == pytest.approx(sum(published[g] for g in PAPER_SUITE.groups) / 4, abs=0.05)

    def test_render_names_every_assumption(self, llava7b, cost, tmp_path):
        options = _options(llava7b, tmp_path, stages=("baseline",), limit=3)
        text = render(build_plan(options, cost, Shares.paper()), options, cost, Shares.paper())
        assert "(--limit 3)" in text and "unverified" in text and "prefill only" in text


class TestRunnerLogic:
    """Resumption, the sweep's best layer and failures, with lmms-eval replaced by a fake that writes results."""

    SUITE = TaskSuite(groups={"CV-centric": ("pope",)}, metrics={"pope": PAPER_SUITE.metrics["pope"]})

    def _fake(self, failing: str | None = None):
        started: list[str] = []

        def execute(run, out, env):
            folder = out / "runs" / run.name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "run.json").write_text(json.dumps(run.to_dict()))
            started.append(run.interventions)
            if run.interventions == failing:
                return 1, 0.0
            lmms = folder / "lmms" / "model"
            lmms.mkdir(parents=True, exist_ok=True)
            value = {"": 0.5, "inject@4": 0.7, "inject@8": 0.6}.get(run.interventions, 0.1)
            (lmms / "2026_results.json").write_text(json.dumps({"results": {"pope": {"pope_accuracy,none": value}}}))
            return 0, 0.0

        return execute, started

    def _options(self, llava7b: Path, out: Path) -> PlanOptions:
        return _options(llava7b, out, suite=self.SUITE, stages=("baseline", "inject"), inject_layers=(0, 4, 8))

    def test_best_layer_resolved_then_rerun_skips(self, llava7b, cost, tmp_path, monkeypatch):
        from embedlens.reproduce import runner

        execute, started = self._fake()
        monkeypatch.setattr(runner, "_execute", execute)
        options = self._options(llava7b, tmp_path)
        outcome = runner.run_all(options, cost)
        assert started == ["", "inject@4", "inject@8", "scale:0.01", "inject@4,scale=0.01"]
        assert not outcome.pending and not outcome.failed
        table = json.loads(outcome.table[1].read_text())
        assert table["rows"][-1]["label"] == "norm x0.01, inject at layer 4"
        assert table["rows"][1]["columns"]["CV-centric"]["delta"] == pytest.approx(20.0)
        again = runner.run_all(options, cost)
        assert started[5:] == [] and len(again.skipped) == 5

    def test_failure_is_reported_after_the_others_and_the_table(self, llava7b, cost, tmp_path, monkeypatch):
        from embedlens import EmbedLensError
        from embedlens.reproduce import runner

        execute, started = self._fake(failing="inject@8")
        monkeypatch.setattr(runner, "_execute", execute)
        with pytest.raises(EmbedLensError, match="1 run\\(s\\) failed: inject_8__CV_centric"):
            runner.run_all(self._options(llava7b, tmp_path), cost)
        assert started == ["", "inject@4", "inject@8", "scale:0.01"]  # the best-k run waits for the sweep
        assert (tmp_path / "paper_table.md").is_file()
        assert "pending" in (tmp_path / "commands.sh").read_text()

    def test_a_finished_run_with_another_command_is_refused(self, llava7b, cost, tmp_path, monkeypatch):
        from embedlens.reproduce import runner

        monkeypatch.setattr(runner, "_execute", self._fake()[0])
        runner.run_all(self._options(llava7b, tmp_path), cost)
        changed = PlanOptions(**{**self._options(llava7b, tmp_path).__dict__, "limit": 3})
        with pytest.raises(InputError, match="holds a finished run original__CV_centric made with another command"):
            runner.run_all(changed, cost)
