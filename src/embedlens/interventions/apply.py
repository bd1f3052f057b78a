"""Applying interventions to a stock ``transformers`` model with hooks that are always removed.

``with intervene(session, [Prune(group="dead")]) as run: session.model.generate(...)`` installs:

* a forward pre-hook on the whole model, which finds each sample's visual tokens from the image token id
  in ``input_ids`` at every prefill (a call with an empty cache);
* a forward pre-hook on the language model (the decoder stack), which at prefill labels the visual
  tokens when a group is targeted, chooses what each Prune removes, scales the visual embeddings, and
  hands the decoder the tokens present at layer 0 -- left-padded again when samples lose different
  numbers of tokens, with positions that keep the original numbering (or are renumbered) and an
  explicit 2-D mask; at each decode step it maps ``generate``'s mask and positions (which count the
  unpruned sequence) onto what the cache holds;
* pre-hooks on the decoder layers where the set of tokens changes (Inject, Exit): they re-lay the
  residual stream and hand those layers their own mask and rotary embeddings, so each layer's cache
  holds exactly its own tokens;
* forward hooks on the attention / MLP modules a Skip names, zeroing the chosen rows' updates.

Everything runs inside the model's own forward and ``generate`` loop (the KV cache included); the
default SDPA attention keeps working (Inject and Exit need SDPA or eager attention, because they give
some layers masks of their own). The hooks come off when the ``with`` block ends, also on exceptions.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from embedlens.errors import InputError
from embedlens.interventions.select import SampleTokens, prune_mask, target_mask
from embedlens.interventions.spec import Intervention, Plan, describe, plan
from embedlens.models.base import ModelAdapter, VisualSpan

if TYPE_CHECKING:
    from embedlens.context import ModelContext
    from embedlens.taxonomy import Anchors


@dataclass
class SampleRecord:
    """What the interventions did to one sample at one prefill.

    Attributes:
        sample_id: The sample's id (the batch row unless ``sample_ids`` were given); seeds derive from it.
        length: Tokens in the untouched sequence (padding excluded).
        visual: Visual tokens in the untouched sequence.
        groups: Count of each group among the grid tokens, when a group was targeted.
        pruned: Grid cells removed before layer 0 (cell indices, all images of the sample in order).
        pruned_positions: Sequence positions removed before layer 0.
        seeds: Seed of each ``matched_random`` Prune, keyed by its notation.
        tokens_per_layer: Tokens entering each decoder layer (``num_layers`` entries).
        skipped: Tokens whose update each skipped sublayer zeroes, keyed by ``"n"`` / ``"n.5"``.
        skipped_visible: For each skipped attention sublayer (``"n"``), ``(rows, keys)``: the rows
            skipped and the sum of the keys each would have attended to (for FLOP accounting).
        images: Images in the sample.
        grid_tokens: Grid tokens per image.
    """

    sample_id: int
    length: int
    visual: int
    groups: dict[str, int] | None = None
    pruned: list[int] = field(default_factory=list)
    pruned_positions: list[int] = field(default_factory=list)
    seeds: dict[str, int] = field(default_factory=dict)
    tokens_per_layer: list[int] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_visible: dict[str, tuple[int, int]] = field(default_factory=dict)
    images: int = 0
    grid_tokens: int = 0


@dataclass
class PrefillRecord:
    """One prefill under interventions.

    Attributes:
        samples: One record per batch row.
        output_positions: For each row, the original sequence position of every row of the model's
            output (left padding is -1), shape ``[B, T_out]`` -- logits and last hidden states follow
            this layout when tokens were removed.
    """

    samples: list[SampleRecord]
    output_positions: torch.Tensor


class InterventionRun:
    """The handle ``intervene`` yields: the checked plan and a record of every prefill it saw."""

    def __init__(self, checked: Plan, items: Sequence[Intervention]) -> None:
        self.plan = checked
        self.interventions = list(items)
        self.records: list[PrefillRecord] = []

    @property
    def last(self) -> PrefillRecord:
        """The most recent prefill's record."""
        if not self.records:
            raise InputError("no forward pass has run under these interventions yet")
        return self.records[-1]

    def describe(self) -> str:
        """The interventions in the text notation (``"none"`` when there are none)."""
        return " ".join(describe(item) for item in self.interventions) or "none"


@dataclass
class _Phase:
    """A range of decoder layers that all see the same tokens (at prefill).

    Attributes:
        first: First decoder layer of the range.
        stop: One past the last.
        columns: Original sequence column of each slot, -1 for padding, ``[B, T]``.
        valid: Slots holding a token, ``[B, T]``.
        mask: The 4-D attention mask of these layers at prefill, or None for the base phase.
        position_ids: Positions of the slots, ``[B, T]``.
        position_embeddings: What the decoder layers get for these positions (None for the base phase).
    """

    first: int
    stop: int
    columns: torch.Tensor
    valid: torch.Tensor
    mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    position_embeddings: Any = None


@dataclass
class _Prefill:
    """Everything the hooks share between the prefill and the decode steps of one sequence."""

    length: int
    phases: list[_Phase]
    phase_of_layer: list[int]
    removed: torch.Tensor
    embeds: torch.Tensor
    changed: bool
    skip_rows: dict[tuple[int, str], torch.Tensor]
    decoded: int = 0
    in_prefill: bool = True
    decode_masks: dict[int, torch.Tensor] = field(default_factory=dict)


def _first_arg(args: tuple, kwargs: dict, name: str) -> Any:
    return kwargs[name] if name in kwargs else (args[0] if args else None)


def _cache_of(kwargs: dict) -> Any:
    return kwargs.get("cache", kwargs.get("past_key_values"))


def _is_prefill(kwargs: dict) -> bool:
    cache = _cache_of(kwargs)
    return cache is None or int(cache.get_seq_length()) == 0


def _attention_mask(allowed: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """A boolean ``[B, 1, q, kv]`` allowed-matrix in the form the attention implementation expects."""
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _left_pad(keep: torch.Tensor) -> torch.Tensor:
    """Columns of the kept entries of each row, left-padded with -1: ``[B, L]`` bool -> ``[B, T]`` long."""
    counts = keep.sum(dim=1)
    width = int(counts.max()) if keep.shape[0] else 0
    columns = torch.full((keep.shape[0], width), -1, dtype=torch.long, device=keep.device)
    for row in range(keep.shape[0]):
        found = torch.nonzero(keep[row]).flatten()
        if found.numel():
            columns[row, width - found.numel() :] = found
    return columns


def _phase_bounds(checked: Plan) -> list[int]:
    """Layers where the set of tokens changes, with 0 and ``num_layers``: ``[0, ..., num_layers]``."""
    inner = {b for b in (checked.inject, checked.exit) if 0 < b < checked.num_layers}
    bounds = [0]
    for bound in sorted(inner):
        if checked.visual_present(bound) != checked.visual_present(bound - 1):
            bounds.append(bound)
    return [*bounds, checked.num_layers]


def _gather_rows(values: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``values[b, columns[b, j]]`` with zeros where ``columns`` is -1: ``[B, L, ...]`` -> ``[B, T, ...]``."""
    index = columns.clamp(min=0)
    shape = index.shape + values.shape[2:]
    gathered = values.gather(1, index.view(*index.shape, *([1] * (values.dim() - 2))).expand(shape))
    valid = (columns >= 0).view(*columns.shape, *([1] * (values.dim() - 2)))
    return torch.where(valid, gathered, torch.zeros((), dtype=values.dtype, device=values.device))


class _Engine:
    """The hooks of one ``intervene`` context and the state they share."""

    def __init__(
        self,
        session: ModelContext,
        checked: Plan,
        run: InterventionRun,
        rule: tuple[tuple[str, ...], Anchors, int] | None,
        sample_ids: Sequence[int] | None,
        targets: Sequence[Sequence[int]] | None = None,
    ) -> None:
        self.session = session
        self.adapter: ModelAdapter = session.adapter
        self.plan = checked
        self.run = run
        self.rule = rule
        self.sample_ids = list(sample_ids) if sample_ids is not None else None
        self.targets = [tuple(int(c) for c in cells) for cells in targets] if targets is not None else None
        self.spans: list[list[VisualSpan]] | None = None
        self.state: _Prefill | None = None

    # ------------------------------------------------------------------ installing
    def install(self, stack: contextlib.ExitStack) -> None:
        """Register every hook; the stack removes them."""
        adapter = self.adapter
        handles = [
            adapter.model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True),
            adapter.language_model.register_forward_pre_hook(self._llm_pre_hook, with_kwargs=True),
        ]
        layers_with_phase_change = self._layers_needing_hooks()
        for layer in layers_with_phase_change:
            handles.append(
                adapter.decoder_layers[layer].register_forward_pre_hook(self._layer_pre_hook(layer), with_kwargs=True)
            )
        for layer, part in sorted({pair for skip in self.plan.skips for pair in skip.sublayers}):
            module = adapter.attention(layer) if part == "attn" else adapter.mlp(layer)
            handles.append(module.register_forward_hook(self._skip_hook(layer, part)))
        for handle in handles:
            stack.callback(handle.remove)

    def _layers_needing_hooks(self) -> list[int]:
        """Decoder layers outside the layer-0 phase (every layer from the first change of tokens on)."""
        bounds = _phase_bounds(self.plan)
        return list(range(bounds[1], self.plan.num_layers)) if len(bounds) > 2 else []

    # ------------------------------------------------------------------ hooks
    def _model_pre_hook(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not _is_prefill(kwargs):
            return
        input_ids = _first_arg(args, kwargs, "input_ids")
        if input_ids is None:
            raise InputError("interventions need input_ids to find the visual tokens (inputs_embeds alone were given)")
        self.spans = self.adapter.find_spans(input_ids, self.adapter.image_grids(kwargs))

    def _llm_pre_hook(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if _is_prefill(kwargs):
            self._prefill(kwargs)
        elif self.state is not None:
            self._decode(kwargs)
        return args, kwargs

    def _layer_pre_hook(self, layer: int):
        def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            state = self.state
            if state is None:
                return args, kwargs
            index = state.phase_of_layer[layer]
            phase = state.phases[index]
            if state.in_prefill:
                if layer == phase.first and index > 0:
                    hidden = args[0] if args else kwargs.pop("hidden_states")
                    args = (self._relayout(hidden, state.phases[index - 1], phase, state), *args[1:])
                kwargs["attention_mask"] = phase.mask
                kwargs["position_ids"] = phase.position_ids
                kwargs["position_embeddings"] = phase.position_embeddings
            elif index in state.decode_masks:
                kwargs["attention_mask"] = state.decode_masks[index]
            return args, kwargs

        return hook

    def _skip_hook(self, layer: int, part: str):
        def hook(_module: torch.nn.Module, _args: tuple, output: Any) -> Any:
            state = self.state
            if state is None or not state.in_prefill:
                return output
            rows = state.skip_rows.get((layer, part))
            if rows is None or not bool(rows.any()):
                return output
            first = output[0] if isinstance(output, tuple) else output
            zeroed = first.masked_fill(rows.to(first.device)[..., None], 0)
            return (zeroed, *output[1:]) if isinstance(output, tuple) else zeroed

        return hook

    # ------------------------------------------------------------------ prefill
    def _prefill(self, kwargs: dict) -> None:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise InputError("interventions need the language model to receive inputs_embeds")
        batch, length, _ = embeds.shape
        device = embeds.device
        if self.spans is None and not self.plan.empty:
            raise InputError(
                "interventions find the visual tokens from the whole model's input_ids; call the model, "
                "not its language model alone"
            )
        spans = self.spans if self.spans is not None else [[] for _ in range(batch)]
        self.spans = None
        if len(spans) != batch:
            raise InputError(f"found visual tokens for {len(spans)} samples but the batch has {batch}")
        given_mask = kwargs.get("attention_mask")
        if given_mask is not None and given_mask.dim() != 2:
            raise InputError("interventions need a 2-D attention mask (a prepared 4-D mask was given)")
        mask = (
            given_mask.to(device=device, dtype=torch.bool)
            if given_mask is not None
            else torch.ones(batch, length, dtype=torch.bool, device=device)
        )
        given_positions = kwargs.get("position_ids")
        if given_positions is not None and given_positions.dim() != 2:
            raise InputError("interventions support 2-D position ids only")
        original = (
            given_positions.to(device).expand(batch, length)
            if given_positions is not None
            else torch.arange(length, device=device).expand(batch, length)
        )
        tokens = [SampleTokens.from_spans(sample_spans) for sample_spans in spans]
        if self.targets is not None:
            if len(self.targets) < batch:
                raise InputError(f"{len(self.targets)} target lists given for a batch of {batch}")
            for sample, cells in zip(tokens, self.targets, strict=False):
                sample.targets = cells
        if self.plan.needs_groups:
            self._label(embeds, tokens)
        ids = self.sample_ids or list(range(batch))
        if len(ids) < batch:
            raise InputError(f"{len(ids)} sample ids given for a batch of {batch}")

        visual = torch.zeros(batch, length, dtype=torch.bool)
        pruned = torch.zeros(batch, length, dtype=torch.bool)
        skip_columns: dict[tuple[int, str], torch.Tensor] = {}
        records = []
        for row, sample in enumerate(tokens):
            visual[row, sample.positions] = True
            visual[row, sample.extra] = True
            record = SampleRecord(
                sample_id=int(ids[row]),
                length=int(mask[row].sum()),
                visual=int(sample.num_tokens + sample.extra.numel()),
                images=len(spans[row]),
                grid_tokens=int(spans[row][0].num_tokens) if spans[row] else 0,
            )
            if sample.labels is not None:
                record.groups = {str(name): int((sample.labels == name).sum()) for name in sorted(set(sample.labels))}
            removed = torch.zeros(sample.num_tokens, dtype=torch.bool)
            for item in self.plan.prunes:
                chosen, seed = prune_mask(item, sample, record.sample_id)
                removed |= chosen
                if seed is not None:
                    record.seeds[describe(item)] = seed
            pruned[row, sample.positions[removed]] = True
            record.pruned = sample.cells[removed].tolist()
            record.pruned_positions = sample.positions[removed].tolist()
            for skip in self.plan.skips:
                chosen = target_mask(skip, sample)
                for pair in skip.sublayers:
                    cols = skip_columns.setdefault(pair, torch.zeros(batch, length, dtype=torch.bool))
                    cols[row, sample.positions[chosen]] = True
            records.append(record)
        visual, pruned = visual.to(device), pruned.to(device)

        scaled = embeds
        if self.plan.scale != 1.0 and bool(visual.any()):
            scaled = torch.where(visual[..., None], embeds * self.plan.scale, embeds)
        kept = mask & ~pruned
        positions = original
        if self.plan.positions == "reindex":
            first = original.gather(1, kept.long().argmax(dim=1, keepdim=True))
            positions = torch.where(kept, first + kept.long().cumsum(dim=1) - 1, original)

        phases = self._phases(kept, visual)
        base = phases[0]
        untouched = torch.where(mask, torch.arange(length, device=device), -1)
        changed = base.columns.shape != untouched.shape or not bool((base.columns == untouched).all())
        state = _Prefill(
            length=length,
            phases=phases,
            phase_of_layer=[
                next(i for i, p in enumerate(phases) if p.first <= layer < p.stop)
                for layer in range(self.plan.num_layers)
            ],
            removed=(mask & pruned).sum(dim=1),
            embeds=scaled,
            changed=changed,
            skip_rows={},
        )
        for phase in phases:
            phase.position_ids = torch.where(phase.valid, positions.gather(1, phase.columns.clamp(min=0)), 0)
        if changed:
            kwargs["inputs_embeds"] = _gather_rows(scaled, base.columns)
            kwargs["attention_mask"] = base.valid.long()
            kwargs["position_ids"] = base.position_ids
        elif scaled is not embeds:
            kwargs["inputs_embeds"] = scaled
        self._prepare_phases(state, embeds.dtype)
        for pair, cols in skip_columns.items():
            phase = phases[state.phase_of_layer[pair[0]]]
            cols = cols.to(device)
            state.skip_rows[pair] = cols.gather(1, phase.columns.clamp(min=0)) & phase.valid
        for row, record in enumerate(records):
            record.tokens_per_layer = [int(phases[index].valid[row].sum()) for index in state.phase_of_layer]
            for (layer, part), rows in sorted(state.skip_rows.items()):
                name = f"{layer}{'.5' if part == 'mlp' else ''}"
                record.skipped[name] = int(rows[row].sum())
                if part == "attn":
                    visible = phases[state.phase_of_layer[layer]].valid[row].long().cumsum(0)
                    record.skipped_visible[name] = (int(rows[row].sum()), int(visible[rows[row]].sum()))
        self.state = state
        self.run.records.append(PrefillRecord(samples=records, output_positions=phases[-1].columns.cpu()))

    def _label(self, embeds: torch.Tensor, tokens: list[SampleTokens]) -> None:
        """Label every sample's grid tokens with the rule (on the layer-0 vectors, before any scaling)."""
        from embedlens.taxonomy.rule import classify_ids

        assert self.rule is not None
        order, chosen, k = self.rule
        vectors = [embeds[row, sample.positions.to(embeds.device)] for row, sample in enumerate(tokens)]
        everything = torch.cat(vectors) if vectors else embeds.new_zeros(0, embeds.shape[-1])
        if everything.shape[0] == 0:
            ids = torch.zeros(0, k, dtype=torch.long)
        else:
            ids = self.session.lens("embedding").top_k(everything.detach(), k).ids
        labels = classify_ids(ids, chosen, top_k=k, precedence=order).group
        start = 0
        for sample in tokens:
            sample.labels = labels[start : start + sample.num_tokens]
            start += sample.num_tokens

    def _phases(self, kept: torch.Tensor, visual: torch.Tensor) -> list[_Phase]:
        """Split the decoder layers into ranges that see the same tokens."""
        checked = self.plan
        bounds = _phase_bounds(checked)
        phases: list[_Phase] = []
        for first, stop in itertools.pairwise(bounds):
            present = kept if checked.visual_present(first) else kept & ~visual
            columns = _left_pad(present)
            phases.append(_Phase(first=first, stop=stop, columns=columns, valid=columns >= 0))
        return phases

    def _prepare_phases(self, state: _Prefill, dtype: torch.dtype) -> None:
        """Masks and rotary embeddings of the phases after the first."""
        if len(state.phases) == 1:
            return
        implementation = self.adapter.attention_implementation
        if implementation not in ("sdpa", "eager"):
            raise InputError(
                f"inject and exit need sdpa or eager attention; this model uses {implementation!r} "
                "(load it with attn_implementation='sdpa')"
            )
        for phase in state.phases[1:]:
            columns, valid = phase.columns, phase.valid
            allowed = valid[:, None, :] & (columns[:, None, :] <= columns[:, :, None])
            eye = torch.eye(columns.shape[1], dtype=torch.bool, device=columns.device)
            allowed = allowed | (eye & ~valid[:, :, None])
            phase.mask = _attention_mask(allowed[:, None], implementation, dtype)
            like = state.embeds.new_zeros(columns.shape[0], columns.shape[1], 1)
            phase.position_embeddings = self.adapter.position_embeddings(like, phase.position_ids)

    def _relayout(self, hidden: torch.Tensor, before: _Phase, after: _Phase, state: _Prefill) -> torch.Tensor:
        """Move the residual stream from one phase's slots to the next's; newcomers are visual embeddings."""
        device = hidden.device
        old_columns, old_valid = before.columns.to(device), before.valid.to(device)
        new_columns, new_valid = after.columns.to(device), after.valid.to(device)
        # slot_of[b, c] = slot of original column c in the old layout (-1 if absent); padding slots write
        # into a spare last column so they never collide with a real column.
        slot_of = torch.full((hidden.shape[0], state.length + 1), -1, dtype=torch.long, device=device)
        slots = torch.arange(old_columns.shape[1], device=device).expand_as(old_columns)
        slot_of.scatter_(1, torch.where(old_valid, old_columns, state.length), torch.where(old_valid, slots, -1))
        source = torch.where(new_valid, slot_of.gather(1, new_columns.clamp(min=0)), -1)
        carried = _gather_rows(hidden, source)
        inserted = _gather_rows(state.embeds.to(device, hidden.dtype), new_columns)
        return torch.where((source >= 0)[..., None], carried, inserted)

    # ------------------------------------------------------------------ decode
    def _decode(self, kwargs: dict) -> None:
        state = self.state
        assert state is not None
        state.in_prefill = False
        embeds = kwargs.get("inputs_embeds")
        steps = embeds.shape[1]
        device = embeds.device
        batch = embeds.shape[0]
        given = kwargs.get("attention_mask")
        if given is not None and given.dim() == 2:
            tail = given[:, state.length :].to(device=device, dtype=torch.bool)
        else:
            tail = torch.ones(batch, state.decoded + steps, dtype=torch.bool, device=device)
        base = state.phases[0]
        if state.changed:
            kwargs["attention_mask"] = torch.cat([base.valid, tail], dim=1).long()
            positions = kwargs.get("position_ids")
            if positions is None:
                positions = (state.length + state.decoded + torch.arange(steps, device=device)).expand(batch, steps)
            if self.plan.positions == "reindex":
                positions = positions - state.removed[:, None].to(positions.device)
            kwargs["position_ids"] = positions
        state.decode_masks = {}
        if len(state.phases) > 1:
            implementation = self.adapter.attention_implementation
            query = state.decoded + torch.arange(steps, device=device)
            causal = torch.arange(tail.shape[1], device=device)[None, :] <= query[:, None]
            recent = tail[:, None, :] & causal[None]
            for index, phase in enumerate(state.phases[1:], start=1):
                prefix = phase.valid[:, None, :].expand(batch, steps, phase.valid.shape[1])
                allowed = torch.cat([prefix, recent], dim=2)[:, None]
                state.decode_masks[index] = _attention_mask(allowed, implementation, embeds.dtype)
        state.decoded += steps


@contextlib.contextmanager
def intervene(
    session: ModelContext,
    interventions: Iterable[Intervention],
    *,
    anchors: Anchors | str | None = None,
    top_k: int | None = None,
    sample_ids: Sequence[int] | None = None,
    targets: Sequence[Sequence[int]] | None = None,
) -> Iterator[InterventionRun]:
    """Apply ``interventions`` to every forward pass and ``generate`` call inside the ``with`` block.

    Args:
        session: The loaded model.
        interventions: :class:`~embedlens.interventions.Prune`, ``Skip``, ``Inject``, ``Exit``,
            ``Scale`` objects (checked and composed by :func:`~embedlens.interventions.spec.plan`).
        anchors: Anchors for group targets (default: the model's built-in anchors).
        top_k: Nearest ids the rule looks at (default: the anchors' ``top_k``).
        sample_ids: One id per batch row, from which ``matched_random`` seeds derive (default: the row).
        targets: Grid cells of each batch row's ``"target"`` group (e.g. the patch-compression
            benchmark's target patches); needed when a target names that group.

    Yields:
        An :class:`InterventionRun` recording, for every prefill, what was removed, the seeds drawn
        and the tokens per layer.

    Raises:
        InputError: Unusable interventions for this model (checked before anything is hooked).
    """
    items = list(interventions)
    checked = plan(items, session.adapter.num_layers)
    rule = None
    if checked.needs_groups:
        from embedlens.taxonomy.classify import rule_settings

        rule = rule_settings(session, anchors, top_k, None)
    if checked.needs_targets and targets is None:
        raise InputError("the group 'target' needs each sample's target cells (e.g. a benchmark's target_patches)")
    run = InterventionRun(checked, items)
    engine = _Engine(session, checked, run, rule, sample_ids, targets)
    with contextlib.ExitStack() as stack:
        engine.install(stack)
        yield run
