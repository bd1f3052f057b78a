"""Sink / dead / alive: anchors tied to a vocabulary, the paper's top-k rule, and Session.classify."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from transformers import AutoTokenizer

import embedlens
from embedlens import InputError
from embedlens.lens import vocabulary_hash as lens_vocabulary_hash
from embedlens.models.tiny import build_tiny_tokenizer
from embedlens.taxonomy import (
    GROUPS,
    LLAVA15_7B_ANCHORS,
    Anchors,
    ClassifiedResult,
    builtin_anchors,
    classify_ids,
    vocabulary_hash,
)
from taxonomy_planting import OVERLAP_PATCH, PLANTED, expected_groups, plant, top_ids

LLAMA_DIR = Path(__file__).parent / "fixtures" / "llama-spm"
HASH = "ab" * 32


def anchors(vit=(10,), llm=(20,), dead=(30,), top_k=3) -> Anchors:
    return Anchors(groups={"vit_sink": vit, "llm_sink": llm, "dead": dead}, vocab_hash=HASH, model="m", top_k=top_k)


# --------------------------------------------------------------------------- the rule on ids
class TestRule:
    """The rule itself, on hand-written id lists: any of the top-k ids, explicit precedence, overlaps
    kept and counted (the reference code silently picks one group)."""

    IDS = np.array(
        [
            [10, 1, 2],  # vit_sink at rank 0
            [1, 20, 2],  # llm_sink at rank 1
            [1, 2, 30],  # dead at rank 2
            [1, 2, 3],  # alive
            [20, 10, 30],  # all three: vit_sink wins
            [30, 20, 4],  # llm_sink + dead: llm_sink wins
            [5, 6, 7],  # alive, with an anchor at rank 3 below
        ]
    )

    def test_groups_counts_and_matched_anchor(self):
        ids = np.concatenate([self.IDS, np.array([[9], [9], [9], [9], [9], [9], [30]])], axis=1)
        result = classify_ids(ids, anchors())
        assert result.group.tolist() == ["vit_sink", "llm_sink", "dead", "alive", "vit_sink", "llm_sink", "alive"]
        assert result.counts == {"vit_sink": 2, "llm_sink": 2, "dead": 1, "alive": 2}
        assert sum(result.counts.values()) == len(result) == 7
        assert result.anchor_id == [10, 20, 30, None, 10, 20, None]
        assert result.anchor_rank == [0, 1, 2, None, 1, 1, None]
        assert result.top_k == 3

    def test_overlaps_are_kept(self):
        result = classify_ids(self.IDS, anchors())
        assert result.matches == {"vit_sink": 2, "llm_sink": 3, "dead": 3}
        assert result.overlaps == {"vit_sink+llm_sink": 1, "vit_sink+dead": 1, "llm_sink+dead": 2}
        assert result.n_overlapping == 2
        assert result.member("dead").tolist() == [False, False, True, False, True, True, False]
        assert result.members.shape == (7, 3)

    def test_custom_precedence(self):
        result = classify_ids(self.IDS, anchors(), precedence=["dead", "llm_sink", "vit_sink"])
        assert result.group[[4, 5]].tolist() == ["dead", "dead"]
        assert result.anchor_id[4] == 30 and result.anchor_rank[4] == 2
        assert result.overlaps == classify_ids(self.IDS, anchors()).overlaps  # memberships do not depend on it
        with pytest.raises(InputError, match="precedence"):
            classify_ids(self.IDS, anchors(), precedence=["dead", "vit_sink"])

    def test_top_k(self):
        ids = np.array([[1, 2, 3, 30], [10, 2, 3, 4]])
        assert classify_ids(ids, anchors()).group.tolist() == ["alive", "vit_sink"]
        assert classify_ids(ids, anchors(), top_k=4).group.tolist() == ["dead", "vit_sink"]
        assert classify_ids(ids, anchors(top_k=4)).group.tolist() == ["dead", "vit_sink"]
        assert classify_ids(ids, anchors(), top_k=1).group.tolist() == ["alive", "vit_sink"]
        with pytest.raises(InputError, match="top-5"):
            classify_ids(ids, anchors(), top_k=5)
        with pytest.raises(InputError, match="positive"):
            classify_ids(ids, anchors(), top_k=0)

    def test_several_ids_per_group_and_empty_groups(self):
        result = classify_ids(np.array([[7, 8, 9], [1, 2, 3]]), anchors(vit=(), llm=(), dead=(9, 8)))
        assert result.group.tolist() == ["dead", "alive"]
        assert result.anchor_id == [8, None]  # the best-ranked of the group's anchors

    def test_empty_input(self):
        result = classify_ids(np.zeros((0, 3), dtype=np.int64), anchors())
        assert len(result) == 0 and result.group.shape == (0,) and result.members.shape == (0, 3)
        assert result.counts == {"vit_sink": 0, "llm_sink": 0, "dead": 0, "alive": 0}
        assert result.matches == {"vit_sink": 0, "llm_sink": 0, "dead": 0}
        assert set(result.overlaps.values()) == {0} and result.n_overlapping == 0
        assert result.anchor_id == [] and result.anchor_rank == []


# --------------------------------------------------------------------------- anchors
class TestAnchors:
    """Anchors are only meaningful with the vocabulary they were made for: they carry its hash, travel
    as JSON, and refuse other vocabularies with one clear line."""

    def test_json_round_trip(self, tmp_path):
        original = Anchors(
            groups={"vit_sink": (1, 2), "dead": (7,)},
            vocab_hash=HASH,
            model="some/model",
            top_k=5,
            base_vocab_size=100,
            evidence={"vit_sink": {"norm_ratio": 12.5}, "images": 40},
        )
        path = original.save(tmp_path / "sub" / "anchors.json")
        loaded = Anchors.load(path)
        assert loaded == original
        assert loaded.groups == {"vit_sink": (1, 2), "llm_sink": (), "dead": (7,)}
        data = json.loads(path.read_text(encoding="utf-8"))
        assert data["format"] == "embedlens-anchors" and data["version"] == 1
        assert data["groups"] == {"vit_sink": [1, 2], "llm_sink": [], "dead": [7]}
        assert Anchors.from_dict(original.to_dict()) == original
        assert [p.name for p in path.parent.iterdir()] == ["anchors.json"]  # no temporary files left

    @pytest.mark.parametrize(
        ("change", "message"),
        [
            ({"groups": {"sink": [1]}}, "unknown anchor group"),
            ({"groups": {"dead": [-1]}}, "non-negative"),
            ({"groups": {"dead": ["5"]}}, "non-negative"),
            ({"groups": {"dead": [5], "vit_sink": [5]}}, "in both"),
            ({"groups": {"dead": 5}}, "lists of ids"),
            ({"vocab_hash": "abc"}, "64 lowercase hex"),
            ({"top_k": 0}, "positive"),
            ({"base_vocab_size": 3}, "outside the base vocabulary"),
            ({"format": "other"}, "not an anchors file"),
            ({"version": 9}, "version"),
        ],
    )
    def test_malformed(self, change, message):
        data = anchors().to_dict() | change
        with pytest.raises(InputError, match=message):
            Anchors.from_dict(data)

    def test_load_errors_name_the_file(self, tmp_path):
        with pytest.raises(InputError, match="not found"):
            Anchors.load(tmp_path / "missing.json")
        bad = tmp_path / "bad.json"
        bad.write_text('{"groups": ', encoding="utf-8")
        with pytest.raises(InputError, match=r"bad.json is not valid JSON \(line 1"):
            Anchors.load(bad)
        incomplete = tmp_path / "incomplete.json"
        incomplete.write_text('{"groups": {}}', encoding="utf-8")
        with pytest.raises(InputError, match=r"incomplete.json: anchors lack vocab_hash, model"):
            Anchors.load(incomplete)

    def test_restricted_hash(self):
        tokenizer = build_tiny_tokenizer()
        assert vocabulary_hash(tokenizer) == lens_vocabulary_hash(tokenizer)
        assert vocabulary_hash(tokenizer, 999) != vocabulary_hash(tokenizer)  # drops <image>
        grown = build_tiny_tokenizer()
        grown.add_tokens(["extra"])
        assert vocabulary_hash(grown, 1000) == vocabulary_hash(tokenizer)

    def test_vocabulary_check(self):
        tokenizer = build_tiny_tokenizer()
        ok = Anchors.for_tokenizer({"dead": [500]}, tokenizer, model="tiny")
        ok.check_vocabulary(tokenizer, table_rows=1000)
        grown = build_tiny_tokenizer()
        ok.check_vocabulary(grown)  # cached hash for this tokenizer ...
        grown.add_tokens(["brandnewpiece"])
        with pytest.raises(InputError, match="anchors were made for vocabulary"):
            ok.check_vocabulary(grown)  # ... recomputed once it has grown
        with pytest.raises(InputError) as err:
            ok.check_vocabulary(build_tiny_tokenizer(1001))
        assert str(err.value).startswith(f"anchors were made for vocabulary {ok.vocab_hash[:8]} (model tiny) but")
        assert "\n" not in str(err.value)
        with pytest.raises(InputError, match="outside this model's embedding table of 400 rows"):
            ok.check_vocabulary(tokenizer, table_rows=400)


@pytest.fixture(scope="module")
def llava_tokenizer():
    """LLaMA-2's 32000 pieces with llava-hf's additions: ``<image>`` = 32000, ``<pad>`` = 32001."""
    tokenizer = AutoTokenizer.from_pretrained(str(LLAMA_DIR), gguf_file="ggml-vocab-llama-spm.gguf")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


class TestBuiltinAnchors:
    """The paper's LLaVA-1.5-7B ids must be accepted by the real llava-hf vocabulary (LLaMA-2 plus two
    added tokens) and refused by any other."""

    def test_pieces_and_hash(self, llava_tokenizer):
        assert llava_tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001]
        assert llava_tokenizer.convert_ids_to_tokens([1141, 26673, 30296]) == ["igh", "▁jav", "्"]
        assert vocabulary_hash(llava_tokenizer, 32000) == LLAVA15_7B_ANCHORS.vocab_hash
        assert LLAVA15_7B_ANCHORS.groups == {"vit_sink": (1141,), "llm_sink": (26673,), "dead": (30296,)}
        assert LLAVA15_7B_ANCHORS.top_k == 3 and LLAVA15_7B_ANCHORS.base_vocab_size == 32000

    def test_check_passes_on_llava_vocabulary(self, llava_tokenizer):
        LLAVA15_7B_ANCHORS.check_vocabulary(llava_tokenizer, table_rows=32064)  # llava-hf pads to 32064 rows
        with pytest.raises(InputError, match="outside this model's embedding table"):
            LLAVA15_7B_ANCHORS.check_vocabulary(llava_tokenizer, table_rows=30000)

    def test_check_fails_on_another_vocabulary(self):
        with pytest.raises(InputError, match=r"anchors were made for vocabulary fe56f82c \(model llava-hf"):
            LLAVA15_7B_ANCHORS.check_vocabulary(build_tiny_tokenizer())

    @pytest.mark.parametrize(
        "name", ["llava-hf/llava-1.5-7b-hf", "liuhaotian/llava-v1.5-7b", "/models/LLaVA-1.5-7B-hf", "llava-1.5-7b"]
    )
    def test_known_names(self, name):
        assert builtin_anchors(name) is LLAVA15_7B_ANCHORS

    @pytest.mark.parametrize("name", ["tiny-llava", "my-embedlens-mini", "llava-hf/llava-1.5-13b-hf", ""])
    def test_unknown_names(self, name):
        assert builtin_anchors(name) is None

    @pytest.mark.parametrize("name", ["embedlens-mini", "/root/.cache/embedlens/embedlens-mini-v1"])
    def test_mini_has_its_discovered_anchors(self, name):
        anchors = builtin_anchors(name)
        assert anchors is not None and anchors.model == "embedlens-mini"
        assert anchors.groups["llm_sink"] == (17269,)

    def test_from_config(self):
        class Config:
            _name_or_path = "llava-hf/llava-1.5-7b-hf"

        assert builtin_anchors(Config()) is LLAVA15_7B_ANCHORS


# --------------------------------------------------------------------------- on a planted model
@pytest.fixture
def planted(fresh_tiny):
    planted_anchors, rows = plant(fresh_tiny)
    table = fresh_tiny.adapter.input_embeddings.weight
    nearest = top_ids(rows, table, 3)
    # preconditions of the construction, checked with an independent brute force
    a, b, c = (planted_anchors.groups[name][0] for name in GROUPS)
    for name, patch in PLANTED.items():
        assert nearest[patch, 0] == planted_anchors.groups[name][0]
    assert {a, b} <= set(nearest[OVERLAP_PATCH].tolist()) and c not in nearest[OVERLAP_PATCH]
    others = [i for i in range(16) if i not in (*PLANTED.values(), OVERLAP_PATCH)]
    assert not set(nearest[others].flatten().tolist()) & {a, b, c}
    return fresh_tiny, planted_anchors, rows


class TestClassifyPlanted:
    """When we decide which patches are sinks and dead tokens, classification must recover exactly that,
    through the real model path (processor, spans, layer-0 capture, exact lens)."""

    def test_recovers_planted_groups(self, planted, make_image):
        session, planted_anchors, _ = planted
        result = session.classify(make_image(1), anchors=planted_anchors)
        assert isinstance(result, ClassifiedResult)
        assert result.group.tolist() == expected_groups()
        assert result.counts == {"vit_sink": 2, "llm_sink": 1, "dead": 1, "alive": 12}
        assert result.overlaps == {"vit_sink+llm_sink": 1, "vit_sink+dead": 0, "llm_sink+dead": 0}
        assert result.classification.n_overlapping == 1
        assert result.probe.top_ids.shape == (16, 3)
        vit, llm = planted_anchors.groups["vit_sink"][0], planted_anchors.groups["llm_sink"][0]
        assert result.classification.anchor_id[OVERLAP_PATCH] == vit
        assert result.classification.member("llm_sink")[OVERLAP_PATCH]
        assert result.classification.anchor_id[PLANTED["llm_sink"]] == llm

    def test_image_independent(self, planted, make_image):
        session, planted_anchors, _ = planted
        first = session.classify(make_image(2), anchors=planted_anchors)
        second = session.classify(make_image(3, 80, 60), "What colour ?", anchors=planted_anchors)
        assert first.group.tolist() == second.group.tolist() == expected_groups()

    def test_top_k_override(self, planted, make_image):
        """An anchor at rank 4 (0-based 3) counts with top_k >= 4 only."""
        session, _, _ = planted
        image = make_image(4)
        probe = session.probe(image, top_k=4)
        patch = 1
        fourth = int(probe.top_ids[patch, 3])
        custom = Anchors.for_tokenizer({"dead": [fourth]}, session.adapter.tokenizer, model="planted-tiny")
        assert session.classify(image, anchors=custom).group[patch] == "alive"
        wider = session.classify(image, anchors=custom, top_k=4)
        assert wider.group[patch] == "dead"
        assert wider.classification.anchor_rank[patch] == 3
        assert wider.probe.top_ids.shape == (16, 4)

    def test_precedence_through_session(self, planted, make_image):
        session, planted_anchors, _ = planted
        result = session.classify(make_image(1), anchors=planted_anchors, precedence=["llm_sink", "vit_sink", "dead"])
        assert result.group[OVERLAP_PATCH] == "llm_sink"
        assert result.counts["vit_sink"] == 1

    def test_result_tables_and_files(self, planted, make_image, tmp_path):
        session, planted_anchors, _ = planted
        result = session.classify(make_image(1), anchors=planted_anchors)
        frame = result.to_pandas()
        assert frame["group"].tolist() == expected_groups()
        assert frame["anchor_id"].isna().sum() == 12
        assert frame["is_llm_sink"].sum() == 2 and frame["is_vit_sink"].sum() == 2
        data = result.to_dict()
        assert [t["group"] for t in data["tokens"]] == expected_groups()
        assert data["counts"] == result.counts and sum(data["counts"].values()) == 16
        assert data["rule"]["top_k"] == 3 and data["anchors"] == planted_anchors.to_dict()
        paths = result.save(tmp_path / "out")
        parquet = pd.read_parquet(paths["parquet"])
        assert parquet["group"].tolist() == expected_groups()
        loaded = ClassifiedResult.load(tmp_path / "out")
        assert loaded.group.tolist() == expected_groups()
        assert loaded.anchors == planted_anchors
        np.testing.assert_array_equal(loaded.probe.top_ids, result.probe.top_ids)
        result.probe.save(tmp_path / "plain")
        with pytest.raises(InputError, match="not a classification result"):
            ClassifiedResult.load(tmp_path / "plain")

    def test_anchors_file_path(self, planted, make_image, tmp_path):
        session, planted_anchors, _ = planted
        path = planted_anchors.save(tmp_path / "anchors.json")
        assert session.classify(make_image(1), anchors=str(path)).group.tolist() == expected_groups()


class TestClassifyErrors:
    """Using anchors with the wrong model must fail with one clear line, before any result is made."""

    def test_no_builtin_anchors(self, tiny, image_path, tiny_dir):
        message = (
            f"no built-in anchors for model {tiny_dir} (built in: LLaVA-1.5-7B and embedlens-mini only); find its "
            f"anchors with `embedlens discover-anchors --model {tiny_dir} IMAGES --out anchors.json`"
        )
        with pytest.raises(InputError, match=re.escape(message)):
            tiny.classify(image_path)

    def test_anchors_for_another_vocabulary(self, tiny, image_path):
        with pytest.raises(InputError, match="anchors were made for vocabulary fe56f82c"):
            tiny.classify(image_path, anchors=LLAVA15_7B_ANCHORS)

    def test_anchor_outside_table(self, tiny, image_path):
        # same vocabulary hash, id beyond the 1000-row table
        bad = Anchors(groups={"dead": (5000,)}, vocab_hash=tiny.vocab_hash, model="tiny")
        with pytest.raises(InputError, match="anchor id 5000"):
            tiny.classify(image_path, anchors=bad)

    def test_bad_top_k(self, tiny, image_path):
        good = Anchors.for_tokenizer({"dead": [500]}, tiny.adapter.tokenizer, model="tiny")
        with pytest.raises(InputError, match="positive"):
            tiny.classify(image_path, anchors=good, top_k=0)

    def test_public_names(self):
        assert embedlens.Anchors is Anchors
        assert embedlens.ClassifiedResult is ClassifiedResult
