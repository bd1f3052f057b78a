"""Conformance, part 3: the features that write runs or serve other tools, once per family (``FAMILIES``).

Continues ``test_conformance_features.py`` (whose :class:`Plant` plants anchors into any family through
model hooks): 7. FLOP accounting of intervention records, 8. the evaluation runner with a preset, the
injection sweep and the alignment run, each into its run directory, 9. ``make-patchbench`` for the
family's processor and the benchmark's verification, 10. the lmms-eval model class on a
``generate_until`` request. Only the public API and the adapter interface are used.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lmms_eval.api.instance import Instance
from PIL import Image

from embedlens.analysis.alignment import LAYERS_FILE, AlignOptions, run_align
from embedlens.analysis.sweep import SWEEP_FILE, SweepOptions, run_inject_sweep
from embedlens.bench.flops import sample_flops
from embedlens.bench.lmms_model import EmbedLensLMM
from embedlens.bench.patchbench import PatchGeometry, view_changes
from embedlens.bench.runner import BASELINE, ITEMS_FILE, TABLE_JSON, EvalOptions, preset, run_eval
from embedlens.bench.vqa import read_questions
from embedlens.datasets import open_dataset
from embedlens.interventions import Exit, Inject, Prune, Scale, Skip, parse
from families import Loaded
from helpers import run_cli
from test_conformance_features import Plant, batch_of, images

#: Small and fast evaluations: 2 questions in one batch, 2 new tokens, few bootstrap resamples.
EVAL = EvalOptions(batch_size=2, max_new_tokens=2, bootstrap=20)


@pytest.fixture
def plant(loaded: Loaded):
    with Plant(loaded).hooks() as planted:
        yield planted


def write_questions(loaded: Loaded, folder: Path) -> Path:
    """Two questions on two of the family's images: ``folder/questions.jsonl``."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for number, image in enumerate(images(loaded, 2)):
        image.save(folder / f"im{number}.png")
        rows.append({"image": f"im{number}.png", "question": loaded.family.prompts[number], "answers": ["yes"]})
    path = folder / "questions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- 7. FLOPs
class TestFlops:
    """Prefill FLOPs from intervention records: whatever removes or skips work costs less than the baseline."""

    @pytest.mark.parametrize("name", ["prune", "skip", "inject", "exit", "scale"])
    def test_record_flops(self, loaded: Loaded, plant: Plant, name: str):
        items = {
            "prune": Prune(group="dead"),
            "skip": Skip(group="llm_sink", sublayers=((0, "attn"), (0, "mlp"))),
            "inject": Inject(layer=1),
            "exit": Exit(layer=1),
            "scale": Scale(factor=0.5),
        }
        _, run = loaded.session.generate_batch(
            batch_of(loaded, 1), max_new_tokens=1, interventions=[items[name]], anchors=plant.anchors
        )
        record = run.last.samples[0]
        counted = sample_flops(loaded.adapter, record)
        baseline = sample_flops(loaded.adapter, record, baseline=True)
        assert counted.tokens_per_layer == record.tokens_per_layer
        assert len(counted.layers) == loaded.adapter.num_layers
        assert counted.vision > 0 and math.isfinite(counted.vision), "no vision-tower FLOPs counted"
        assert counted.vision == baseline.vision
        if name == "scale":
            assert counted.total == baseline.total
        else:
            assert counted.total < baseline.total, f"{name} counted no saving"


# --------------------------------------------------------------------------- 8. eval, sweep, align
class TestRuns:
    """The evaluation runner with the paper-pruning preset, the injection sweep and the alignment run,
    each on two images, each writing its run directory."""

    def test_eval_with_preset(self, loaded: Loaded, plant: Plant, tmp_path: Path):
        questions = read_questions(write_questions(loaded, tmp_path / "data"))
        anchors = str(plant.anchors.save(tmp_path / "anchors.json"))
        options = EvalOptions(batch_size=2, max_new_tokens=2, bootstrap=20, anchors=anchors)
        settings = preset("paper-pruning", seeds=(0,))
        table = run_eval(loaded.session, questions, settings, tmp_path / "eval", options=options, progress=False)
        assert (tmp_path / "eval" / TABLE_JSON).is_file()
        assert len(pd.read_parquet(tmp_path / "eval" / ITEMS_FILE)) == 2 * (len(settings) + 1)
        views = len(plant.batches[-1][0])
        pruned = {entry["name"]: entry["pruned"] for entry in table["settings"]}
        # cells per image: one planted cell of each group in every view
        expected = {BASELINE: 0, "-vit_sink": 1, "-llm_sink": 1, "-sinks": 2, "-dead": 1, "-sink+dead": 3}
        for name, cells in expected.items():
            assert pruned[name] == cells * views, f"{name}: pruned {pruned[name]} cells, planted {cells * views}"
        # the matched control draws as many cells from the rest of the grid, as far as the rest goes
        cells = sum(span.num_tokens for span in plant.batches[-1][0])
        assert pruned["random(sink+dead) seed 0"] == min(3 * views, cells - 3 * views)
        assert all(e["flops_ratio"] < 1 for e in table["settings"][1:]), "pruning saved no FLOPs"

    def test_inject_sweep(self, loaded: Loaded, tmp_path: Path):
        questions = read_questions(write_questions(loaded, tmp_path / "data"))
        options = SweepOptions(layers=(0, 1), skip_until=1, scales=(0.5,), timing_items=0, eval=EVAL)
        result = run_inject_sweep(loaded.session, [questions], tmp_path / "sweep", options=options, progress=False)
        assert (tmp_path / "sweep" / SWEEP_FILE).is_file()
        assert len(result.rows) == 4  # baseline, inject@0, inject@1, the skip row
        assert result.best_layer in (0, 1) and result.scaling_rows[0]["setting"] == BASELINE
        assert [row["scale"] for row in result.scaling_rows[1:]] == [0.5] * (len(result.scaling_rows) - 1) != []

    def test_align(self, loaded: Loaded, plant: Plant, tmp_path: Path):
        write_questions(loaded, tmp_path / "data")
        anchors = str(plant.anchors.save(tmp_path / "anchors.json"))
        (tmp_path / "text.txt").write_text("a short passage of text\nanother line of words to read\n")
        layers = (0, loaded.adapter.num_layers)
        options = AlignOptions(anchors=anchors, lens_layers=layers, batch_size=2, text=str(tmp_path / "text.txt"))
        dataset = open_dataset(tmp_path / "data", exclude=[tmp_path / "data" / "questions.jsonl"])
        result = run_align(loaded.session, dataset, tmp_path / "align", options=options, progress=False)
        assert (tmp_path / "align" / LAYERS_FILE).is_file()
        assert not result.unreadable and result.summary["images"] == 2
        spans = plant.batches[-1]
        views = sum(len(sample) for sample in spans)
        grid = sum(span.num_tokens for sample in spans for span in sample)
        tokens = {group: entry["tokens"] for group, entry in result.summary["groups"].items()}
        assert tokens == {
            "visual": grid,
            "vit_sink": views,
            "llm_sink": views,
            "dead": views,
            "alive": grid - 3 * views,
        }


# --------------------------------------------------------------------------- 9. make-patchbench
class TestPatchbench:
    """``make-patchbench`` reads the family's processor and config (no weights); its grid is the model's
    token grid in every view, and every target's cells are the ones whose pixels change in every view
    when the target is painted over (the benchmark's verification, redone through the loaded model)."""

    def test_make_and_verify(self, loaded: Loaded, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
        out = tmp_path / "bench"
        code, _, err = run_cli(
            capsys, "make-patchbench", "--out", out, "--model", loaded.path, "--per-category", 1,
            "--categories", "object,ocr", "--no-progress",
        )  # fmt: skip
        assert code == 0, err
        meta = json.loads((out / "meta.json").read_text())
        geometry = PatchGeometry(**meta["geometry"])
        rows = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines() if line.strip()]
        assert rows
        for row in rows:
            image = Image.open(out / row["image"]).convert("RGB")
            assert image.size == (geometry.width, geometry.height)
            spans = loaded.session.prepare([image], [row["question"]]).spans[0]
            assert [span.view for span in spans] == list(geometry.views), (row["id"], geometry.views)
            assert {span.grid for span in spans} == {tuple(row["grid"])}, f"benchmark grid {row['grid']}"
            blank = image.copy()
            for left, top, right, bottom in row["target_boxes"]:
                blank.paste(image.getpixel((0, 0)), (left, top, right, bottom))
            for changed in view_changes(loaded.adapter, geometry, image, blank):  # one list per view
                assert changed and set(changed) <= set(row["target_patches"]), (row["id"], changed)
            # independently, in the picture of each view the family shows (its own undoing of the layout)
            both = loaded.session.prepare([image, blank], [row["question"]] * 2)
            for span, other in zip(*both.spans, strict=True):
                old, new = np.asarray(both.views[span.picture]), np.asarray(both.views[other.picture])
                rows, cols = span.grid
                side = min(old.shape[0] // rows, old.shape[1] // cols)
                where = np.argwhere((old != new).any(axis=2))
                cells = {
                    int(y // side) * cols + int(x // side) for y, x in where if y < rows * side and x < cols * side
                }
                assert cells and cells <= set(row["target_patches"]), (row["id"], span.view, cells)


# --------------------------------------------------------------------------- 10. lmms-eval
class TestLmmsEval:
    """The lmms-eval model class answers a ``generate_until`` request as EmbedLens does, interventions on."""

    def test_generate_until(self, loaded: Loaded, tmp_path: Path):
        setting = "prune:[0] inject@1"
        image, question = loaded.family.image(0), loaded.family.prompts[0]
        model = EmbedLensLMM(pretrained=str(loaded.path), device="cpu", interventions=setting)
        model.task_dict = {"t": {"test": [{"id": 0}]}}
        arguments = (question, {"max_new_tokens": 3, "until": ["zzz"]}, lambda _doc: [image], 0, "t", "test")
        request = Instance(
            request_type="generate_until", arguments=arguments, idx=0, metadata={"task": "t", "doc_id": 0, "repeats": 1}
        )
        (answer,) = model.generate_until([request])
        prepared = loaded.session.prepare([image], [question])
        expected, _ = loaded.session.generate_batch(
            prepared, max_new_tokens=3, interventions=[parse(s) for s in setting.split()], sample_ids=[0]
        )
        assert answer == expected[0]
        (sample,) = model.tally.samples
        assert sample.tokens_per_layer[0] < sample.length
