"""Conformance: the same checks over every model family, on tiny random checkpoints loaded by path.

Adding a family
---------------
Write its adapter (one file in ``src/embedlens/models/``) and add one :class:`families.Family` entry
to ``FAMILIES`` in ``tests/families.py`` with:

* ``build(directory) -> directory``: save a tiny random checkpoint built from configs (toy sizes, the
  family's real model and processor classes; well under a second) that ``embedlens.load`` reads by path;
* ``image(seed)``: a valid input image for the family (size, aspect);
* what the processor lays out for that image: its ``views`` in sequence order, each a
  :class:`families.View` with the view's name, ``grid`` ``(rows, cols)`` and ``extra_offsets`` (where a
  CLS / newline token sits among the view's image tokens); ``multi_image=False`` when a sample holds a
  single image.

Every class below then runs on it; nothing here may be taught about a family. The checks use only the
adapter interface (``prepare``, ``find_spans``, ``image_token_id``, ``projector``,
``input_embeddings``, ``decoder_layers``, ``position_embeddings``, ``final_norm``, ``lm_head``) and the
public API (``embedlens.load``, ``probe_layers``, ``intervene``), never a family's internals.

The checks, one class each:

1. :class:`TestLensExact` -- both lenses at layer 0 and a middle layer equal an fp64 brute force over
   the table at every reported position (ties to the lower id; never an id past the tokenizer).
2. :class:`TestSpans` -- spans cover exactly the image-token positions of ``input_ids``, without
   overlaps, on the views and grids the processor lays out; grid positions hold the
   projector's rows in its order.
3. :class:`TestEmptyIntervention` -- an intervention that changes nothing is bit-identical.
4. :class:`TestPruneByIndices` -- Prune's prefill equals a hand-built reduced forward (kept positions,
   or renumbered 0..n-1).
5. :class:`TestKVCache` -- greedy decoding with the cache equals recomputing the whole sequence at
   every step, under every intervention kind.
6. :class:`TestHooksRemoved` -- an exception inside ``intervene`` leaves no hook behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest
import torch

from embedlens.interventions import Prune, intervene, parse
from embedlens.models.base import ModelAdapter, PreparedBatch, VisualSpan
from families import Family, Loaded
from helpers import recorded_inputs

#: Greedy steps of the KV-cache check.
STEPS = 4
#: Tokens per position the lens check compares.
TOP_K = 5


# --------------------------------------------------------------------------- helpers
def _batch(loaded: Loaded, seeds: Sequence[int], prompts: Sequence[str] | None = None) -> PreparedBatch:
    """One image per sample (the family's images), default prompts of different lengths (left-padded)."""
    family = loaded.family
    prompts = list(prompts) if prompts is not None else list(family.prompts[: len(seeds)])
    return loaded.adapter.prepare([[family.image(seed)] for seed in seeds], prompts)


def _forward(loaded: Loaded, inputs: dict[str, torch.Tensor]):
    with torch.no_grad():
        return loaded.session.model(**inputs)


def _cells(family: Family) -> tuple[int, ...]:
    """Grid cells (row-major, of every view) the prune checks remove: first, middle and last of the
    smallest view, and a third of the way in when that leaves a cell standing (never every cell)."""
    n = family.smallest_grid
    cells = {0, n // 3, n // 2, n - 1}
    return tuple(sorted(cells if len(cells) < n else cells - {n // 3}))


def _layer_inputs(adapter: ModelAdapter, inputs: dict[str, torch.Tensor], layers: Sequence[int]) -> dict:
    """The residual stream entering decoder layer ``l`` (EmbedLens layer ``l``) for each ``l < L``, from an
    untouched forward, read by pre-hooks on the adapter's decoder layers: layer -> ``[B, T, d]``."""
    store: dict[int, torch.Tensor] = {}
    handles = []
    for layer in layers:

        def hook(_module, args, kwargs, layer=layer):
            store[layer] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

        handles.append(adapter.decoder_layers[layer].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            adapter.model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return store


def _searchable(adapter: ModelAdapter, table: torch.Tensor) -> int:
    return min(int(table.shape[0]), len(adapter.tokenizer))


def _brute_force(adapter: ModelAdapter, lens: str, vectors: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 top-``k`` over every row the tokenizer has: cosine to the input embeddings, or the logits of
    final norm + LM head. Ties go to the lower id (stable sort). ``vectors`` ``[n, d]`` -> ids, scores ``[n, k]``."""
    with torch.no_grad():
        if lens == "embedding":
            table = adapter.input_embeddings.weight.detach().double()
            table = table[: _searchable(adapter, table)]
            queries = vectors.double()
            scores = (queries / queries.norm(dim=-1, keepdim=True)) @ (table / table.norm(dim=-1, keepdim=True)).T
        else:
            table = adapter.lm_head.weight.detach().double()
            rows = _searchable(adapter, table)
            scores = adapter.final_norm(vectors).double() @ table[:rows].T
            bias = getattr(adapter.lm_head, "bias", None)
            if bias is not None:
                scores = scores + bias.detach().double()[:rows]
    order = torch.sort(-scores, dim=-1, stable=True).indices[:, :k]
    return order, scores.gather(1, order)


def _causal_mask(length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive causal mask ``[1, 1, T, T]`` (0 where attending is allowed, the dtype's minimum elsewhere)."""
    allowed = torch.ones(length, length, dtype=torch.bool).tril()
    mask = torch.zeros(length, length, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


@dataclass
class Untouched:
    """What the decoder stack got in an untouched forward of one unpadded sample.

    Attributes:
        embeds: Layer-0 inputs ``[1, L, d]``.
        positions: The language model's position ids as ``[P, 1, L]`` (``0..L-1`` when it got none).
        planar: Whether it got planes (``[P, B, L]``) rather than ``[B, L]``.
        masks: Each decoder layer's attention mask (None: plain causal).
        additions: What the stack adds after each decoder layer (DeepStack), ``[1, L, d]`` per layer.
    """

    embeds: torch.Tensor
    positions: torch.Tensor
    planar: bool
    masks: list[torch.Tensor | None]
    additions: dict[int, torch.Tensor]


def _untouched(adapter: ModelAdapter, inputs: dict[str, torch.Tensor]) -> Untouched:
    """Read, with pre-hooks, what the language model and each decoder layer receive (nothing is changed)."""
    stack, layers = recorded_inputs(adapter, inputs)
    length = layers[0]["hidden"].shape[1]
    given = stack.get("position_ids")
    positions = torch.arange(length)[None, None] if given is None else (given if given.dim() == 3 else given[None])
    masks = [kwargs.get("attention_mask") for kwargs in layers]
    additions = adapter.pop_layer_additions(dict(stack), length)
    return Untouched(layers[0]["hidden"], positions, given is not None and given.dim() == 3, masks, additions)


def _reference_reindex(positions: torch.Tensor, kept: list[int], image_of: dict[int, int]) -> torch.Tensor:
    """The documented renumbering, token by token: ``positions`` ``[P, L]`` -> ``[P, n_kept]``. A 4-plane
    tensor's first plane is plain text positions (renumbered 0, 1, ...)."""
    planes = positions.shape[0]
    if planes == 4:
        text = torch.arange(len(kept))[None]
        return torch.cat([text, _reference_reindex(positions[1:], kept, image_of)])
    if planes == 1:
        return torch.arange(len(kept))[None]
    out = torch.zeros(planes, len(kept), dtype=torch.long)
    cursor, index = 0, 0
    while index < len(kept):
        image = image_of.get(kept[index])
        if image is None:
            out[:, index] = cursor
            cursor, index = cursor + 1, index + 1
            continue
        run = [i for i in range(index, len(kept)) if image_of.get(kept[i]) == image]
        run = run[: next((n for n, i in enumerate(run) if i != index + n), len(run))]
        for plane in range(planes):
            values = sorted({int(positions[plane, kept[i]]) for i in run})
            for i in run:
                out[plane, i] = cursor + values.index(int(positions[plane, kept[i]]))
        cursor = int(out[:, run].max()) + 1
        index = run[-1] + 1
    return out


def _kept_mask(mask: torch.Tensor | None, kept: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A layer's mask at the kept rows and columns (plain causal when the layer got none)."""
    if mask is None:
        return _causal_mask(kept.numel(), dtype)
    return mask[:, :, kept][:, :, :, kept]


def _decoder_by_hand(
    adapter: ModelAdapter, seen: Untouched, kept: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Run the adapter's decoder layers on the kept columns of one unpadded sequence, then final norm and
    LM head: each layer's own mask read at the kept columns, rotary embeddings for ``positions``
    (``[P, 1, n]``), and the stack's additions at the kept columns.

    Returns:
        Logits ``[n, V]``.
    """
    hidden = seen.embeds[:, kept]
    given = positions if seen.planar else positions[0]
    with torch.no_grad():
        for index, layer in enumerate(adapter.decoder_layers):
            out = layer(
                hidden,
                attention_mask=_kept_mask(seen.masks[index], kept, hidden.dtype),
                position_ids=adapter.layer_position_ids(given),
                position_embeddings=adapter.position_embeddings(hidden, given, index),
            )
            hidden = out[0] if isinstance(out, tuple) else out
            if index in seen.additions:
                hidden = hidden + seen.additions[index][:, kept].to(hidden.dtype)
        return adapter.lm_head(adapter.final_norm(hidden))[0]


def _all_positions(spans: Sequence[VisualSpan]) -> list[int]:
    return [int(p) for span in spans for p in (*span.extra_positions.tolist(), *span.positions.tolist())]


def _hooks(model: torch.nn.Module) -> dict[str, tuple[tuple, tuple]]:
    """Every module's forward hooks and pre-hooks (their handle ids), by module name (modules with any)."""
    return {
        name: (tuple(module._forward_hooks), tuple(module._forward_pre_hooks))
        for name, module in model.named_modules()
        if module._forward_hooks or module._forward_pre_hooks
    }


# --------------------------------------------------------------------------- 1. lens
class TestLensExact:
    """Both lenses equal an fp64 brute force over the table at every reported position."""

    def test_layers_and_lenses_match_brute_force(self, loaded: Loaded):
        adapter, family = loaded.adapter, loaded.family
        middle = adapter.num_layers // 2
        image, prompt = family.image(0), family.prompts[0]
        (probe,) = loaded.session.probe_layers(
            [image], [prompt], layers=[0, middle], lens=["embedding", "logit"], top_k=TOP_K
        )
        assert {(r.lens, r.layer) for r in probe.results} == {
            (lens, layer) for lens in ("embedding", "logit") for layer in (0, middle)
        }
        batch = _batch(loaded, [0], [prompt])
        grid_positions = [int(p) for span in batch.spans[0] for p in span.positions]
        hidden = _layer_inputs(adapter, batch.inputs, [0, middle])
        for result in probe.results:
            assert result.position.tolist() == grid_positions
            vectors = hidden[result.layer][0, torch.as_tensor(result.position)]
            ids, scores = _brute_force(adapter, result.lens, vectors, TOP_K)
            where = f"{result.lens} lens, layer {result.layer}"
            assert torch.equal(torch.as_tensor(result.top_ids), ids), where
            torch.testing.assert_close(torch.as_tensor(result.top_sims), scores, rtol=1e-9, atol=1e-9, msg=where)
            assert int(result.top_ids.max()) < len(adapter.tokenizer), where


# --------------------------------------------------------------------------- 2. spans
class TestSpans:
    """Spans cover exactly the image tokens the processor laid out, one grid per image, no overlaps."""

    @staticmethod
    def _check(loaded: Loaded, batch: PreparedBatch, images_per_sample: Sequence[int]) -> None:
        adapter, family = loaded.adapter, loaded.family
        input_ids = batch.inputs["input_ids"].cpu()
        assert len(batch.spans) == input_ids.shape[0] == len(images_per_sample)
        views = len(family.views)
        next_image = 0
        for sample, (row, spans) in enumerate(zip(input_ids, batch.spans, strict=True)):
            image_positions = torch.nonzero(row == adapter.image_token_id).flatten().tolist()
            assert len(image_positions) == images_per_sample[sample] * family.tokens_per_image
            assert len(spans) == images_per_sample[sample] * views
            covered = _all_positions(spans)
            assert len(covered) == len(set(covered)), f"sample {sample}: spans overlap"
            assert sorted(covered) == image_positions, f"sample {sample}: spans and image tokens differ"
            start = 0
            for index, span in enumerate(spans):
                image, view = divmod(index, views)
                expected = family.views[view]
                where = f"sample {sample} image {image} view {expected.name}"
                assert (span.sample, span.image, span.global_image) == (sample, image, next_image + image), where
                assert (span.view, span.grid) == (expected.name, expected.grid), where
                assert span.num_tokens == span.grid[0] * span.grid[1]
                run = image_positions[start : start + expected.tokens]
                start += expected.tokens
                extra = [run[offset] for offset in expected.extra_offsets]
                assert span.extra_positions.tolist() == extra, f"{where}: extra positions"
                assert span.positions.tolist() == [p for p in run if p not in extra], f"{where}: grid positions"
                assert not set(span.markers.tolist()) & set(image_positions), f"{where}: a marker is an image token"
            next_image += images_per_sample[sample]
        again = adapter.find_spans(batch.inputs)
        for mine, theirs in zip(again, batch.spans, strict=True):
            assert [_all_positions([s]) for s in mine] == [_all_positions([s]) for s in theirs]

    def test_left_padded_batch(self, loaded: Loaded):
        batch = _batch(loaded, [0, 1])
        mask = batch.inputs["attention_mask"]
        assert int(mask[0].sum()) != int(mask[1].sum()), "the prompts should differ in length"
        self._check(loaded, batch, [1, 1])

    def test_grid_positions_hold_the_projector_rows_in_order(self, loaded: Loaded):
        """Cell ``i`` of a span really is the ``i``-th grid feature: the layer-0 vector at each grid
        position is a projector output row, each a different one, in the projector's order; extra
        positions hold none of the grid's rows."""
        adapter = loaded.adapter
        batch = _batch(loaded, [0, 1])
        outputs: list[torch.Tensor] = []
        handle = adapter.projector.register_forward_hook(lambda _m, _a, out: outputs.append(out.detach()))
        try:
            embeds = _layer_inputs(adapter, batch.inputs, [0])[0]
        finally:
            handle.remove()
        rows = torch.cat([out.reshape(-1, out.shape[-1]) for out in outputs])
        views = loaded.family.views
        for sample_spans in batch.spans:
            for index, span in enumerate(sample_spans):
                vectors = embeds[span.sample, span.positions]
                matches = (vectors[:, None, :] == rows[None, :, :]).all(dim=-1)
                assert bool(matches.any(dim=1).all()), "a grid position holds no projector row"
                first = matches.float().argmax(dim=1)
                assert first.unique().numel() == first.numel(), "two grid positions hold the same projector row"
                if views[index % len(views)].projector_order:
                    assert torch.all(first[1:] > first[:-1]), "grid positions out of the projector's order"
                extra = embeds[span.sample, span.extra_positions]
                assert not bool((extra[:, None, :] == vectors[None, :, :]).all(dim=-1).any())

    def test_two_images_in_one_sample(self, loaded: Loaded):
        """Two images in one sample: the usual layout per image, or, for a family that lays a sample of
        several images out differently (``multi_image=False``), spans that still cover exactly the image
        tokens, one image after the other, without overlaps."""
        family, adapter = loaded.family, loaded.adapter
        batch = adapter.prepare([[family.image(0), family.image(1)], [family.image(2)]], list(family.prompts))
        if family.multi_image:
            self._check(loaded, batch, [2, 1])
            return
        for sample, (row, spans) in enumerate(zip(batch.inputs["input_ids"].cpu(), batch.spans, strict=True)):
            covered = _all_positions(spans)
            assert len(covered) == len(set(covered)), f"sample {sample}: spans overlap"
            assert sorted(covered) == torch.nonzero(row == adapter.image_token_id).flatten().tolist()
            assert sorted({span.image for span in spans}) == list(range(2 - sample))
            ends = [max(_all_positions([s for s in spans if s.image == image])) for image in range(2 - sample)]
            assert ends == sorted(ends), f"sample {sample}: images out of order"


# --------------------------------------------------------------------------- 3. empty
class TestEmptyIntervention:
    """Interventions that change nothing leave forward and generate bit-identical."""

    @pytest.mark.parametrize("items", [[], [Prune(indices=())]], ids=["none", "prune-nothing"])
    def test_forward_and_generate_identical(self, loaded: Loaded, items):
        batch = _batch(loaded, [0, 1])
        model = loaded.session.model
        base = _forward(loaded, batch.inputs).logits
        with torch.no_grad():
            base_tokens = model.generate(**batch.inputs, max_new_tokens=STEPS, do_sample=False)
        with intervene(loaded.session, items):
            assert torch.equal(_forward(loaded, batch.inputs).logits, base)
            with torch.no_grad():
                assert torch.equal(model.generate(**batch.inputs, max_new_tokens=STEPS, do_sample=False), base_tokens)


# --------------------------------------------------------------------------- 4. prune
class TestPruneByIndices:
    """Prune's prefill equals the hand-built reduced sequence through the adapter's decoder layers."""

    @staticmethod
    def _by_hand(loaded: Loaded, seed: int, prompt: str, positions: str) -> torch.Tensor:
        """Last-token logits ``[V]`` of one unpadded sample with the pruned cells left out by hand."""
        adapter = loaded.adapter
        batch = _batch(loaded, [seed], [prompt])
        input_ids = batch.inputs["input_ids"]
        seen = _untouched(adapter, batch.inputs)
        text = input_ids[0] != adapter.image_token_id
        with torch.no_grad():
            table = adapter.input_embeddings(input_ids)
        # layer 0 is the model's own embedding of the text with the visual tokens scattered in
        assert torch.equal(seen.embeds[0, text], table[0, text])
        removed = {int(span.positions[cell]) for span in batch.spans[0] for cell in _cells(loaded.family)}
        kept = [p for p in range(input_ids.shape[1]) if p not in removed]
        image_of = {int(p): span.image for span in batch.spans[0] for p in _all_positions([span])}
        original = seen.positions[:, 0]
        numbering = original[:, kept] if positions == "keep" else _reference_reindex(original, kept, image_of)
        return _decoder_by_hand(adapter, seen, torch.tensor(kept), numbering[:, None])[-1]

    @pytest.mark.parametrize("positions", ["keep", "reindex"])
    def test_prefill_equals_reduced_forward(self, loaded: Loaded, positions: str):
        family = loaded.family
        batch = _batch(loaded, [0, 1])
        with intervene(loaded.session, [Prune(indices=_cells(family), positions=positions)]) as run:
            hooked = _forward(loaded, batch.inputs).logits[:, -1]
        for row, prompt in enumerate(family.prompts):
            assert run.last.samples[row].pruned == list(_cells(family)) * len(batch.spans[row])
            expected = self._by_hand(loaded, row, prompt, positions)
            torch.testing.assert_close(hooked[row], expected, rtol=0, atol=1e-5, msg=f"row {row}")

    def test_positions_matter(self, loaded: Loaded):
        """The check above can fail: keeping and renumbering positions give different references."""
        keep = self._by_hand(loaded, 0, loaded.family.prompts[0], "keep")
        reindex = self._by_hand(loaded, 0, loaded.family.prompts[0], "reindex")
        assert not torch.allclose(keep, reindex, rtol=0, atol=1e-4)


# --------------------------------------------------------------------------- 5. KV cache
#: Every intervention kind, in the notation (``{cells}``: the prune cells; ``{middle}``, ``{last}``: layers).
SETTINGS = {
    "prune-keep": ["prune:[{cells}]"],
    "prune-reindex": ["prune:[{cells}],positions=reindex"],
    "prune-matched-random": ["prune:[{cells}],select=matched_random,seed=3"],
    "skip": ["skip:[{cells}]@0-1.5"],
    "inject": ["inject@{middle}"],
    "exit": ["exit@{middle}"],
    "scale": ["scale:0.01"],
    "combined": ["prune:[{cells}],positions=reindex", "inject@1", "skip:visual@1.5", "exit@{last}"],
}


def _settings(loaded: Loaded, name: str) -> list:
    layers = loaded.adapter.num_layers
    values = {"cells": ",".join(map(str, _cells(loaded.family))), "middle": layers // 2, "last": layers - 1}
    return [parse(text.format(**values)) for text in SETTINGS[name]]


class TestKVCache:
    """Greedy decoding with the cache equals recomputing the whole sequence each step, per intervention."""

    @pytest.mark.parametrize("name", list(SETTINGS))
    def test_cached_equals_recomputed(self, loaded: Loaded, name: str):
        items = _settings(loaded, name)
        batch = _batch(loaded, [0, 1])
        model = loaded.session.model
        with intervene(loaded.session, items), torch.no_grad():
            cached = model.generate(
                **batch.inputs,
                max_new_tokens=STEPS,
                do_sample=False,
                num_beams=1,
                return_dict_in_generate=True,
                output_logits=True,
            )
        cached_logits = torch.stack(cached.logits, dim=1)
        inputs = dict(batch.inputs)
        recomputed = []
        for _ in range(STEPS):
            with intervene(loaded.session, items), torch.no_grad():
                logits = model(**inputs, use_cache=False).logits[:, -1]
            recomputed.append(logits)
            step = logits.argmax(dim=-1, keepdim=True)
            inputs["input_ids"] = torch.cat([inputs["input_ids"], step], dim=1)
            inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(step)], dim=1)
            for name, value in batch.inputs.items():
                # other per-token inputs (token types: Qwen's mm_token_type_ids, Gemma's token_type_ids) grow
                # by a generated token's type
                if name not in ("input_ids", "attention_mask") and value.shape[:2] == batch.inputs["input_ids"].shape:
                    kind = torch.full_like(step, loaded.family.generated_token_type, dtype=value.dtype)
                    inputs[name] = torch.cat([inputs[name], kind], dim=1)
        length = batch.inputs["input_ids"].shape[1]
        assert torch.equal(cached.sequences[:, length:], inputs["input_ids"][:, length:])
        torch.testing.assert_close(cached_logits, torch.stack(recomputed, dim=1), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- 6. hooks
class _Boom(RuntimeError):
    pass


@contextlib.contextmanager
def _raise_on_call(module: torch.nn.Module, call: int) -> Iterator[None]:
    """Make ``module``'s forward raise :class:`_Boom` on its ``call``-th call (1-based)."""
    calls = [0]

    def hook(_module, _args):
        calls[0] += 1
        if calls[0] == call:
            raise _Boom("raised inside the model")

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class TestHooksRemoved:
    """After an exception inside ``intervene`` no hook is left and the model runs untouched."""

    @pytest.mark.parametrize("where", ["in-the-block", "mid-decoding"])
    def test_no_hooks_after_exception(self, loaded: Loaded, where: str):
        session = loaded.session
        batch = _batch(loaded, [0, 1])
        base = _forward(loaded, batch.inputs).logits
        with torch.no_grad():
            session.model.generate(**batch.inputs, max_new_tokens=2, do_sample=False)
        # transformers keeps hooks of its own (output recording) once a model has run; ours must go
        before = _hooks(session.model)
        items = _settings(loaded, "combined")
        last_layer = loaded.adapter.decoder_layers[-1]
        with pytest.raises(_Boom), intervene(session, items):
            assert _hooks(session.model) != before, "intervene should hook the model"
            if where == "in-the-block":
                _forward(loaded, batch.inputs)
                raise _Boom("raised in the with block")
            # the last decoder layer raises on its second call: the first decoding step
            with _raise_on_call(last_layer, 2), torch.no_grad():
                session.model.generate(**batch.inputs, max_new_tokens=STEPS, do_sample=False)
        assert _hooks(session.model) == before
        assert torch.equal(_forward(loaded, batch.inputs).logits, base)
