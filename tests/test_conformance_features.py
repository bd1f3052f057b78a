"""Conformance, part 2: every EmbedLens feature once per family (``FAMILIES``), on tiny random checkpoints.

``test_conformance.py`` checks the adapter's numbers; this module and ``test_conformance_features_runs.py``
check that each user-facing feature runs on the family and gives the answer planted into it, so the
closing note can show a family x feature table. Nothing here may be taught about a family: the checks
use the public API and the adapter interface only (``prepare``, ``find_spans``, ``image_token_id``,
``input_embeddings``, ``language_model``, ``decoder_layers``, ``projector``, ``vision_token_features``,
``tokenizer``).

On random weights nothing a lens shows means anything, so the tests decide what some visual tokens are.
:class:`Plant` hooks the model, family-agnostically: a pre-hook on the model finds the spans of every
prefill (``adapter.find_spans`` on the model's own keyword arguments), and a pre-hook on the language
model writes, at chosen grid cells of every span (every view), the embedding-table rows of anchor ids
into ``inputs_embeds``, and removes the anchors' directions (and their neighbours') from every other
grid cell, so that no other token can name an anchor. Those cells are layer 0 for every reader (lens,
rule, discovery, interventions). For discovery it also plants a ViT sink (the projector inputs that
``vision_token_features`` puts behind one cell, scaled up) and, at the input of decoder layer 1, an LLM
sink that copies the first position's state, one with a massive activation, and a dead token left at
its layer-0 row.

One class per feature (``1. probe`` ... ``6. generate`` here; ``7. FLOPs`` ... ``10. lmms-eval`` in the
other module). A feature that cannot work on a family yet fails with a message saying what is missing
(for multi-view families: which views a result leaves out).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd
import pytest
import torch

from embedlens import PreparedBatch
from embedlens.datasets import open_dataset
from embedlens.interventions import Exit, Inject, Prune, Scale, Skip
from embedlens.pictures import save_group_map, save_top1_grid
from embedlens.result import MultiLayerProbe
from embedlens.taxonomy import Anchors, DiscoveryConfig, diagnose, discover_anchors
from embedlens.taxonomy.stats import HEATMAP_FILE, SUMMARY_FILE, TOKENS_FILE, StatsOptions, run_stats
from families import Loaded
from taxonomy_planting import top_ids, unit_rows

#: The planted groups, in the order of :func:`planted_cells`.
GROUPS = ("vit_sink", "llm_sink", "dead")
#: What discovery must find, in the order of :func:`discovery_cells`.
DISCOVERY = ("vit_sink", "llm_bos", "llm_massive", "dead")
#: Vision-feature scale of the planted ViT sink.
VIT_BOOST = 50.0
#: Neighbours of an anchor kept out of other anchors' and of the noise tokens' reach.
NEAR = 5


# --------------------------------------------------------------------------- planting
def planted_cells(cells: int) -> tuple[int, int, int]:
    """The grid cells (row-major) holding the anchors of :data:`GROUPS` in a view of ``cells`` cells."""
    assert cells >= 3, f"a view of {cells} grid cells is too small to plant three anchors"
    return 0, cells // 2, cells - 1


def discovery_cells(cells: int) -> tuple[int, int, int, int]:
    """The cells of :data:`DISCOVERY` in a view of ``cells`` cells."""
    assert cells >= 4, f"a view of {cells} grid cells is too small to plant four anchors"
    return 0, cells // 3, 2 * cells // 3, cells - 1


def anchor_ids(loaded: Loaded, count: int) -> list[int]:
    """``count`` ordinary ids (below the tokenizer's size, not special) none of which is among another's
    :data:`NEAR` nearest rows or shares one with it."""
    adapter = loaded.adapter
    tokenizer = adapter.tokenizer
    table = adapter.input_embeddings.weight.detach()[: len(tokenizer)]
    special = {*tokenizer.all_special_ids, adapter.image_token_id}
    chosen: list[int] = []
    taken: set[int] = set()
    for candidate in range(len(tokenizer) // 2, len(tokenizer)):
        near = set(top_ids(table[candidate : candidate + 1], table, NEAR)[0].tolist())
        if candidate not in special and candidate not in taken and not near & taken:
            chosen.append(candidate)
            taken |= near | {candidate}
        if len(chosen) == count:
            return chosen
    raise AssertionError(f"no {count} well-separated ordinary ids in the table")


class Plant:
    """Hooks planting anchor rows at chosen cells of every span of every prefill (see the module docs).

    Without ``discovery`` the cells are :func:`planted_cells`, one per group of :data:`GROUPS`. With it,
    :func:`discovery_cells`, one per part of :data:`DISCOVERY`: the vision features behind the ViT-sink
    cell (``adapter.vision_token_features`` says which entries of the projector's input those are) are
    scaled by :data:`VIT_BOOST`, and at the input of decoder layer 1 the ``llm_bos`` cell copies the first
    position, the ``llm_massive`` cell gets a massive activation and the ``dead`` cell is set back to its
    layer-0 row.

    Attributes:
        ids: The planted ids, one per planted cell, in cell order.
        batches: The spans of every prefill seen, in order.
    """

    def __init__(self, loaded: Loaded, *, discovery: bool = False) -> None:
        self.adapter = loaded.adapter
        self.discovery = discovery
        self.cells = discovery_cells if discovery else planted_cells
        self.ids = anchor_ids(loaded, len(DISCOVERY) if discovery else len(GROUPS))
        table = self.adapter.input_embeddings.weight.detach()
        avoid = sorted({int(i) for a in self.ids for i in top_ids(table[a : a + 1], table, NEAR)[0]})
        self.basis = torch.linalg.qr(unit_rows(table[avoid]).T)[0]  # [d, m] orthonormal, float64
        self.rows = table[self.ids].clone()  # [cells, d]
        self.batches: list[list[list]] = []
        self._pending: tuple[list[list], torch.Tensor | None, int] | None = None

    @property
    def anchors(self) -> Anchors:
        """The planted ids as anchors: vit_sink, llm_sink, dead (for classify / stats / group targets)."""
        groups = {name: (token_id,) for name, token_id in zip(GROUPS, self.ids, strict=True)}
        return Anchors.for_tokenizer(groups, self.adapter.tokenizer, model="planted")

    @contextlib.contextmanager
    def hooks(self) -> Iterator[Plant]:
        """The hooks installed for the ``with`` block (removed after it, also on an exception)."""
        adapter = self.adapter
        pre = {"with_kwargs": True, "prepend": True}
        handles = [
            adapter.model.register_forward_pre_hook(self._model_hook, **pre),
            adapter.language_model.register_forward_pre_hook(self._llm_hook, **pre),
        ]
        if self.discovery:
            handles.append(adapter.projector.register_forward_pre_hook(self._boost_hook, prepend=True))
            handles.append(adapter.decoder_layers[1].register_forward_pre_hook(self._sink_hook, **pre))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _spans(self) -> Iterator:
        assert self._pending is not None
        return (span for sample_spans in self._pending[0] for span in sample_spans)

    def _model_hook(self, _module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None or not bool((input_ids == self.adapter.image_token_id).any()):
            return  # a decoding step
        spans = self.adapter.find_spans({**kwargs, "input_ids": input_ids})
        self.batches.append(spans)
        self._pending = (spans, kwargs.get("attention_mask"), int(input_ids.shape[1]))

    def _boost_hook(self, _module, args: tuple):
        """The projector's input: the entries behind the ViT-sink cell of every span, scaled."""
        if self._pending is None or not args or not isinstance(args[0], torch.Tensor):
            return None
        features = args[0]
        with torch.inference_mode(False), torch.enable_grad():
            behind = torch.zeros(features.shape, dtype=torch.bool, device=features.device)
            for span in self._spans():
                probe = torch.zeros(features.shape, dtype=torch.float64, device=features.device, requires_grad=True)
                cell = self.cells(span.num_tokens)[0]
                (gradient,) = torch.autograd.grad(self.adapter.vision_token_features(probe, span)[cell].sum(), probe)
                behind |= gradient != 0
        assert bool(behind.any()), "vision_token_features names no projector input behind the ViT-sink cell"
        return (torch.where(behind, features * VIT_BOOST, features), *args[1:])

    def _llm_hook(self, _module, args: tuple, kwargs: dict):
        embeds = kwargs.get("inputs_embeds")
        if self._pending is None or embeds is None or embeds.shape[1] != self._pending[2]:
            return None
        embeds = embeds.clone()
        for span in self._spans():
            grid = embeds[span.sample, span.positions].double()
            grid = grid - (grid @ self.basis) @ self.basis.T  # no anchor nor neighbour in reach
            for cell, row in zip(self.cells(span.num_tokens), self.rows, strict=True):
                grid[cell] = row.double()
            embeds[span.sample, span.positions] = grid.to(embeds.dtype)
        kwargs["inputs_embeds"] = embeds
        if not self.discovery:
            self._pending = None
        return args, kwargs

    def _sink_hook(self, _module, args: tuple, kwargs: dict):
        """Decoder layer 1's input: the LLM sinks and the dead token of :data:`DISCOVERY`."""
        if self._pending is None:
            return None
        mask, length = self._pending[1:]
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] != length:
            return None
        hidden = hidden.clone()
        for span in self._spans():
            row = span.sample
            first = 0 if mask is None else int(torch.nonzero(mask[row]).flatten()[0])
            _, bos, massive, dead = (int(span.positions[c]) for c in self.cells(span.num_tokens))
            hidden[row, bos] = hidden[row, first]
            hidden[row, massive, 3] = 100 * hidden[row, massive].abs().max()
            hidden[row, dead] = self.rows[3].to(hidden.dtype)
        self._pending = None
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}


def images(loaded: Loaded, count: int) -> list:
    return [loaded.family.image(seed) for seed in range(count)]


def batch_of(loaded: Loaded, count: int) -> PreparedBatch:
    return loaded.session.prepare(images(loaded, count), [loaded.family.prompts[0]] * count)


def positions(spans: Sequence, cells: str = "grid") -> list[int]:
    """Sorted positions of one sample's spans: ``grid``, ``extra``, or one group's planted ``cells``."""
    out: list[int] = []
    for span in spans:
        if cells == "grid":
            out += span.positions.tolist()
        elif cells == "extra":
            out += span.extra_positions.tolist()
        else:
            out.append(int(span.positions[planted_cells(span.num_tokens)[GROUPS.index(cells)]]))
    return sorted(out)


def covers_every_view(reported: Sequence[int], spans: Sequence, feature: str) -> None:
    """Fail, naming the views left out, unless ``reported`` positions are exactly every view's grid."""
    missing = [span.view for span in spans if not set(span.positions.tolist()) <= set(reported)]
    assert not missing, f"{feature} reports no tokens of view(s) {missing} (views: {[s.view for s in spans]})"
    assert sorted(reported) == positions(spans), f"{feature} reports positions that are not grid cells"


@pytest.fixture
def plant(loaded: Loaded) -> Iterator[Plant]:
    with Plant(loaded).hooks() as planted:
        yield planted


# --------------------------------------------------------------------------- 1. probe
class TestProbe:
    """Both lenses at layer 0 and a middle layer, saved and read back, drawn; only tokenizer ids."""

    def test_probe_save_load_pictures(self, loaded: Loaded, tmp_path: Path):
        adapter, image = loaded.adapter, loaded.family.image(0)
        middle = adapter.num_layers // 2
        probe = loaded.session.probe(image, layers=[0, middle], lens=["embedding", "logit"], top_k=3)
        assert isinstance(probe, MultiLayerProbe)
        assert {(r.lens, r.layer) for r in probe.results} == {
            (n, la) for n in ("embedding", "logit") for la in (0, middle)
        }
        for result in probe.results:
            assert int(result.top_ids.max()) < len(adapter.tokenizer), f"{result.lens} lens returned a padding row"
        probe.save(tmp_path / "multi")
        again = MultiLayerProbe.load(tmp_path / "multi")
        for mine, theirs in zip(probe.results, again.results, strict=True):
            assert (mine.lens, mine.layer) == (theirs.lens, theirs.layer)
            assert (mine.top_ids == theirs.top_ids).all() and (mine.position == theirs.position).all()
        single = loaded.session.probe(image, layer=middle, lens="logit", top_k=3)
        single.save(tmp_path / "single")
        assert save_top1_grid(single, tmp_path / "single" / "top1.png").stat().st_size > 0
        assert (type(single).load(tmp_path / "single").top_ids == single.top_ids).all()
        spans = loaded.session.prepare([image], [loaded.family.prompts[0]]).spans[0]
        covers_every_view(single.position.tolist(), spans, "probe")


# --------------------------------------------------------------------------- 2. classify
class TestClassify:
    """The rule labels exactly the planted cells of every view; extra positions are never labelled."""

    def test_planted_cells_exactly(self, loaded: Loaded, plant: Plant, tmp_path: Path):
        results = loaded.session.classify(images(loaded, 2), loaded.family.prompts[0], anchors=plant.anchors)
        assert isinstance(results, list) and len(results) == 2
        for sample, (result, spans) in enumerate(zip(results, plant.batches[-1], strict=True)):
            reported = result.probe.position.tolist()
            assert not set(reported) & set(positions(spans, "extra")), "an extra (non-grid) position was labelled"
            covers_every_view(reported, spans, "classify")
            for group in (*GROUPS, "alive"):
                got = sorted(p for p, g in zip(reported, result.group, strict=True) if g == group)
                expected = (
                    positions(spans, group)
                    if group != "alive"
                    else sorted(set(positions(spans)) - {p for name in GROUPS for p in positions(spans, name)})
                )
                assert got == expected, f"sample {sample}: {group}"
            assert save_group_map(result, tmp_path / f"groups{sample}.png").stat().st_size > 0
        single = loaded.session.classify(loaded.family.image(0), anchors=plant.anchors)
        assert single.counts == results[0].counts


# --------------------------------------------------------------------------- 3. discover-anchors
class TestDiscoverAnchors:
    """Discovery finds the planted ViT sink (vision features read through ``vision_token_features``),
    the two LLM sinks and the dead token, each in its group."""

    def test_finds_planted_sinks_and_dead(self, loaded: Loaded):
        assert loaded.adapter.num_layers >= 2, "discovery planting needs two decoder layers"
        config = DiscoveryConfig(sink_layer=1, cross_layer=1)
        with Plant(loaded, discovery=True).hooks() as planted:
            found = discover_anchors(
                loaded.session, images(loaded, 3), loaded.family.prompts[0], config=config, batch_size=3, progress=False
            )
        vit, bos, massive, dead = planted.ids
        assert found.num_images == 3
        expected = {"vit_sink": {vit}, "llm_sink": {bos, massive}, "dead": {dead}}
        for group, ids in expected.items():
            evidence = found.to_pandas().reindex(sorted(ids)).to_string()
            assert ids <= set(found.groups[group]), f"{group} {found.groups[group]} lacks {ids}:\n{evidence}"
            assert not set(planted.ids) - ids & set(found.groups[group]), f"another plant in {group}"
        classified = loaded.session.classify(loaded.family.image(0), anchors=found.anchors)
        cells = sum(span.num_tokens for span in planted.batches[0][0])
        assert len(classified) == cells, (
            f"classify with the discovered anchors labels {len(classified)} of {cells} cells"
        )


# --------------------------------------------------------------------------- 4. stats
class TestStats:
    """Dataset statistics into a run directory count exactly the planted groups (anchors from a file)."""

    def test_run_directory(self, loaded: Loaded, plant: Plant, tmp_path: Path):
        folder = tmp_path / "images"
        folder.mkdir()
        for number, image in enumerate(images(loaded, 2)):
            image.save(folder / f"im{number}.png")
        anchors = plant.anchors.save(tmp_path / "anchors.json")
        out = tmp_path / "stats"
        summary = run_stats(
            loaded.session,
            open_dataset(folder),
            out,
            anchors=anchors,
            options=StatsOptions(batch_size=2, bootstrap=20),
            progress=False,
        )
        spans = plant.batches[-1]
        grid = sum(len(positions(sample)) for sample in spans)
        views = sum(len(sample) for sample in spans)
        assert (out / SUMMARY_FILE).is_file() and (out / HEATMAP_FILE).is_file()
        assert summary.data["tokens"] == grid, "stats counted other tokens than every view's grid cells"
        for group in GROUPS:
            assert summary.data["groups"][group]["tokens"] == views, group
        assert len(pd.read_parquet(out / TOKENS_FILE)) == grid


# --------------------------------------------------------------------------- 5. diagnose
class TestDiagnose:
    """Per-token diagnostics of one image: one row per grid cell, the planted groups, finite norms."""

    def test_one_image(self, loaded: Loaded, plant: Plant):
        frame = diagnose(
            loaded.session, loaded.family.image(0), anchors=plant.anchors, cross_layer=1, attention_layers=[0]
        )
        spans = plant.batches[-1][0]
        assert len(frame) == len(positions(spans)), (
            f"diagnose gives {len(frame)} rows for {len(positions(spans))} cells"
        )
        for group in GROUPS:
            assert int((frame["group"] == group).sum()) == len(spans), group
        for column in ("vision_norm", "projected_norm", "cross_layer_cosine", "text_attention"):
            assert all(math.isfinite(v) for v in frame[column]), column
        assert frame.loc[frame["group"] == "dead", "anchor_cosine"].round(5).eq(1.0).all()


# --------------------------------------------------------------------------- 6. generate
class TestGenerate:
    """Greedy answers, one and list forms, and under every intervention kind through the public API."""

    def test_one_and_list(self, loaded: Loaded):
        session, prompt = loaded.session, loaded.family.prompts[0]
        one = session.generate(loaded.family.image(0), prompt=prompt, max_new_tokens=2)
        many = session.generate(images(loaded, 2), prompt=prompt, max_new_tokens=2)
        assert isinstance(one, str) and isinstance(many, list) and len(many) == 2
        assert all(isinstance(answer, str) for answer in many)

    @pytest.mark.parametrize(
        "name", ["prune-keep", "prune-reindex", "prune-matched-random", "skip", "inject", "exit", "scale"]
    )
    def test_interventions(self, loaded: Loaded, plant: Plant, name: str):
        items = {
            "prune-keep": Prune(group="dead"),
            "prune-reindex": Prune(group="dead", positions="reindex"),
            "prune-matched-random": Prune(group="dead", select="matched_random", seed=1),
            "skip": Skip(group="llm_sink", sublayers=((0, "attn"), (0, "mlp"))),
            "inject": Inject(layer=1),
            "exit": Exit(layer=1),
            "scale": Scale(factor=0.01),
        }
        batch = batch_of(loaded, 1)
        answers, run = loaded.session.generate_batch(
            batch, max_new_tokens=2, interventions=[items[name]], anchors=plant.anchors
        )
        assert len(answers) == 1 and isinstance(answers[0], str)
        spans, record = batch.spans[0], run.last.samples[0]
        image_tokens = int((batch.inputs["input_ids"][0] == loaded.adapter.image_token_id).sum())
        assert record.visual == image_tokens
        length, layers = record.length, loaded.adapter.num_layers
        dead = positions(spans, "dead")
        expected = {
            "prune-keep": [length - len(dead)] * layers,
            "prune-reindex": [length - len(dead)] * layers,
            "prune-matched-random": [length - len(dead)] * layers,
            "skip": [length] * layers,
            "inject": [length - image_tokens] + [length] * (layers - 1),
            "exit": [length] + [length - image_tokens] * (layers - 1),
            "scale": [length] * layers,
        }
        assert record.tokens_per_layer == expected[name]
        if name in ("prune-keep", "prune-reindex"):
            assert sorted(record.pruned_positions) == dead, "prune:dead removed other tokens than the planted ones"
        if name == "prune-matched-random":
            assert set(record.pruned_positions) <= set(positions(spans))
        if name == "skip":
            assert record.skipped == {"0": len(spans), "0.5": len(spans)}
