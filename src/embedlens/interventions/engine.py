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
    decode_step,
    gather_rows,
    phase_bounds,
    prepare_phase_masks,
    relayout,
    skip_rows_in_slots,
)
from embedlens.interventions.planning import Plan
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

    # ------------------------------------------------------------------ installing
    def install(self, stack: contextlib.ExitStack) -> None:
        """Register every hook; the stack removes them."""
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
    def _model_pre_hook(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not _is_prefill(kwargs):
            return
        input_ids = _first_arg(args, kwargs, "input_ids")
        if input_ids is None:
            raise InputError("interventions need input_ids to find the visual tokens (inputs_embeds alone were given)")
        self.spans = self.adapter.find_spans({**kwargs, "input_ids": input_ids})

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
                    args = (relayout(hidden, state.phases[index - 1], phase, state), *args[1:])
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
    def _prefill_inputs(self, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[VisualSpan]]]:
        """The decoder stack's inputs at prefill, checked: embeddings ``[B, L, d]``, the real-token mask
        ``[B, L]`` bool, the given positions ``[B, L]`` and each row's visual spans."""
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
        return embeds, mask, original, spans

    def _choose(self, embeds: torch.Tensor, mask: torch.Tensor, spans: list[list[VisualSpan]]) -> Selection:
        """Token selection: each row's visual tokens, labelled when needed, and what the plan does to them."""
        batch = embeds.shape[0]
        tokens = [SampleTokens.from_spans(sample_spans) for sample_spans in spans]
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
        state = build_layout(self.plan, mask, pruned, visual, original, scaled)
        base = state.phases[0]
        if state.changed:
            kwargs["inputs_embeds"] = gather_rows(scaled, base.columns)
            kwargs["attention_mask"] = base.valid.long()
            kwargs["position_ids"] = base.position_ids
        elif scaled is not embeds:
            kwargs["inputs_embeds"] = scaled
        if len(state.phases) > 1:
            implementation = self._phase_attention()
            prepare_phase_masks(state, implementation, embeds.dtype, self.adapter.position_embeddings)
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
    def _decode(self, kwargs: dict) -> None:
        state = self.state
        assert state is not None
        state.in_prefill = False
        embeds = kwargs.get("inputs_embeds")
        stack_mask, positions = decode_step(
            state,
            kwargs.get("attention_mask"),
            kwargs.get("position_ids"),
            batch=embeds.shape[0],
            steps=embeds.shape[1],
            implementation=self.adapter.attention_implementation,
            dtype=embeds.dtype,
            device=embeds.device,
        )
        if stack_mask is not None:
            kwargs["attention_mask"] = stack_mask
            kwargs["position_ids"] = positions


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
