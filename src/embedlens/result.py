"""Probe results: one row per visual token, with provenance, as pandas / Parquet / JSON."""

from __future__ import annotations

import collections
import datetime as _dt
import hashlib
import json
import platform
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from embedlens._version import __version__
from embedlens.errors import InputError
from embedlens.files import atomic_path, atomic_write_text

RESULT_JSON = "result.json"
TOKENS_PARQUET = "tokens.parquet"
#: The picture the model saw, saved beside a multi-layer result (for the HTML report).
VIEW_PNG = "view.png"
#: ``format`` of a multi-layer result's ``result.json``.
MULTI_LAYER_FORMAT = "embedlens-probe-layers"


#: Config keys that say where or when a config was read, not what the model is; left out of its hash.
VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "_commit_hash")


def _without_volatile(value: Any) -> Any:
    """``value`` with :data:`VOLATILE_CONFIG_KEYS` removed at every depth (nested sub-configs carry them too)."""
    if isinstance(value, dict):
        return {k: _without_volatile(v) for k, v in value.items() if k not in VOLATILE_CONFIG_KEYS}
    if isinstance(value, list):
        return [_without_volatile(v) for v in value]
    return value


def config_hash(config: Any) -> str:
    """SHA-256 of a ``transformers`` config's canonical JSON (its identity for provenance).

    Where the config was read from (``_name_or_path``, also inside ``text_config`` / ``vision_config``),
    its hub commit and the ``transformers`` version are left out, so one model hashes the same wherever it
    is cached.
    """
    text = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else str(config)
    data = _without_volatile(json.loads(text))
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def write_result_files(directory: str | Path, frame: pd.DataFrame, data: dict[str, Any]) -> dict[str, Path]:
    """Write a result's token table (``tokens.parquet``) and JSON (``result.json``), each atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"parquet": directory / TOKENS_PARQUET, "json": directory / RESULT_JSON}
    with atomic_path(paths["parquet"]) as tmp:
        frame.to_parquet(tmp, index=False)
    atomic_write_text(paths["json"], json.dumps(data, ensure_ascii=False, indent=1))
    return paths


def read_result_json(directory: str | Path) -> dict[str, Any]:
    """The ``result.json`` object of a saved result directory."""
    return json.loads((Path(directory) / RESULT_JSON).read_text(encoding="utf-8"))


class SavedResult:
    """What the one-image results that print as their summary share (:class:`ProbeResult` and
    :class:`~embedlens.taxonomy.result.ClassifiedResult`): ``str()``, JSON text and saving as
    ``tokens.parquet`` + ``result.json``. Subclasses give :meth:`summary`, :meth:`to_pandas` and
    :meth:`to_dict`."""

    def summary(self) -> str:
        """A person's view of the result."""
        raise NotImplementedError

    def to_pandas(self) -> pd.DataFrame:
        """One row per visual token."""
        raise NotImplementedError

    def to_dict(self, provenance: bool = True) -> dict[str, Any]:
        """The JSON object of ``result.json``."""
        raise NotImplementedError

    def to_json(self, **kwargs: Any) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(**kwargs), ensure_ascii=False)

    def __str__(self) -> str:
        return self.summary()

    def save(self, directory: str | Path) -> dict[str, Path]:
        """Write :meth:`to_pandas` as ``tokens.parquet`` and :meth:`to_dict` as ``result.json`` into
        ``directory``, each atomically."""
        return write_result_files(directory, self.to_pandas(), self.to_dict())


@dataclass(frozen=True)
class Provenance:
    """Where a result came from, so it can be trusted and reproduced.

    Attributes:
        model: Model name as given (built-in name, path or hub id).
        revision: Hub commit of the checkpoint when known, else None.
        config_hash: SHA-256 of the model config (see :func:`config_hash`).
        vocab_hash: SHA-256 of the tokenizer vocabulary.
        layer: Layer read (0 = projector output / decoder input).
        lens: ``"embedding"`` or ``"logit"``.
        k: Number of tokens kept per visual token.
        exclude: Token kinds excluded from the lens.
        dtype: The model's dtype.
        embedlens_version, transformers_version, torch_version, python_version: Software versions.
        created: UTC time of the run (ISO 8601).
        profile: The profile the model was fed and read with (see :mod:`embedlens.profiles`).
        vocab_limit: The lens returned only ids below this (a base vocabulary), or None.
        rows_left_out: Embedding-table rows the lens never returned (past the tokenizer or the limit).
    """

    model: str
    revision: str | None
    config_hash: str
    vocab_hash: str
    layer: int
    lens: str
    k: int
    exclude: tuple[str, ...]
    dtype: str
    embedlens_version: str = __version__
    transformers_version: str = ""
    torch_version: str = ""
    python_version: str = field(default_factory=platform.python_version)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    profile: str = "default"
    vocab_limit: int | None = None
    rows_left_out: int = 0


@dataclass
class ProbeResult(SavedResult):
    """What the lens shows for every visual token of one image.

    Token arrays are in grid order (row-major); ``n = rows * cols``.

    Attributes:
        image: The image's path, or a label for in-memory images.
        prompt: The user's question (or the raw prompt).
        text: The model's full text after templating.
        grid: ``(rows, cols)`` of the patch grid.
        index: Token index within the grid, shape ``[n]``.
        row, col: Grid coordinates, shape ``[n]`` each.
        position: Sequence position in the model input, shape ``[n]``.
        norm: L2 norm of each token's vector at the probed layer (float32 math), shape ``[n]``.
        top_ids: Vocabulary ids, shape ``[n, k]``, best first.
        top_tokens: Vocabulary pieces, ``n`` lists of ``k`` strings.
        top_sims: Cosine similarities (embedding lens) or logits (logit lens), shape ``[n, k]``.
        provenance: See :class:`Provenance`.
        view: The picture the model saw (after resize / crop), for drawing; not saved.
    """

    image: str
    prompt: str
    text: str
    grid: tuple[int, int]
    index: np.ndarray
    row: np.ndarray
    col: np.ndarray
    position: np.ndarray
    norm: np.ndarray
    top_ids: np.ndarray
    top_tokens: list[list[str]]
    top_sims: np.ndarray
    provenance: Provenance
    view: Image.Image | None = field(default=None, repr=False, compare=False)

    @property
    def layer(self) -> int:
        """Layer probed."""
        return self.provenance.layer

    @property
    def lens(self) -> str:
        """Lens used."""
        return self.provenance.lens

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def to_pandas(self) -> pd.DataFrame:
        """One row per visual token: index, row, col, position, norm, top_ids, top_tokens, top_sims."""
        return pd.DataFrame(
            {
                "index": self.index,
                "row": self.row,
                "col": self.col,
                "position": self.position,
                "norm": self.norm,
                "top_ids": list(self.top_ids),
                "top_tokens": self.top_tokens,
                "top_sims": list(self.top_sims),
            }
        )

    def token_dicts(self) -> list[dict[str, Any]]:
        """Tokens as plain JSON-ready dicts, in grid order."""
        return [
            {
                "index": int(self.index[i]),
                "row": int(self.row[i]),
                "col": int(self.col[i]),
                "position": int(self.position[i]),
                "norm": float(self.norm[i]),
                "top_ids": [int(x) for x in self.top_ids[i]],
                "top_tokens": list(self.top_tokens[i]),
                "top_sims": [float(x) for x in self.top_sims[i]],
            }
            for i in range(len(self))
        ]

    def to_dict(self, provenance: bool = True) -> dict[str, Any]:
        """The command line's JSON object (plus ``prompt``, ``text`` and ``provenance`` when asked)."""
        out: dict[str, Any] = {
            "model": self.provenance.model,
            "image": self.image,
            "layer": self.layer,
            "lens": self.lens,
            "grid": [int(self.grid[0]), int(self.grid[1])],
            "tokens": self.token_dicts(),
        }
        if provenance:
            out["prompt"] = self.prompt
            out["text"] = self.text
            out["provenance"] = asdict(self.provenance)
        return out

    def summary(self) -> str:
        """A person's view (what ``embedlens probe`` prints): model, image, prompt, lens, grid, norms,
        the most common top-1 tokens and the first 8 tokens with their neighbours. No final newline."""
        rows, cols = self.grid
        norms = self.norm
        lines = [
            f"model   {self.provenance.model}",
            f"image   {self.image}",
            f"prompt  {self.prompt!r}",
            f"lens    {self.lens} lens at layer {self.layer}, top-{self.provenance.k}",
            f"grid    {rows} x {cols} = {len(self)} visual tokens at positions "
            f"{int(self.position.min())}..{int(self.position.max())}",
            f"norm    min {norms.min():.3g}  median {float(sorted(norms)[len(norms) // 2]):.3g}  max {norms.max():.3g}",
        ]
        top1 = collections.Counter(
            (int(ids[0]), toks[0]) for ids, toks in zip(self.top_ids, self.top_tokens, strict=True)
        )
        lines += [
            "",
            f"most common top-1 tokens ({len(top1)} distinct):",
            f"  {'id':>7}  {'token':<16} {'patches':>7}  {'share':>6}",
        ]
        for (token_id, piece), count in top1.most_common(12):
            lines.append(f"  {token_id:>7}  {piece!r:<16} {count:>7}  {count / len(self):>6.1%}")
        show = min(8, len(self))
        lines += ["", f"first {show} visual tokens (row, col): top-{self.provenance.k} tokens with scores"]
        for i in range(show):
            pairs = ", ".join(f"{t!r} {s:.3f}" for t, s in zip(self.top_tokens[i], self.top_sims[i], strict=True))
            lines.append(f"  ({self.row[i]:>2}, {self.col[i]:>2})  {pairs}")
        return "\n".join(lines)

    @classmethod
    def load(cls, directory: str | Path) -> ProbeResult:
        """Read a result written by :meth:`save` (from its JSON)."""
        data = read_result_json(directory)
        tokens = data["tokens"]
        prov = dict(data["provenance"])
        prov["exclude"] = tuple(prov.get("exclude", ()))
        return cls(
            image=data["image"],
            prompt=data.get("prompt", ""),
            text=data.get("text", ""),
            grid=(int(data["grid"][0]), int(data["grid"][1])),
            index=np.array([t["index"] for t in tokens], dtype=np.int64),
            row=np.array([t["row"] for t in tokens], dtype=np.int64),
            col=np.array([t["col"] for t in tokens], dtype=np.int64),
            position=np.array([t["position"] for t in tokens], dtype=np.int64),
            norm=np.array([t["norm"] for t in tokens], dtype=np.float32),
            top_ids=np.array([t["top_ids"] for t in tokens], dtype=np.int64),
            top_tokens=[list(t["top_tokens"]) for t in tokens],
            top_sims=np.array([t["top_sims"] for t in tokens], dtype=np.float64),
            provenance=Provenance(**prov),
        )


@dataclass
class MultiLayerProbe:
    """One image probed at several layers (and lenses) from one forward pass.

    Attributes:
        results: One :class:`ProbeResult` per (lens, layer), lens-major with layers ascending; all of the
            same image, prompt and grid, each with ``n = rows * cols`` tokens in grid order.
    """

    results: list[ProbeResult]

    def __post_init__(self) -> None:
        if not self.results:
            raise InputError("a multi-layer probe needs at least one result")
        first = self.results[0]
        for other in self.results[1:]:
            if (other.image, other.grid, len(other)) != (first.image, first.grid, len(first)):
                raise InputError("the results of a multi-layer probe must show the same image and grid")
        keys = [(r.lens, r.layer) for r in self.results]
        if len(set(keys)) != len(keys):
            raise InputError("a multi-layer probe holds each (lens, layer) once")

    @property
    def layers(self) -> tuple[int, ...]:
        """The layers probed, ascending."""
        return tuple(sorted({r.layer for r in self.results}))

    @property
    def lenses(self) -> tuple[str, ...]:
        """The lenses used, in the order given."""
        return tuple(dict.fromkeys(r.lens for r in self.results))

    @property
    def image(self) -> str:
        """The image's path or label."""
        return self.results[0].image

    @property
    def grid(self) -> tuple[int, int]:
        """``(rows, cols)`` of the patch grid."""
        return self.results[0].grid

    @property
    def view(self) -> Image.Image | None:
        """The picture the model saw, if known."""
        return self.results[0].view

    def __len__(self) -> int:
        """Number of visual tokens (per layer and lens)."""
        return len(self.results[0])

    def get(self, layer: int, lens: str | None = None) -> ProbeResult:
        """The result at ``layer`` (as probed, ``0 .. L``) for ``lens`` (default: the first lens)."""
        wanted = lens or self.lenses[0]
        for result in self.results:
            if result.layer == layer and result.lens == wanted:
                return result
        raise InputError(f"layer {layer} with the {wanted} lens was not probed; probed layers: {list(self.layers)}")

    def to_pandas(self) -> pd.DataFrame:
        """One row per (lens, layer, visual token): ``lens``, ``layer``, then the :class:`ProbeResult` columns."""
        frames = []
        for result in self.results:
            frame = result.to_pandas()
            frame.insert(0, "layer", np.int64(result.layer))
            frame.insert(0, "lens", result.lens)
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)

    def to_dict(self) -> dict[str, Any]:
        """The JSON header saved as ``result.json`` (the tokens live in ``tokens.parquet`` only)."""
        first = self.results[0]
        provenance = asdict(first.provenance)
        provenance.pop("layer")
        provenance.pop("lens")
        return {
            "format": MULTI_LAYER_FORMAT,
            "version": 1,
            "model": first.provenance.model,
            "image": first.image,
            "prompt": first.prompt,
            "text": first.text,
            "grid": [int(first.grid[0]), int(first.grid[1])],
            "tokens": len(first),
            "layers": list(self.layers),
            "lenses": list(self.lenses),
            "provenance": provenance,
        }

    def save(self, directory: str | Path) -> dict[str, Path]:
        """Write ``tokens.parquet`` (``lens`` and ``layer`` columns), ``result.json`` and, when the picture
        the model saw is known, ``view.png`` into ``directory``, each atomically."""
        paths = write_result_files(directory, self.to_pandas(), self.to_dict())
        if self.view is not None:
            paths["view"] = Path(directory) / VIEW_PNG
            with atomic_path(paths["view"]) as tmp:
                self.view.save(tmp, format="PNG")
        return paths

    @classmethod
    def load(cls, directory: str | Path) -> MultiLayerProbe:
        """Read a result written by :meth:`save`, or a single-layer :class:`ProbeResult` directory."""
        directory = Path(directory)
        data = read_result_json(directory)
        view = _read_view(directory / VIEW_PNG)
        if data.get("format") != MULTI_LAYER_FORMAT:
            single = ProbeResult.load(directory)
            single.view = view
            return cls([single])
        frame = pd.read_parquet(directory / TOKENS_PARQUET)
        base = dict(data["provenance"])
        base["exclude"] = tuple(base.get("exclude", ()))
        results = []
        for lens in data["lenses"]:
            for layer in data["layers"]:
                part = frame[(frame["lens"] == lens) & (frame["layer"] == layer)]
                results.append(
                    ProbeResult(
                        image=data["image"],
                        prompt=data.get("prompt", ""),
                        text=data.get("text", ""),
                        grid=(int(data["grid"][0]), int(data["grid"][1])),
                        index=part["index"].to_numpy(np.int64),
                        row=part["row"].to_numpy(np.int64),
                        col=part["col"].to_numpy(np.int64),
                        position=part["position"].to_numpy(np.int64),
                        norm=part["norm"].to_numpy(np.float32),
                        top_ids=np.stack(part["top_ids"].to_list()).astype(np.int64),
                        top_tokens=[list(t) for t in part["top_tokens"]],
                        top_sims=np.stack(part["top_sims"].to_list()).astype(np.float64),
                        provenance=Provenance(**{**base, "layer": int(layer), "lens": lens}),
                        view=view,
                    )
                )
        return cls(results)


def _read_view(path: Path) -> Image.Image | None:
    """The saved picture the model saw, or None when there is none."""
    if not path.is_file():
        return None
    with Image.open(path) as opened:
        return opened.convert("RGB")


def with_layer(provenance: Provenance, layer: int, lens: str) -> Provenance:
    """A copy of ``provenance`` for another layer and lens (same run, same forward pass)."""
    return replace(provenance, layer=layer, lens=lens)
