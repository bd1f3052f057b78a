"""The hooks that apply a checked plan to a stock ``transformers`` model, and the state they share.

:func:`~embedlens.interventions.intervene` installs, through :class:`Engine`:

* a forward pre-hook on the whole model, which finds each sample's visual tokens from the image token id
  in ``input_ids`` at every prefill (a call with an empty cache);
* a forward pre-hook on the language model (the decoder stack), which at prefill labels the visual
  tokens when a group is targeted, chooses what each Prune removes (:mod:`.select`), scales the visual
  embeddings, and hands the decoder the tokens present at layer 0 (:mod:`.layout`) -- left-padded again
  when samples lose different numbers of tokens, with positions that keep the original numbering (or
  are renumbered) and an explicit 2-D mask; at each decode step it maps ``generate``'s mask and
  positions (which count the unpruned sequence) onto what the cache holds;
* pre-hooks on the decoder layers where the set of tokens changes (Inject, Exit): they re-lay the
  residual stream and hand those layers their own mask and rotary embeddings, so each layer's cache
  holds exactly its own tokens;
* forward hooks on the attention / MLP modules a Skip names, zeroing the chosen rows' updates.

Everything runs inside the model's own forward and ``generate`` loop (the KV cache included); the
default SDPA attention keeps working (Inject and Exit need SDPA or eager attention, because they give
some layers masks of their own).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from embedlens.errors import InputError
from embedlens.interventions.layout import (
    Layout,
    build_layout,
    compact_mask,
    decode_step,
    decode_tail,
    gather_rows,
    phase_bounds,
    prepare_phase_masks,
    relayout,
    skip_rows_in_slots,
)
from embedlens.interventions.planning import Plan
from embedlens.interventions.positions import from_planes, to_planes
from embedlens.interventions.records import InterventionRun, PrefillRecord, SampleRecord
from embedlens.interventions.select import SampleTokens, Selection, label_tokens, select_tokens
from embedlens.models.base import ModelAdapter, VisualSpan

if TYPE_CHECKING:
    from embedlens.context import ModelContext
    from embedlens.taxonomy import Anchors


def _first_arg(args: tuple, kwargs: dict, name: str) -> Any:
    return kwargs[name] if name in kwargs else (args[0] if args else None)


def _is_prefill(kwargs: dict) -> bool:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return cache is None or int(cache.get_seq_length()) == 0


class Engine:
    """The hooks of one ``intervene`` context and the state they share.

    Args:
        context: The loaded model.
        checked: The plan to apply.
        run: Where each prefill's record goes.
        rule: ``(precedence, anchors, top_k)`` when a target names a group of the rule, else None.
        sample_ids: One id per batch row (seeds derive from it), or None for the row numbers.
        targets: Each row's ``"target"`` cells, or None.
    """

    def __init__(
        self,
        context: ModelContext,
        checked: Plan,
        run: InterventionRun,
        rule: tuple[tuple[str, ...], Anchors, int] | None,
        sample_ids: Sequence[int] | None,
        targets: Sequence[Sequence[int]] | None = None,
    ) -> None:
        self.context = context
        self.adapter: ModelAdapter = context.adapter
        self.plan = checked
        self.run = run
        self.rule = rule
        self.sample_ids = list(sample_ids) if sample_ids is not None else None
        self.targets = [tuple(int(c) for c in cells) for cells in targets] if targets is not None else None
        self.spans: list[list[VisualSpan]] | None = None
        self.state: Layout | None = None
        #: The whole model's 2-D attention mask at the last prefill (the real tokens), if it got one.
        self.outer_mask: torch.Tensor | None = None
        #: Whether the language model got planes of positions (``[P, B, L]``) rather than ``[B, L]``.
        self.planar = False
        #: Whether the language model was handed a dict of 4-D masks (one per mask key).
        self.mask_dict = False
        self.stack: contextlib.ExitStack | None = None
        self.addition_hooks: set[int] = set()

    # ------------------------------------------------------------------ installing
    def install(self, stack: contextlib.ExitStack) -> None:
        """Register every hook; the stack removes them."""
        self.stack = stack
        adapter = self.adapter
        handles = [
            adapter.model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True),
            adapter.language_model.register_forward_pre_hook(self._llm_pre_hook, with_kwargs=True),
        ]
        bounds = phase_bounds(self.plan)
        # every layer from the first change of tokens on gets its phase's mask and positions
        for layer in range(bounds[1], self.plan.num_layers) if len(bounds) > 2 else ():
            handles.append(
                adapter.decoder_layers[layer].register_forward_pre_hook(self._layer_pre_hook(layer), with_kwargs=True)
            )
        for layer, part in sorted({pair for skip in self.plan.skips for pair in skip.sublayers}):
            module = adapter.attention(layer) if part == "attn" else adapter.mlp(layer)
            handles.append(module.register_forward_hook(self._skip_hook(layer, part)))
        for handle in handles:
            stack.callback(handle.remove)

    # ------------------------------------------------------------------ hooks
    def _model_pre_hook(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        input_ids = _first_arg(args, kwargs, "input_ids")
        if not _is_prefill(kwargs):
            if self.state is not None:
                self._decode_mask(kwargs, input_ids)
            return args, kwargs
        if input_ids is None:
            raise InputError("interventions need input_ids to find the visual tokens (inputs_embeds alone were given)")
        self.spans = self.adapter.find_spans({**kwargs, "input_ids": input_ids})
        given = kwargs.get("attention_mask")
        self.outer_mask = given if isinstance(given, torch.Tensor) and given.dim() == 2 else None
        return args, kwargs

    def _decode_mask(self, kwargs: dict, input_ids: torch.Tensor | None) -> None:
        """At a decode step, before the model builds any mask: note which generated tokens are real and
        hand the model the 2-D mask of what the cache holds (when the base phase differs)."""
        state = self.state
        assert state is not None
        given = kwargs.get("attention_mask")
        like = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if like is None:
            return
        decode_tail(state, given, like.shape[0], like.shape[1], like.device)
        if state.changed:
            if given is not None and not (isinstance(given, torch.Tensor) and given.dim() == 2):
                raise InputError("interventions need a 2-D attention mask while decoding (a prepared mask was given)")
            kwargs["attention_mask"] = compact_mask(state)

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
                hidden = args[0] if args else kwargs["hidden_states"]
                if layer == phase.first and index > 0:
                    hidden = relayout(hidden, state.phases[index - 1], phase, state)
                    if args:
                        args = (hidden, *args[1:])
                    else:
                        kwargs["hidden_states"] = hidden
                key = self.adapter.mask_key(layer)
                kwargs["attention_mask"] = phase.masks[key if self.mask_dict else None]
                positions = from_planes(phase.position_ids, self.planar)
                if key not in phase.position_embeddings:
                    like = hidden.new_zeros(hidden.shape[0], hidden.shape[1], 1)
                    phase.position_embeddings[key] = self.adapter.position_embeddings(like, positions, layer)
                kwargs["position_ids"] = self.adapter.layer_position_ids(positions)
                kwargs["position_embeddings"] = phase.position_embeddings[key]
            elif index in state.decode_masks:
                kwargs["attention_mask"] = state.decode_masks[index]
            return args, kwargs

        return hook

    def _addition_hook(self, layer: int):
        def hook(_module: torch.nn.Module, _args: tuple, output: Any) -> Any:
            state = self.state
            if state is None or not state.in_prefill or layer not in state.additions:
                return output
            first = output[0] if isinstance(output, tuple) else output
            phase = state.phases[state.phase_of_layer[layer]]
            addition = state.additions[layer].to(first.device, first.dtype)
            added = first + gather_rows(addition, phase.columns.to(first.device))
            return (added, *output[1:]) if isinstance(output, tuple) else added

        return hook

    def _take_additions(self, state: Layout, kwargs: dict) -> None:
        """Apply the stack's between-layer additions (DeepStack) ourselves, at the tokens present."""
        state.additions = self.adapter.pop_layer_additions(kwargs, state.length)
        for layer in sorted(set(state.additions) - self.addition_hooks):
            assert self.stack is not None
            handle = self.adapter.decoder_layers[layer].register_forward_hook(self._addition_hook(layer))
            self.stack.callback(handle.remove)
            self.addition_hooks.add(layer)

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
    def _prefill_inputs(self, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[VisualSpan]]]:
        """The decoder stack's inputs at prefill, checked: embeddings ``[B, L, d]``, the real-token mask
        ``[B, L]`` bool, the given positions ``[P, B, L]`` and each row's visual spans."""
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
        self.mask_dict = isinstance(given_mask, dict)
        if isinstance(given_mask, torch.Tensor) and given_mask.dim() == 2:
            real = given_mask
        else:
            real = self.outer_mask if self.outer_mask is not None and self.outer_mask.shape[-1] == length else None
        mask = (
            real.to(device=device, dtype=torch.bool)
            if real is not None
            else torch.ones(batch, length, dtype=torch.bool, device=device)
        )
        given_positions = kwargs.get("position_ids")
        if given_positions is not None and given_positions.dim() not in (2, 3):
            raise InputError("interventions support position ids of shape [B, L] or [P, B, L] only")
        self.planar = given_positions is not None and given_positions.dim() == 3
        return embeds, mask, to_planes(given_positions, batch, length, device), spans

    @staticmethod
    def _handed_masks(kwargs: dict) -> dict[str | None, torch.Tensor | None]:
        """The ready 4-D masks the language model got, by key (``{None: None}`` when it got a 2-D mask)."""
        given = kwargs.get("attention_mask")
        if isinstance(given, dict):
            return dict(given)
        if isinstance(given, torch.Tensor) and given.dim() == 4:
            return {None: given}
        return {None: None}

    @staticmethod
    def _segments(spans: list[list[VisualSpan]], batch: int, length: int) -> torch.Tensor:
        """The image each visual column belongs to, -1 for text: ``[B, L]`` long (CPU)."""
        segment = torch.full((batch, length), -1, dtype=torch.long)
        for row, sample_spans in enumerate(spans):
            for span in sample_spans:
                segment[row, span.positions.long()] = span.image
                segment[row, span.extra_positions.long()] = span.image
        return segment

    def _choose(self, embeds: torch.Tensor, mask: torch.Tensor, spans: list[list[VisualSpan]]) -> Selection:
        """Token selection: each row's visual tokens, labelled when needed, and what the plan does to them."""
        batch = embeds.shape[0]
        adapter = self.adapter
        tokens = [
            SampleTokens.from_spans(sample_spans, [n for span in sample_spans for n in adapter.vision_passes(span)])
            for sample_spans in spans
        ]
        if self.targets is not None:
            if len(self.targets) < batch:
                raise InputError(f"{len(self.targets)} target lists given for a batch of {batch}")
            for sample, cells in zip(tokens, self.targets, strict=False):
                sample.targets = cells
        if self.plan.needs_groups:
            assert self.rule is not None
            label_tokens(self.context, embeds, tokens, self.rule)
        ids = self.sample_ids or list(range(batch))
        if len(ids) < batch:
            raise InputError(f"{len(ids)} sample ids given for a batch of {batch}")
        return select_tokens(self.plan, tokens, ids, mask.cpu())

    def _prefill(self, kwargs: dict) -> None:
        embeds, mask, original, spans = self._prefill_inputs(kwargs)
        selection = self._choose(embeds, mask, spans)
        visual, pruned = selection.visual.to(embeds.device), selection.pruned.to(embeds.device)
        scaled = embeds
        if self.plan.scale != 1.0 and bool(visual.any()):
            scaled = torch.where(visual[..., None], embeds * self.plan.scale, embeds)
        # which image each column belongs to matters only to renumbering planes of positions
        planes = original.shape[0] > 1 and self.plan.positions == "reindex"
        segment = self._segments(spans, *mask.shape) if planes else None
        state = build_layout(self.plan, mask, pruned, visual, original, scaled, segment)
        handed = self._handed_masks(kwargs)
        base = state.phases[0]
        if len(state.phases) > 1 or state.changed:
            implementation = self._phase_attention() if len(state.phases) > 1 else self.adapter.attention_implementation
            prepare_phase_masks(state, implementation, embeds.dtype, handed)
            self._take_additions(state, kwargs)
        if state.changed:
            kwargs["inputs_embeds"] = gather_rows(scaled, base.columns)
            kwargs["position_ids"] = from_planes(base.position_ids, self.planar)
            if base.masks:
                kwargs["attention_mask"] = base.masks if self.mask_dict else base.masks[None]
            else:
                kwargs["attention_mask"] = base.valid.long()
        elif scaled is not embeds:
            kwargs["inputs_embeds"] = scaled
        skip_rows_in_slots(state, selection.skipped)
        _finish_records(selection.records, state)
        self.state = state
        output_positions = state.phases[-1].columns.cpu()
        self.run.records.append(PrefillRecord(samples=selection.records, output_positions=output_positions))

    def _phase_attention(self) -> str:
        implementation = self.adapter.attention_implementation
        if implementation not in ("sdpa", "eager"):
            raise InputError(
                f"inject and exit need sdpa or eager attention; this model uses {implementation!r} "
                "(load it with attn_implementation='sdpa')"
            )
        return implementation

    # ------------------------------------------------------------------ decode
    def _check_window(self, state: Layout, steps: int) -> None:
        """Inject and Exit give later layers masks of their own, sized to full caches; a sliding-window
        cache that has dropped its oldest tokens would no longer match them, so refuse to go past it."""
        window = _sliding_window(self.adapter)
        if window is not None and len(state.phases) > 1 and state.length + state.decoded + steps > window:
            raise InputError(
                f"inject and exit decode at most {window} tokens (prompt and answer) on this model, whose "
                f"sliding-window layers keep only the last {window}; this one reached "
                f"{state.length + state.decoded + steps}"
            )

    def _decode(self, kwargs: dict) -> None:
        state = self.state
        assert state is not None
        state.in_prefill = False
        embeds = kwargs.get("inputs_embeds")
        self._check_window(state, embeds.shape[1])
        if state.tail is None:
            # the language model was called without the whole model around it
            given = kwargs.get("attention_mask")
            decode_tail(state, given, embeds.shape[0], embeds.shape[1], embeds.device)
            if state.changed:
                kwargs["attention_mask"] = compact_mask(state)
        positions = decode_step(
            state,
            kwargs.get("position_ids"),
            steps=embeds.shape[1],
            implementation=self.adapter.attention_implementation,
            dtype=embeds.dtype,
            device=embeds.device,
        )
        state.tail = None
        if positions is not None:
            kwargs["position_ids"] = from_planes(positions, self.planar)


def _sliding_window(adapter: ModelAdapter) -> int | None:
    """The window of the language model's sliding-window layers whose caches keep only that window, or None."""
    config = getattr(adapter.language_model, "config", None)
    if "sliding_attention" not in (getattr(config, "layer_types", None) or ()):
        return None
    window = getattr(config, "sliding_window", None)
    return int(window) if window else None


def _finish_records(records: list[SampleRecord], state: Layout) -> None:
    """Fill each sample's tokens per layer and skip counts from the layout."""
    for row, record in enumerate(records):
        record.tokens_per_layer = [int(state.phases[index].valid[row].sum()) for index in state.phase_of_layer]
        for (layer, part), rows in sorted(state.skip_rows.items()):
            name = f"{layer}{'.5' if part == 'mlp' else ''}"
            record.skipped[name] = int(rows[row].sum())
            if part == "attn":
                visible = state.phases[state.phase_of_layer[layer]].valid[row].long().cumsum(0)
                record.skipped_visible[name] = (int(rows[row].sum()), int(visible[rows[row]].sum()))
