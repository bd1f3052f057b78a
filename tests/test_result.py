"""ProbeResult: tables, files, provenance and atomic saving."""

from __future__ import annotations

import json
import os
import re
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import embedlens
from embedlens import ProbeResult
from embedlens.lens import vocabulary_hash
from embedlens.result import config_hash

COLUMNS = ["index", "row", "col", "position", "norm", "top_ids", "top_tokens", "top_sims"]
PROVENANCE_KEYS = {
    "model",
    "revision",
    "config_hash",
    "vocab_hash",
    "layer",
    "lens",
    "k",
    "exclude",
    "dtype",
    "embedlens_version",
    "transformers_version",
    "torch_version",
    "python_version",
    "created",
    "profile",
    "vocab_limit",
    "rows_left_out",
}
HEX64 = re.compile(r"^[0-9a-f]{64}$")


@pytest.fixture(scope="module")
def result(tiny, image_path) -> ProbeResult:
    return tiny.probe(image_path, "Describe", layer=2, top_k=4, lens="logit", exclude=("special",))


def assert_same_result(a: ProbeResult, b: ProbeResult) -> None:
    for name in ("index", "row", "col", "position", "norm", "top_ids", "top_sims"):
        left, right = getattr(a, name), getattr(b, name)
        np.testing.assert_array_equal(left, right, err_msg=name)
        assert left.dtype == right.dtype, name
    assert a.top_tokens == b.top_tokens
    assert (a.image, a.prompt, a.text, a.grid) == (b.image, b.prompt, b.text, b.grid)
    assert a.provenance == b.provenance


class TestPandas:
    """The table is what users analyse: one row per visual token, fixed column names and order."""

    def test_columns_and_rows(self, result):
        frame = result.to_pandas()
        assert list(frame.columns) == COLUMNS
        assert len(frame) == len(result) == 16
        assert frame["index"].tolist() == list(range(16))
        assert frame["row"].tolist() == [i // 4 for i in range(16)]
        assert frame["col"].tolist() == [i % 4 for i in range(16)]
        assert all(len(ids) == 4 for ids in frame["top_ids"])
        assert frame["top_tokens"][0] == result.top_tokens[0]
        np.testing.assert_array_equal(np.stack(frame["top_sims"].to_numpy()), result.top_sims)


class TestSaveLoad:
    """Saved results are the record of an experiment: they must load back exactly."""

    def test_writes_both_files(self, result, tmp_path):
        paths = result.save(tmp_path / "out")
        assert paths == {"parquet": tmp_path / "out" / "tokens.parquet", "json": tmp_path / "out" / "result.json"}
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["result.json", "tokens.parquet"]

    def test_load_round_trips(self, result, tmp_path):
        result.save(tmp_path)
        loaded = ProbeResult.load(tmp_path)
        assert_same_result(loaded, result)
        assert loaded.layer == 2
        assert loaded.lens == "logit"
        assert loaded.provenance.exclude == ("special",)

    def test_parquet_content(self, result, tmp_path):
        result.save(tmp_path)
        frame = pd.read_parquet(tmp_path / "tokens.parquet")
        assert list(frame.columns) == COLUMNS
        np.testing.assert_array_equal(frame["position"].to_numpy(), result.position)
        np.testing.assert_array_equal(np.stack(frame["top_ids"].to_numpy()), result.top_ids)
        assert [list(t) for t in frame["top_tokens"]] == result.top_tokens
        np.testing.assert_array_equal(np.stack(frame["top_sims"].to_numpy()), result.top_sims)

    def test_unicode_tokens_survive(self, result, tmp_path):
        tokens = [list(row) for row in result.top_tokens]
        tokens[0][0] = "▁jav्"
        unusual = replace(result, top_tokens=tokens)
        unusual.save(tmp_path)
        assert ProbeResult.load(tmp_path).top_tokens[0][0] == "▁jav्"
        assert "▁jav्" in (tmp_path / "result.json").read_text(encoding="utf-8")

    def test_overwrite(self, tiny, result, tmp_path, image_path):
        result.save(tmp_path)
        other = tiny.probe(image_path, layer=0, top_k=2)
        other.save(tmp_path)
        assert_same_result(ProbeResult.load(tmp_path), other)


class TestProvenance:
    """Without provenance a saved result cannot be trusted or reproduced."""

    def test_fields_in_json(self, result, tiny, tiny_dir, tmp_path):
        result.save(tmp_path)
        data = json.loads((tmp_path / "result.json").read_text(encoding="utf-8"))
        assert {"model", "image", "layer", "lens", "grid", "tokens", "prompt", "text", "provenance"} <= set(data)
        prov = data["provenance"]
        assert set(prov) == PROVENANCE_KEYS
        assert prov["model"] == str(tiny_dir)
        assert prov["config_hash"] == tiny.config_hash == config_hash(tiny.model.config)
        assert prov["vocab_hash"] == tiny.vocab_hash == vocabulary_hash(tiny.adapter.tokenizer)
        assert HEX64.match(prov["config_hash"]) and HEX64.match(prov["vocab_hash"])
        assert prov["layer"] == 2
        assert prov["lens"] == "logit"
        assert prov["k"] == 4
        assert prov["exclude"] == ["special"]
        assert prov["dtype"] == "float32"
        assert prov["embedlens_version"] == embedlens.__version__
        assert prov["transformers_version"]
        assert prov["torch_version"]
        assert {f.name for f in fields(embedlens.Provenance)} == PROVENANCE_KEYS

    def test_config_hash_ignores_location_but_not_content(self, tiny, tiny_dir, tmp_path_factory):
        from embedlens.models.tiny import TinySpec, save_tiny_llava

        copy = save_tiny_llava(tmp_path_factory.mktemp("copy") / "elsewhere", TinySpec())
        assert embedlens.load(str(copy), device="cpu").config_hash == tiny.config_hash
        other = save_tiny_llava(tmp_path_factory.mktemp("other") / "m", TinySpec(text_layers=2))
        assert embedlens.load(str(other), device="cpu").config_hash != tiny.config_hash

    def test_json_without_provenance(self, result):
        data = json.loads(result.to_json(provenance=False))
        assert set(data) == {"model", "image", "layer", "lens", "grid", "tokens"}


class TestAtomicSave:
    """A crash while saving must never leave a half-written file or temporary litter where a previous,
    good result was: readers see the old content or the new, nothing in between."""

    def test_failed_parquet_write_keeps_previous_files(self, result, tmp_path, monkeypatch):
        result.save(tmp_path)
        before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

        def explode(self, path, *args, **kwargs):
            Path(path).write_bytes(b"PAR1 half written")  # simulate a partial write first
            raise OSError("disk full")

        monkeypatch.setattr(pd.DataFrame, "to_parquet", explode)
        with pytest.raises(OSError, match="disk full"):
            result.save(tmp_path)
        after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
        assert after == before  # same names (no temp files left) and same bytes
        monkeypatch.undo()
        assert_same_result(ProbeResult.load(tmp_path), result)
        pd.read_parquet(tmp_path / "tokens.parquet")

    def test_failed_first_save_leaves_nothing(self, result, tmp_path, monkeypatch):
        def explode(self, path, *args, **kwargs):
            raise OSError("disk full")

        monkeypatch.setattr(pd.DataFrame, "to_parquet", explode)
        with pytest.raises(OSError):
            result.save(tmp_path / "new")
        assert list((tmp_path / "new").iterdir()) == []

    def test_saved_files_have_normal_permissions(self, result, tmp_path):
        """Results are shared files: they should get the permissions of any new file (umask), not the
        owner-only 0600 of a temporary file."""
        result.save(tmp_path)
        umask = os.umask(0)
        os.umask(umask)
        for path in tmp_path.iterdir():
            assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~umask), path.name


def test_config_hash_ignores_where_the_config_was_read(tiny):
    """The same model cached in two places hashes the same: paths are left out at every depth."""
    import copy

    from embedlens.result import config_hash

    config = tiny.model.config
    moved = copy.deepcopy(config)
    moved._name_or_path = "/elsewhere/model"
    moved.text_config._name_or_path = "/elsewhere/model/text"
    moved.vision_config._name_or_path = "/elsewhere/model/vision"
    assert config_hash(moved) == config_hash(config)
    moved.text_config.num_hidden_layers += 1
    assert config_hash(moved) != config_hash(config)
