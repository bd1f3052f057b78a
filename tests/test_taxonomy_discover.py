"""Anchor discovery on a tiny random LLaVA with planted behaviour (see ``taxonomy_planting``).

On random weights nothing is a sink or dead by itself, so the tests plant each kind (a high-norm vision
feature, a token copied onto the first position's hidden state, a massive activation, a token that the
decoder leaves unchanged) next to decoys (an id whose vectors change from image to image, one the
decoder changes, one that recurs in too few images), and check that discovery finds exactly the planted
anchors, with figures that match independent computations.
"""

from __future__ import annotations

import json
from itertools import combinations

import numpy as np
import pytest
import torch

from embedlens import InputError
from embedlens.taxonomy import (
    AnchorCandidate,
    Anchors,
    Discovery,
    DiscoveryConfig,
    SkippedImage,
    discover_anchors,
)
from embedlens.taxonomy.discover import _Tally
from taxonomy_planting import DISCOVERY_PATCHES, VIT_BOOST, DiscoveryPlant

N_IMAGES = 6
FIGURES = ["independence", "norm_ratio", "bos_cosine", "massive_ratio", "cross_layer_cosine"]


def images(make_image, count: int = N_IMAGES) -> list:
    return [make_image(seed) for seed in range(count)]


def by_id(result: Discovery) -> dict[int, AnchorCandidate]:
    return {candidate.id: candidate for candidate in result.candidates}


@pytest.fixture
def planted(fresh_tiny) -> DiscoveryPlant:
    return DiscoveryPlant(fresh_tiny)


@pytest.fixture
def found(fresh_tiny, planted, make_image) -> Discovery:
    return discover_anchors(fresh_tiny, images(make_image), batch_size=4, progress=False)


class TestPlanted:
    """Each planted kind must land in its group, and only the planted ids may become anchors."""

    def test_groups_equal_planted(self, found, planted, fresh_tiny):
        assert found.anchors.groups == planted.planted
        assert found.groups == planted.planted
        assert found.num_images == N_IMAGES and found.num_tokens == N_IMAGES * 16
        assert found.skipped == []
        assert found.anchors.top_k == 3
        assert found.anchors.model == fresh_tiny.adapter.source
        found.anchors.check_vocabulary(fresh_tiny.adapter.tokenizer)
        assert (found.sink_layer, found.cross_layer) == (2, 2)  # 4 decoder layers: middle = 2

    def test_reasons_and_decoys(self, found, planted):
        candidates = by_id(found)
        ids = planted.ids
        assert candidates[ids["vit_sink"]].group == "vit_sink"
        assert "vision-feature norm" in candidates[ids["vit_sink"]].reason
        assert "first position" in candidates[ids["llm_bos"]].reason
        assert "massive activation" in candidates[ids["llm_massive"]].reason
        assert "first position" not in candidates[ids["llm_massive"]].reason
        assert candidates[ids["dead"]].group == "dead"
        # recurring and image-independent, but changed by the decoder: not dead
        changing = candidates[ids["changing"]]
        assert changing.group is None and changing.independence == pytest.approx(1.0, abs=1e-6)
        assert changing.cross_layer_cosine < 0.9 and "changes across layers" in changing.reason
        # nearest in every image, but the vectors differ from image to image
        mixed = candidates[ids["image_dependent"]]
        assert mixed.group is None and mixed.image_fraction == 1.0 and mixed.nearest_share == 1.0
        assert mixed.independence < 0.9 and mixed.reason.startswith("image-dependent")

    def test_followers_are_dropped(self, found, planted):
        """With top-3, the 2nd and 3rd nearest ids of a planted row recur with it in every image."""
        anchors = {i for ids in planted.planted.values() for i in ids}
        followers = [c for c in found.candidates if c.reason.startswith("follows")]
        assert len(followers) == 2 * len(anchors)
        for candidate in followers:
            leader = int(candidate.reason.split()[1])
            assert leader in anchors and candidate.group is None
            assert candidate.nearest_share == 0.0 and candidate.tokens == by_id(found)[leader].tokens
        assert all(c.nearest_share > 0 for c in found.candidates if c.group is not None)

    def test_top1_finds_the_same_anchors(self, fresh_tiny, planted, make_image):
        result = discover_anchors(fresh_tiny, images(make_image), config=DiscoveryConfig(top_k=1), progress=False)
        assert result.anchors.groups == planted.planted and result.anchors.top_k == 1
        assert not any(c.reason.startswith("follows") for c in result.candidates)

    def test_only_recurring_ids_are_candidates(self, found):
        for candidate in found.candidates:
            assert candidate.images >= 2 and candidate.image_fraction >= 0.5
            assert candidate.image_fraction == candidate.images / N_IMAGES
            assert candidate.token_share == candidate.tokens / (N_IMAGES * 16)
        order = [(-c.tokens, -c.nearest_share, c.id) for c in found.candidates]
        assert order == sorted(order)

    def test_rare_id_is_not_a_candidate(self, found, planted, fresh_tiny, make_image):
        rare = planted.ids["rare"]  # its row in images 0 and 1 of 6
        assert rare not in by_id(found)
        planted.projector.seen = 0
        lower = discover_anchors(
            fresh_tiny, images(make_image), config=DiscoveryConfig(min_image_fraction=0.3), progress=False
        )
        candidate = by_id(lower)[rare]
        assert (candidate.images, candidate.tokens) == (2, 2)
        assert candidate.independence == pytest.approx(1.0, abs=1e-6)

    def test_min_images(self, fresh_tiny, make_image):
        plant = DiscoveryPlant(fresh_tiny, rare_images={0})
        result = discover_anchors(
            fresh_tiny, images(make_image), config=DiscoveryConfig(min_image_fraction=0.1), progress=False
        )
        assert plant.ids["rare"] not in by_id(result)
        plant.projector.seen = 0
        one = discover_anchors(
            fresh_tiny, images(make_image), config=DiscoveryConfig(min_image_fraction=0.1, min_images=1), progress=False
        )
        assert by_id(one)[plant.ids["rare"]].images == 1
        assert np.isnan(by_id(one)[plant.ids["rare"]].independence)  # one image: nothing to compare
        assert by_id(one)[plant.ids["rare"]].reason.startswith("image-dependent")

    def test_padded_batches_and_batch_size(self, fresh_tiny, planted, make_image):
        """Prompts of different lengths left-pad the batch: the first position must be the first real token."""
        prompts = ["Describe", "What colour is the big shape in this picture ?", "How many"] * 2
        one = discover_anchors(fresh_tiny, images(make_image), prompts, batch_size=1, progress=False)
        planted.projector.seen = 0
        three = discover_anchors(fresh_tiny, images(make_image), prompts, batch_size=3, progress=False)
        assert one.anchors.groups == three.anchors.groups == planted.planted
        a, b = by_id(one), by_id(three)
        assert a.keys() == b.keys()
        for token_id in a:
            assert (a[token_id].images, a[token_id].tokens) == (b[token_id].images, b[token_id].tokens)
            for name in FIGURES:
                np.testing.assert_allclose(getattr(a[token_id], name), getattr(b[token_id], name), rtol=1e-4, atol=1e-5)

    def test_classify_with_discovered_anchors(self, fresh_tiny, found, make_image):
        result = fresh_tiny.classify(make_image(50), anchors=found.anchors)
        groups = result.classification.group
        assert groups[DISCOVERY_PATCHES["vit_sink"]] == "vit_sink"
        assert groups[DISCOVERY_PATCHES["llm_bos"]] == groups[DISCOVERY_PATCHES["llm_massive"]] == "llm_sink"
        assert groups[DISCOVERY_PATCHES["dead"]] == "dead"
        assert result.counts == {"vit_sink": 1, "llm_sink": 2, "dead": 1, "alive": 12}


class TestFigures:
    """The streamed figures must equal the same quantities computed directly from the model."""

    def test_against_direct_computation(self, fresh_tiny, planted, make_image):
        pictures = images(make_image)
        result = discover_anchors(fresh_tiny, pictures, progress=False)
        candidates = by_id(result)
        planted.projector.seen = 0
        batch = fresh_tiny.prepare(pictures)
        config = fresh_tiny.model.config
        with torch.inference_mode():
            vision = fresh_tiny.adapter.vision_tower(batch.inputs["pixel_values"], output_hidden_states=True)
            hidden = fresh_tiny.model(**batch.inputs, output_hidden_states=True).hidden_states
        features = vision.hidden_states[config.vision_feature_layer][:, 1:].double()  # [6, 16, 64], CLS dropped
        features[:, DISCOVERY_PATCHES["vit_sink"]] *= VIT_BOOST
        norms = features.norm(dim=-1)
        ratio = norms[:, DISCOVERY_PATCHES["vit_sink"]] / norms.median(dim=1).values
        assert candidates[planted.ids["vit_sink"]].norm_ratio == pytest.approx(float(ratio.mean()), rel=1e-5)

        def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            a, b = a.double(), b.double()
            return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))

        positions = torch.stack([spans[0].positions for spans in batch.spans])  # [6, 16]
        rows = torch.arange(N_IMAGES)

        def at(layer: int, part: str) -> torch.Tensor:
            return hidden[layer][rows, positions[:, DISCOVERY_PATCHES[part]]]  # [6, d]

        mixed = at(0, "image_dependent")
        pairs = [float(cos(mixed[i], mixed[j])) for i, j in combinations(range(N_IMAGES), 2)]
        assert candidates[planted.ids["image_dependent"]].independence == pytest.approx(np.mean(pairs), abs=1e-5)
        changing = candidates[planted.ids["changing"]]
        expected = cos(at(0, "changing"), at(2, "changing")).mean()
        assert changing.cross_layer_cosine == pytest.approx(float(expected), abs=1e-6)
        expected = cos(at(2, "changing"), hidden[2][:, 0]).mean()  # no padding: first position is 0
        assert changing.bos_cosine == pytest.approx(float(expected), abs=1e-6)
        peaks = hidden[2][rows.unsqueeze(1), positions].double().abs()  # [6, 16, d]
        peak = peaks.max(dim=-1).values / peaks.median(dim=-1).values
        relative = peak / peak.median(dim=1, keepdim=True).values
        expected = relative[:, DISCOVERY_PATCHES["llm_massive"]].mean()
        assert candidates[planted.ids["llm_massive"]].massive_ratio == pytest.approx(float(expected), rel=1e-5)
        assert candidates[planted.ids["llm_bos"]].bos_cosine == pytest.approx(1.0, abs=1e-6)

    def test_tally_against_brute_force(self):
        """Counts, co-occurrence and independence of the streaming tally, over two batches."""
        rng = np.random.default_rng(0)
        vocab, dim, k = 12, 5, 2
        tally = _Tally(vocab_rows=vocab, dim=dim)
        everything = []  # (image, ids, vector) per token, to recompute by brute force
        image_number = 0
        for tokens_per_image in ([3, 4], [2, 5, 1]):
            ids, image_of, vectors = [], [], []
            for local, count in enumerate(tokens_per_image):
                for _ in range(count):
                    row = rng.choice(vocab, size=k, replace=False)
                    vector = rng.normal(size=dim)
                    ids.append(row)
                    image_of.append(local)
                    vectors.append(vector)
                    everything.append((image_number + local, row, vector))
            image_number += len(tokens_per_image)
            figures = {name: np.arange(len(ids), dtype=np.float64) for name in FIGURES if name != "independence"}
            tally.add(
                len(tokens_per_image),
                torch.tensor(np.array(ids)),
                torch.tensor(image_of),
                torch.tensor(np.array(vectors)),
                figures,
            )
            tally._compact()  # merge the pair counts of each batch with the earlier ones
        assert tally.images == 5 and tally.tokens == len(everything)
        for token_id in range(vocab):
            hits = [(image, vector) for image, row, vector in everything if token_id in row]
            assert tally.tokens_hit[token_id] == len(hits)
            assert tally.nearest_hit[token_id] == sum(row[0] == token_id for _, row, _ in everything)
            per_image = {}
            for image, vector in hits:
                per_image.setdefault(image, []).append(vector)
            assert tally.images_hit[token_id] == len(per_image)
            means = [np.mean(vectors, axis=0) for vectors in per_image.values()]
            if len(means) < 2:
                assert np.isnan(tally.independence(token_id))
                continue
            pair_cosines = [a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in combinations(means, 2)]
            assert tally.independence(token_id) == pytest.approx(np.mean(pair_cosines), abs=1e-5)
        for a, b in combinations(range(vocab), 2):
            assert tally.shared_tokens(a, b) == sum(a in row and b in row for _, row, _ in everything)


class TestAnchorsFile:
    """The discovered anchors carry their evidence in the JSON and survive a round trip."""

    def test_evidence_in_json(self, found, planted, tmp_path):
        data = found.anchors.to_dict()
        text = json.dumps(data, allow_nan=False)  # JSON-ready: no NaN, no tuples needed
        evidence = json.loads(text)["evidence"]
        assert evidence["method"] == "embedlens.taxonomy.discover_anchors"
        assert (evidence["images"], evidence["skipped_images"], evidence["visual_tokens"]) == (6, 0, 96)
        assert (evidence["sink_layer"], evidence["cross_layer"]) == (2, 2)
        assert evidence["thresholds"] == DiscoveryConfig().to_dict()
        assert evidence["thresholds"]["min_image_fraction"] == 0.5 and evidence["thresholds"]["top_k"] == 3
        listed = {c["id"]: c for c in evidence["candidates"]}
        assert len(listed) == len(found.candidates)
        vit = listed[planted.ids["vit_sink"]]
        assert vit["group"] == "vit_sink" and vit["norm_ratio"] > 3 and vit["independence"] == pytest.approx(1.0)
        assert set(vit) == {*AnchorCandidate.__dataclass_fields__}
        assert listed[planted.ids["changing"]]["group"] is None

    def test_round_trip(self, found, tmp_path):
        assert Anchors.from_dict(found.anchors.to_dict()) == found.anchors
        path = found.anchors.save(tmp_path / "anchors.json")
        assert Anchors.load(path) == found.anchors
        assert Anchors.load(path).evidence["candidates"][0]["id"] == found.candidates[0].id

    def test_nan_becomes_null(self, fresh_tiny, make_image):
        plant = DiscoveryPlant(fresh_tiny, rare_images={0})
        config = DiscoveryConfig(min_image_fraction=0.1, min_images=1)
        result = discover_anchors(fresh_tiny, images(make_image), config=config, progress=False)
        listed = {c["id"]: c for c in result.anchors.to_dict()["evidence"]["candidates"]}
        assert listed[plant.ids["rare"]]["independence"] is None
        json.dumps(result.anchors.to_dict(), allow_nan=False)

    def test_to_pandas(self, found, planted):
        frame = found.to_pandas()
        assert frame.index.name == "id" and frame.index.tolist() == [c.id for c in found.candidates]
        assert frame.loc[planted.ids["dead"], "group"] == "dead"
        assert frame.loc[planted.ids["changing"], "group"] is None
        assert frame.loc[planted.ids["vit_sink"], "norm_ratio"] == by_id(found)[planted.ids["vit_sink"]].norm_ratio
        assert {"piece", "image_fraction", "token_share", *FIGURES, "reason"} <= set(frame.columns)
        assert frame.attrs == {"num_images": 6, "num_tokens": 96, "skipped": 0}


class TestInputs:
    def test_unreadable_images_are_skipped(self, fresh_tiny, planted, make_image, tmp_path):
        broken = tmp_path / "broken.png"
        broken.write_bytes(b"not a png")
        good = []
        for seed in range(N_IMAGES):
            path = tmp_path / f"{seed}.png"
            make_image(seed).save(path)
            good.append(path)
        sources = [good[0], tmp_path / "missing.png", *good[1:4], broken, tmp_path, *good[4:]]
        result = discover_anchors(fresh_tiny, sources, batch_size=4, progress=False)
        assert [(s.index, s.image) for s in result.skipped] == [
            (1, str(tmp_path / "missing.png")),
            (5, str(broken)),
            (6, str(tmp_path)),
        ]
        assert all(isinstance(s, SkippedImage) for s in result.skipped)
        assert "not found" in result.skipped[0].reason and "directory" in result.skipped[2].reason
        assert result.num_images == N_IMAGES
        assert result.anchors.groups == planted.planted
        assert result.anchors.evidence["skipped_images"] == 3

    def test_no_readable_images(self, fresh_tiny, tmp_path):
        with pytest.raises(InputError, match="no readable images"):
            discover_anchors(fresh_tiny, [tmp_path / "a.png", tmp_path], progress=False)
        with pytest.raises(InputError, match="no readable images"):
            discover_anchors(fresh_tiny, [], progress=False)

    def test_progress_bar(self, tiny, make_image, capsys):
        discover_anchors(tiny, images(make_image, 2), progress=True)
        assert "discovering anchors" in capsys.readouterr().err
        discover_anchors(tiny, images(make_image, 2), progress=False)
        assert "discovering anchors" not in capsys.readouterr().err

    def test_single_image_and_prompt(self, tiny, make_image):
        result = discover_anchors(tiny, make_image(0), "What is it ?", progress=False)
        assert result.num_images == 1 and result.candidates == []  # one image: nothing recurs in two

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"config": DiscoveryConfig(cross_layer=5)}, "cross_layer 5 is out of range"),
            ({"config": DiscoveryConfig(cross_layer=0)}, "cross_layer 0 is out of range"),
            ({"prompts": ["a", "b", "c"]}, "2 images but 3 prompts"),
            ({"batch_size": 0}, "batch size"),
        ],
    )
    def test_bad_arguments(self, tiny, make_image, kwargs, message):
        with pytest.raises(InputError, match=message):
            discover_anchors(tiny, images(make_image, 2), progress=False, **kwargs)

    @pytest.mark.parametrize(
        "bad",
        [
            {"top_k": 0},
            {"min_images": True},
            {"min_image_fraction": 0.0},
            {"follower_overlap": 1.5},
            {"vit_norm_ratio": float("nan")},
            {"sink_layer": -1},
            {"cross_layer": 1.5},
        ],
    )
    def test_bad_config(self, bad):
        with pytest.raises(InputError):
            DiscoveryConfig(**bad)

    def test_layers_resolved(self, tiny, make_image):
        assert DiscoveryConfig(sink_layer=99).layers(4) == (4, 2)
        assert DiscoveryConfig(cross_layer=-1).layers(4) == (2, 4)
        assert DiscoveryConfig().layers(1) == (1, 1)
        assert DiscoveryConfig().layers(32) == (2, 16)
        result = discover_anchors(
            tiny, images(make_image, 2), config=DiscoveryConfig(sink_layer=9, cross_layer=3), progress=False
        )
        assert (result.sink_layer, result.cross_layer) == (4, 3)
        assert (result.anchors.evidence["sink_layer"], result.anchors.evidence["cross_layer"]) == (4, 3)
