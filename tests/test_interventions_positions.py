"""``positions=reindex`` on a model whose RoPE base is small, so that every position shows in the logits.

Renumbering is only trustworthy if the pruned model runs exactly as the hand-built short sequence: the
kept tokens' layer-0 vectors at positions 0..n-1 (per sample, whatever the left padding), and decoding
continuing at n, n+1, ... with the cache. Prefill and decode must agree: a prefill numbered one way and
decode steps numbered another would give each new token the wrong distance to the image.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import embedlens
from embedlens.interventions import Prune, intervene
from embedlens.models.tiny import TinySpec, save_tiny_llava
from helpers import random_image
from intervention_helpers import layer0_inputs, new_tokens

#: A RoPE base this small turns the rotation by a whole radian-scale angle per position in every band.
ROPE_THETA = 10.0
STEPS = 5
PRUNED = (0, 3, 5, 10)
PROMPTS = ["what is this", "is there a red thing in the picture"]
#: Image first, no BOS: pruning cell 0 removes the first token of the sequence.
RAW_PROMPTS = ["<image>\nwhat is this", "<image>\nis there a red thing in the picture"]


@pytest.fixture(scope="module")
def small_rope(tmp_path_factory: pytest.TempPathFactory) -> embedlens.Session:
    """The default tiny LLaVA with ``rope_theta = 10`` (saved, its config edited, loaded by path)."""
    path = save_tiny_llava(tmp_path_factory.mktemp("small-rope") / "model", TinySpec())
    config_file = Path(path) / "config.json"
    config = json.loads(config_file.read_text())
    config["text_config"]["rope_parameters"]["rope_theta"] = ROPE_THETA
    config_file.write_text(json.dumps(config))
    session = embedlens.load(str(path), device="cpu")
    assert session.model.config.text_config.rope_parameters["rope_theta"] == ROPE_THETA
    return session


def _prepare(session, seeds, prompts=None, raw=None):
    images = [random_image(seed) for seed in seeds]
    return session.prepare(images, prompts, raw_prompts=raw)


def _renumbered_by_hand(session, batch) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """One unpadded sample: the kept tokens' layer-0 vectors at positions 0..n-1, logits ``[n, V]``, then
    ``STEPS`` greedy tokens decoded with the cache at positions n, n+1, ..., and the logits each greedy
    token was chosen from, ``[STEPS, V]``."""
    length = batch.inputs["input_ids"].shape[1]
    removed = set(batch.spans[0][0].positions[list(PRUNED)].tolist())
    kept = torch.tensor([p for p in range(length) if p not in removed])
    n = kept.numel()
    with torch.no_grad():
        out = session.model(
            inputs_embeds=layer0_inputs(session, batch)[:, kept],
            position_ids=torch.arange(n)[None],
            attention_mask=torch.ones(1, n, dtype=torch.long),
            use_cache=True,
        )
        logits, cache = out.logits[0], out.cache
        tokens = [int(logits[-1].argmax())]
        chosen_from = [logits[-1]]
        for step in range(STEPS - 1):
            out = session.model(
                input_ids=torch.tensor([[tokens[-1]]]),
                position_ids=torch.tensor([[n + step]]),
                attention_mask=torch.ones(1, n + step + 1, dtype=torch.long),
                cache=cache,
                use_cache=True,
            )
            cache = out.cache
            tokens.append(int(out.logits[0, -1].argmax()))
            chosen_from.append(out.logits[0, -1])
    return logits, tokens, torch.stack(chosen_from)


def _greedy(session, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens ``[B, STEPS]`` and the logits each was chosen from, ``[B, STEPS, V]``."""
    with torch.no_grad():
        output = session.model.generate(
            **batch.inputs,
            max_new_tokens=STEPS,
            do_sample=False,
            num_beams=1,
            return_dict_in_generate=True,
            output_logits=True,
        )
    return new_tokens(output.sequences, batch), torch.stack(output.logits, dim=1)


@pytest.mark.parametrize("raw", [False, True], ids=["chat-template", "image-first"])
def test_reindex_equals_the_renumbered_sequence(small_rope, raw):
    """Batched and left-padded, each sample's prefill logits and greedy tokens equal its hand-built
    renumbered run; the image-first prompts lose their first token, so the renumbering must start at 0
    there as well."""
    seeds = [0, 1]
    texts = RAW_PROMPTS if raw else PROMPTS
    singles = [
        _renumbered_by_hand(small_rope, _prepare(small_rope, [s], None if raw else [t], [t] if raw else None))
        for s, t in zip(seeds, texts, strict=True)
    ]
    batch = _prepare(small_rope, seeds, None if raw else texts, texts if raw else None)
    with intervene(small_rope, [Prune(indices=PRUNED, positions="reindex")]) as run:
        with torch.no_grad():
            logits = small_rope.model(**batch.inputs).logits
        answers, step_logits = _greedy(small_rope, batch)
    layout = run.records[0].output_positions
    for row, (expected, tokens, expected_steps) in enumerate(singles):
        real = layout[row] >= 0
        torch.testing.assert_close(logits[row, real], expected, rtol=0, atol=1e-5)
        assert answers[row].tolist() == tokens
        torch.testing.assert_close(step_logits[row], expected_steps, rtol=0, atol=1e-5)


def test_positions_matter_on_this_model(small_rope):
    """The test above can fail: on this model keeping the original positions gives other logits."""
    batch = _prepare(small_rope, [0], raw=[RAW_PROMPTS[0]])
    outputs = {}
    for policy in ("keep", "reindex"):
        with intervene(small_rope, [Prune(indices=PRUNED, positions=policy)]), torch.no_grad():
            outputs[policy] = small_rope.model(**batch.inputs).logits
    assert not torch.allclose(outputs["keep"], outputs["reindex"], atol=1e-3)


def test_reindex_decode_continues_from_the_kept_count(small_rope):
    """The decoder layers see 0..n_kept-1 at prefill and n_kept, n_kept+1, ... when decoding, per row."""
    batch = _prepare(small_rope, [0, 1], raw=RAW_PROMPTS)
    seen: list[torch.Tensor] = []
    layer = small_rope.adapter.decoder_layers[0]
    handle = layer.register_forward_pre_hook(lambda m, a, k: seen.append(k["position_ids"].clone()), with_kwargs=True)
    try:
        with intervene(small_rope, [Prune(indices=PRUNED, positions="reindex")]) as run:
            _greedy(small_rope, batch)
    finally:
        handle.remove()
    valid = run.records[0].output_positions >= 0
    kept = valid.sum(dim=1)
    for row in range(2):
        assert seen[0][row, valid[row]].tolist() == list(range(int(kept[row])))
    for step, positions in enumerate(seen[1:]):
        assert positions.flatten().tolist() == (kept + step).tolist()
