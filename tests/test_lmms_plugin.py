"""The lmms-eval plugin: stock lmms-eval runs EmbedLens models, with interventions, on its own tasks.

The tasks are defined here (a JSONL of noise images read through lmms-eval's ``include_path``), so
nothing comes from the hub. In-process tests check the model class against EmbedLens' own answers and
hand-computed likelihoods; command-line tests run ``python -m lmms_eval`` exactly as a user would,
once with one process and once with two under torchrun (the gloo backend), which must agree.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from lmms_eval.api.instance import Instance
from PIL import Image

from embedlens import InputError
from embedlens.bench import lmms_model
from embedlens.bench.lmms_model import EmbedLensLMM, cut_at_stops, parse_interventions
from embedlens.bench.lmms_plugin import MODEL_CLASS_PATH, MODEL_NAME
from embedlens.interventions import Inject, Prune, parse
from helpers import random_image

QUESTION = "what colour is the shape"
DOCS = 6
CHOICES = ("red", "blue")
SETTING = "prune:[0,1,2,3] inject@2"


# --------------------------------------------------------------------------- the tasks
@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with two lmms-eval tasks over the same six documents: a short answer and a choice."""
    root = tmp_path_factory.mktemp("lmms-tasks")
    rows = []
    for i in range(DOCS):
        path = root / f"img{i}.png"
        random_image(100 + i).save(path)
        rows.append({"question_id": i, "image": str(path), "question": QUESTION, "answer": CHOICES[i % 2]})
    (root / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = f"""\
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {root / "docs.jsonl"}
        test_split: test
        doc_to_visual: !function utils.doc_to_visual
        metadata:
          - version: 0.0
        """
    (root / "tinyvqa.yaml").write_text(
        textwrap.dedent(common)
        + textwrap.dedent("""\
        task: tinyvqa
        output_type: generate_until
        doc_to_text: question
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: 4
          until: ["zzz"]
          do_sample: false
        process_results: !function utils.process_results
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        """)
    )
    (root / "tinymc.yaml").write_text(
        textwrap.dedent(common)
        + textwrap.dedent(f"""\
        task: tinymc
        output_type: multiple_choice
        doc_to_text: question
        doc_to_target: !function utils.doc_to_target
        doc_to_choice: {json.dumps(list(CHOICES))}
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """)
    )
    (root / "utils.py").write_text(
        textwrap.dedent(f"""\
        from PIL import Image

        def doc_to_visual(doc):
            return [Image.open(doc["image"]).convert("RGB")]

        def doc_to_target(doc):
            return {list(CHOICES)!r}.index(doc["answer"])

        def process_results(doc, results):
            return {{"exact_match": float(results[0].strip().lower() == doc["answer"])}}
        """)
    )
    return root


def _docs(task_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (task_dir / "docs.jsonl").read_text().splitlines()]


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HOME=str(tmp / "hf"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def run_lmms(
    task_dir: Path, tmp: Path, model_args: str, tasks: tuple[str, ...] = ("tinyvqa",), processes: int = 1
) -> dict[str, tuple[dict[int, Any], dict[str, Any], str]]:
    """Run stock lmms-eval from the command line on ``tasks`` in one process (group); per task: (doc id ->
    filtered response, its results, the run's stdout and stderr)."""
    out = tmp / f"out-{'-'.join(tasks)}-{processes}"
    launcher = [sys.executable, "-m"]
    if processes > 1:
        launcher += ["torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", "-m"]
    command = [
        *launcher,
        "lmms_eval",
        "eval",
        "--model",
        MODEL_NAME,
        "--model_args",
        model_args,
        "--tasks",
        ",".join(tasks),
        "--include_path",
        str(task_dir),
        "--output_path",
        str(out),
        "--log_samples",
    ]
    done = subprocess.run(command, env=_env(tmp), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:] + done.stdout[-2000:]
    results = list(out.rglob("*_results.json"))
    assert len(results) == 1, sorted(out.rglob("*"))
    outcome = {}
    for task in tasks:
        samples = list(out.rglob(f"*_samples_{task}.jsonl"))
        assert len(samples) == 1, sorted(out.rglob("*"))
        by_doc = {}
        for line in samples[0].read_text().splitlines():
            row = json.loads(line)
            by_doc[int(row["doc_id"])] = row["filtered_resps"]
        outcome[task] = (by_doc, json.loads(results[0].read_text())["results"][task], done.stdout + done.stderr)
    return outcome


# --------------------------------------------------------------------------- in-process helpers
def _instances(task_dir: Path, kind: str = "generate_until") -> tuple[list[Instance], dict]:
    """lmms-eval requests for the six documents, as its tasks build them, and the task_dict they read."""

    def visual(doc: dict[str, Any]) -> list[Image.Image]:
        return [Image.open(doc["image"]).convert("RGB")]

    docs = _docs(task_dir)
    requests = []
    for i in range(DOCS):
        if kind == "generate_until":
            args = (QUESTION, {"max_new_tokens": 4, "until": ["zzz"]}, visual, i, "t", "test")
            meta = {"task": "t", "doc_id": i, "repeats": 1}
            requests.append(Instance(request_type=kind, arguments=args, idx=0, metadata=meta))
        else:
            for number, choice in enumerate(CHOICES):
                args = (QUESTION, f" {choice}", visual, i, "t", "test")
                meta = {"task": "t", "doc_id": i, "repeats": 1}
                requests.append(Instance(request_type=kind, arguments=args, idx=number, metadata=meta))
    return requests, {"t": {"test": docs}}


def _model(tiny_dir: Path, **kwargs: Any) -> EmbedLensLMM:
    model = EmbedLensLMM(pretrained=str(tiny_dir), device="cpu", **kwargs)
    return model


def _reference_answers(tiny, task_dir: Path, interventions=()) -> dict[int, str]:
    """EmbedLens' own greedy answers, one document at a time, seeded by the document id."""
    answers = {}
    for i, doc in enumerate(_docs(task_dir)):
        prepared = tiny.prepare([doc["image"]], [QUESTION])
        texts, _ = tiny.generate_batch(prepared, max_new_tokens=4, interventions=list(interventions), sample_ids=[i])
        answers[i] = texts[0]
    return answers


def _unwrap(output: Any) -> tuple[float, bool]:
    return output.text if lmms_model.GenerationResult is not None else output


# --------------------------------------------------------------------------- tests
class TestRegistration:
    """lmms-eval must find the model by name through the entry point, with no fork and no env variable."""

    def test_entry_point_resolves_to_the_class(self):
        from lmms_eval.models import get_model

        assert get_model(MODEL_NAME) is EmbedLensLMM
        assert f"{EmbedLensLMM.__module__}.{EmbedLensLMM.__name__}" == MODEL_CLASS_PATH


class TestModelArgs:
    """--model_args arrive as text; every bad value must fail before any task runs, with one clear message."""

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("", ()),
            (None, ()),
            ('"prune:dead inject@8"', (Prune(group="dead"), Inject(layer=8))),
            ("'prune:dead;inject@8'", (Prune(group="dead"), Inject(layer=8))),
            ("prune:[0,5],positions=reindex", (Prune(indices=(0, 5), positions="reindex"),)),
            ('[{"kind": "inject", "layer": 2}]', (Inject(layer=2),)),
        ],
    )
    def test_parse_interventions(self, text, expected):
        assert parse_interventions(text) == expected

    @pytest.mark.parametrize(
        ("text", "fragment"),
        [
            ("prune:nothing", "unknown group"),
            ('[{"kind": "inject", "layer": 2}', "do not parse"),
            ("bogus", "unknown intervention"),
        ],
    )
    def test_bad_interventions(self, text, fragment):
        with pytest.raises(InputError, match=fragment):
            parse_interventions(text)

    @pytest.mark.parametrize(
        ("kwargs", "fragment"),
        [
            ({"colour": "red"}, "unknown model_args for embedlens: colour"),
            ({"batch_size": "many"}, "integer batch_size"),
            ({"batch_size": 0}, "batch_size must be positive"),
            ({"max_new_tokens": 0}, "max_new_tokens must be positive"),
            ({"interventions": "inject@99"}, "layer"),
        ],
    )
    def test_bad_model_args(self, tiny_dir, kwargs, fragment):
        with pytest.raises(InputError, match=fragment):
            _model(tiny_dir, **kwargs)

    @pytest.mark.parametrize(
        ("text", "stops", "expected"),
        [("red. zzz blue", ["zzz"], "red. "), ("a\n\nb", ["\n\n", "b"], "a"), ("plain", [], "plain"), ("x", [""], "x")],
    )
    def test_cut_at_stops(self, text, stops, expected):
        assert cut_at_stops(text, stops) == expected


class TestInProcess:
    """The model class answers as EmbedLens itself does, in any batch size, and scores continuations exactly."""

    def test_baseline_answers_match_embedlens(self, tiny, tiny_dir, task_dir):
        model = _model(tiny_dir)
        model.task_dict = _instances(task_dir)[1]
        got = model.generate_until(_instances(task_dir)[0])
        assert got == [_reference_answers(tiny, task_dir)[i] for i in range(DOCS)]

    def test_interventions_and_batching(self, tiny, tiny_dir, task_dir):
        requests, task_dict = _instances(task_dir)
        answers = {}
        for size in (1, 4):
            model = _model(tiny_dir, interventions=SETTING, batch_size=size)
            model.task_dict = task_dict
            answers[size] = model.generate_until(requests)
            samples = model.tally.samples
            assert len(samples) == DOCS
            # visual tokens entered late, some pruned: fewer tokens at layer 0, fewer FLOPs than the baseline
            assert sum(s.tokens_per_layer[0] for s in samples) < sum(s.length for s in samples)
            line = model.tally.line(SETTING, model.session.adapter)
            assert line.startswith(f"embedlens [{SETTING}]: {DOCS} requests; tokens at layer 0 ")
            ratio = float(re.search(r"\(([0-9.]+)x the baseline\)", line).group(1))
            assert 0 < ratio < 1
        reference = _reference_answers(tiny, task_dir, [parse(s) for s in SETTING.split()])
        assert answers[1] == answers[4] == [reference[i] for i in range(DOCS)]
        assert answers[1] != [_reference_answers(tiny, task_dir)[i] for i in range(DOCS)]

    def _hand_logprob(self, tiny, image: str, choice: str, *, drop_visual: bool) -> float:
        """log P(choice | prompt) from a plain forward without hooks (visual rows removed by hand if asked)."""
        adapter = tiny.adapter
        prompt = adapter.format_prompt(QUESTION, num_images=1)
        prepared = adapter.prepare([[Image.open(image).convert("RGB")]], [prompt + choice], raw=True)
        count = len(adapter.tokenizer(prompt + choice, add_special_tokens=False).input_ids) - len(
            adapter.tokenizer(prompt, add_special_tokens=False).input_ids
        )
        ids = prepared.inputs["input_ids"]
        with torch.inference_mode():
            if drop_visual:
                keep = ids[0] != adapter.image_token_id
                positions = torch.arange(ids.shape[1])[keep][None]
                embeds = adapter.input_embeddings(ids[:, keep])
                hidden = adapter.language_model(inputs_embeds=embeds, position_ids=positions).last_hidden_state
                logits = adapter.lm_head(hidden)[0]
            else:
                logits = adapter.model(**prepared.inputs).logits[0]
        scores = torch.log_softmax(logits[-count - 1 : -1].float(), dim=-1)
        return float(scores.gather(1, ids[0, -count:, None]).sum())

    @pytest.mark.parametrize("interventions", ["", "prune:visual"])
    def test_loglikelihood_matches_a_hand_computation(self, tiny, tiny_dir, task_dir, interventions):
        requests, task_dict = _instances(task_dir, "loglikelihood")
        model = _model(tiny_dir, interventions=interventions)
        model.task_dict = task_dict
        got = [_unwrap(output) for output in model.loglikelihood(requests)]
        docs = _docs(task_dir)
        for request, (loss, greedy) in zip(requests, got, strict=True):
            _, continuation, _, doc_id, _, _ = request.args
            scored = model.score(QUESTION, continuation, [Image.open(docs[doc_id]["image"]).convert("RGB")], doc_id)
            assert loss == pytest.approx(-scored.logprob / scored.tokens)
            assert greedy is scored.greedy
            expected = self._hand_logprob(tiny, docs[doc_id]["image"], continuation, drop_visual=bool(interventions))
            assert scored.logprob == pytest.approx(expected, abs=1e-4)

    def test_multi_round_refused(self, tiny_dir):
        with pytest.raises(InputError, match="multi-round"):
            _model(tiny_dir).generate_until_multi_round([])


@pytest.fixture(scope="module")
def runs(tiny_dir, task_dir, tmp_path_factory) -> dict[str, Any]:
    """Three command-line runs: the baseline (with a multiple-choice task beside it), a setting, the setting
    on two processes."""
    tmp = tmp_path_factory.mktemp("lmms-runs")
    base = f"pretrained={tiny_dir},device=cpu"
    baseline = run_lmms(task_dir, tmp / "baseline", base, tasks=("tinyvqa", "tinymc"))
    return {
        "baseline": baseline["tinyvqa"],
        "choice": baseline["tinymc"],
        "setting": run_lmms(task_dir, tmp / "setting", f'{base},interventions="{SETTING}"')["tinyvqa"],
        "setting-2": run_lmms(
            task_dir, tmp / "setting-2", f'pretrained={tiny_dir},interventions="{SETTING}"', processes=2
        )["tinyvqa"],
    }


class TestCommandLine:
    """``python -m lmms_eval --model embedlens`` end to end: one process, then two under torchrun."""

    def test_baseline_answers(self, runs, tiny, task_dir):
        answers, results, _ = runs["baseline"]
        reference = _reference_answers(tiny, task_dir)
        assert answers == reference
        expected = sum(reference[i].lower() == doc["answer"] for i, doc in enumerate(_docs(task_dir))) / DOCS
        assert results["exact_match,none"] == pytest.approx(expected)

    def test_interventions_answers_and_summary(self, runs, tiny, task_dir):
        answers, _, log = runs["setting"]
        assert answers == _reference_answers(tiny, task_dir, [parse(s) for s in SETTING.split()])
        assert f"embedlens [{SETTING}]: {DOCS} requests" in log
        assert answers != runs["baseline"][0]

    def test_two_processes_agree_with_one(self, runs):
        answers, _, log = runs["setting-2"]
        assert answers == runs["setting"][0]
        assert f"embedlens [{SETTING}]: {DOCS // 2} requests" in log  # rank 0 answered its half

    def test_multiple_choice_accuracy(self, runs, tiny_dir, task_dir):
        _, results, _ = runs["choice"]
        model = _model(tiny_dir)
        correct = 0
        for i, doc in enumerate(_docs(task_dir)):
            image = [Image.open(doc["image"]).convert("RGB")]
            losses = []
            for choice in CHOICES:
                scored = model.score(QUESTION, f" {choice}", image, i)
                losses.append(-scored.logprob / scored.tokens)
            correct += CHOICES[losses.index(min(losses))] == doc["answer"]
        assert results["acc,none"] == pytest.approx(correct / DOCS)
