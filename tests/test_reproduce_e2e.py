"""``embedlens reproduce`` end to end on CPU: the tiny checkpoint, a tiny local lmms-eval task, real subprocesses.

A reduced experiment set (the stats stage, the baseline, pruning dead / sink+dead and one seed of the
random control) runs through stock lmms-eval with ``--model embedlens --model_args ...,profile=paper`` and
``--limit 2``; the table must hold the baseline's numbers as lmms-eval computed them, and a rerun must
start nothing. The plugin's profile handling is checked in process: the paper profile answers MME with
one token.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from lmms_eval.api.instance import Instance
from PIL import Image

from embedlens import InputError
from embedlens.bench.lmms_model import EmbedLensLMM
from embedlens.reproduce.costs import cost_model
from embedlens.reproduce.localtask import write_local_task
from embedlens.reproduce.paper import TaskMetric, TaskSuite
from embedlens.reproduce.plan import PlanOptions
from embedlens.reproduce.runner import COMMANDS_FILE, run_all
from helpers import random_image

DOCS = 4


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local lmms-eval task ``tinyrep`` over four noise images (short answers, exact match)."""
    root = tmp_path_factory.mktemp("reproduce-task")
    rows = []
    for i in range(DOCS):
        path = root / f"img{i}.png"
        random_image(300 + i, 70, 56).save(path)
        rows.append({"image": str(path), "question": "what colour is it", "answer": ("red", "blue")[i % 2]})
    return write_local_task(root, rows)


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HOME=str(tmp / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    env.update(TOKENIZERS_PARALLELISM="false")
    return env


SUITE = TaskSuite(groups={"General": ("tinyrep",)}, metrics={"tinyrep": TaskMetric("tinyrep", ("exact_match",), 100.0)})


@pytest.fixture(scope="module")
def reproduced(tiny_dir, tiny_anchor_file, task_dir, tmp_path_factory):
    """One reproduce run and its rerun: (options, first outcome, second outcome, echoed lines)."""
    tmp = tmp_path_factory.mktemp("reproduce-e2e")
    images = tmp / "images"
    images.mkdir()
    for i in range(3):
        random_image(400 + i).save(images / f"{i}.png")
    options = PlanOptions(
        model=str(tiny_dir),
        out=tmp / "out",
        suite=SUITE,
        stages=("stats", "baseline", "dead"),
        seeds=(0,),
        images=images,
        anchors=tiny_anchor_file,
        limit=2,
        device="cpu",
        include_path=task_dir,
    )
    cost = cost_model(str(tiny_dir))
    lines: list[str] = []
    first = run_all(options, cost, echo=lines.append, env=_env(tmp))
    second = run_all(options, cost, echo=lines.append, env=_env(tmp))
    return options, first, second, lines


class TestEndToEnd:
    """The whole path a researcher takes, on a checkpoint and task small enough for CPU."""

    def test_every_run_finished_once(self, reproduced):
        _, first, second, lines = reproduced
        expected = ["stats", "original__General", "prune_dead__General", "prune_sink_plus_dead__General"]
        expected.append("random_seed0__General")
        assert first.ran == expected and not first.failed and not first.pending
        assert second.ran == [] and second.skipped == expected  # the rerun starts nothing
        assert sum("start" in line for line in lines) == len(expected)

    def test_table_holds_the_baseline_as_lmms_eval_scored_it(self, reproduced):
        options, first, _, _ = reproduced
        md, data_file = first.table
        assert md.is_file() and data_file.is_file()
        table = json.loads(data_file.read_text())
        rows = {row["row"]: row for row in table["rows"]}
        assert list(rows) == ["original", "-dead", "-sink+dead", "random"]
        results = next((options.out / "runs" / "original__General" / "lmms").rglob("*_results.json"))
        lmms = json.loads(results.read_text())["results"]["tinyrep"]
        assert lmms["exact_match,none"] is not None
        baseline = rows["original"]["columns"]["General"]
        assert baseline["mean"] == pytest.approx(100 * lmms["exact_match,none"])
        assert rows["original"]["columns"]["Avg"]["mean"] == pytest.approx(baseline["mean"])
        assert rows["random"]["seeds"] == [0]
        assert "| original |" in md.read_text()

    def test_limit_and_profile_reached_lmms_eval(self, reproduced):
        options, _, _, _ = reproduced
        samples = list((options.out / "runs" / "original__General" / "lmms").rglob("*_samples_tinyrep.jsonl"))
        assert len(samples) == 1 and len(samples[0].read_text().splitlines()) == 2  # --limit 2
        log = (options.out / "runs" / "prune_dead__General" / "log.txt").read_text()
        assert "embedlens [prune:dead,match=member]: 2 requests" in log

    def test_stats_measured_the_shares_used_for_flops(self, reproduced):
        options, _, _, _ = reproduced
        plan = json.loads((options.out / "plan.json").read_text())
        assert plan["assumptions"]["shares"]["source"].startswith("measured by the stats stage")
        summary = json.loads((options.out / "stats" / "summary.json").read_text())
        assert plan["assumptions"]["shares"]["dead"] == pytest.approx(summary["groups"]["dead"]["fraction"])

    def test_commands_file_lists_every_command(self, reproduced):
        options, _, _, _ = reproduced
        text = (options.out / COMMANDS_FILE).read_text()
        commands = [line for line in text.splitlines() if line and not line.startswith("#")]
        assert len(commands) == 5
        assert all("--limit 2" in c for c in commands if "lmms_eval" in c)
        assert sum("finished earlier" in line for line in text.splitlines()) == 5


class TestPluginProfile:
    """``profile=paper`` reaches the adapter, the attention implementation and the per-task settings."""

    def _requests(self, image: Image.Image, task: str) -> list[Instance]:
        args = ("what colour is it", {"max_new_tokens": 4, "until": ["zzz"]}, lambda doc: [image], 0, task, "test")
        return [
            Instance(
                request_type="generate_until", arguments=args, idx=0, metadata={"task": task, "doc_id": 0, "repeats": 1}
            )
        ]

    def test_paper_profile_answers_mme_with_one_token(self, tiny_dir):
        model = EmbedLensLMM(pretrained=str(tiny_dir), device="cpu", profile="paper")
        assert model.session.adapter.profile.name == "paper"
        assert model.session.adapter.attention_implementation == "eager"
        image = random_image(7)
        model.task_dict = {"mme": {"test": [{}]}, "other": {"test": [{}]}}
        short = model.generate_until(self._requests(image, "mme"))[0]
        full = model.generate_until(self._requests(image, "other"))[0]
        session = model.session
        expected = {}
        for tokens in (1, 4):
            prepared = session.adapter.prepare([[image]], ["what colour is it"])  # vicuna_v1 under the profile
            expected[tokens] = session.generate_batch(prepared, max_new_tokens=tokens)[0][0].strip()
        assert (short, full) == (expected[1], expected[4]) and short != full

    def test_default_profile_is_unchanged(self, tiny_dir):
        model = EmbedLensLMM(pretrained=str(tiny_dir), device="cpu")
        assert model.session.adapter.profile.name == "default"

    def test_unknown_profile_refused(self, tiny_dir):
        with pytest.raises(InputError, match="unknown profile 'papr'"):
            EmbedLensLMM(pretrained=str(tiny_dir), device="cpu", profile="papr")
