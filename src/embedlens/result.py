"""Probe results: one row per visual token, with provenance, as pandas / Parquet / JSON."""

from __future__ import annotations

import collections
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from embedlens.errors import InputError
from embedlens.saved import (
    RESULT_JSON,
    TOKENS_PARQUET,
    VOLATILE_CONFIG_KEYS,
    Provenance,
    SavedResult,
    config_hash,
    read_result_json,
    write_result_files,
)
from embedlens.views import (
    VIEW_PNG,
    ViewInfo,
    check_views,
    is_plain,
    read_pictures,
    save_pictures,
    single_view,
    view_indices,
    views_from_json,
)

__all__ = [
    "MULTI_LAYER_FORMAT",
    "RESULT_JSON",
    "TOKENS_PARQUET",
    "VIEW_PNG",
    "VOLATILE_CONFIG_KEYS",
    "MultiLayerProbe",
    "ProbeResult",
    "Provenance",
    "SavedResult",
    "ViewInfo",
    "config_hash",
    "read_result_json",
    "with_layer",
    "write_result_files",
]

#: ``format`` of a multi-layer result's ``result.json``.
MULTI_LAYER_FORMAT = "embedlens-probe-layers"


@dataclass
class ProbeResult(SavedResult):
    """What the lens shows for every visual token of one image.

    Token arrays cover the grid tokens of every view of the image (see :mod:`embedlens.views`), view
    after view in sequence order, each view's tokens in its grid order (row-major); ``n`` is the sum of
    the views' ``rows * cols``. With one view (LLaVA-1.5, Qwen, Gemma) that is simply the grid.

    Attributes:
        image: The image's path, or a label for in-memory images.
        prompt: The user's question (or the raw prompt).
        text: The model's full text after templating.
        grid: ``(rows, cols)`` of the first view's patch grid (the grid, for a single-view result).
        index: Token index within its view's grid, shape ``[n]``.
        row, col: Grid coordinates within the token's view, shape ``[n]`` each.
        position: Sequence position in the model input, shape ``[n]``.
        norm: L2 norm of each token's vector at the probed layer (float32 math), shape ``[n]``.
        top_ids: Vocabulary ids, shape ``[n, k]``, best first.
        top_tokens: Vocabulary pieces, ``n`` lists of ``k`` strings.
        top_sims: Cosine similarities (embedding lens) or logits (logit lens), shape ``[n, k]``.
        provenance: See :class:`Provenance`.
        view: The picture the model saw of the first view (after resize / crop), for drawing; not saved.
        views: Where each view's tokens sit in the arrays, its grid, extra tokens and markers (default:
            one ``"full"`` view on ``grid`` holding every token).
        pictures: The pictures of the views, when known (see :meth:`picture`; ``view``, not ``pictures[0]``,
            is the first view's); not saved.
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
    views: tuple[ViewInfo, ...] = ()
    pictures: tuple[Image.Image | None, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        self.views = check_views(self.views, len(self)) if self.views else single_view(self.grid, len(self))
        if tuple(int(v) for v in self.grid) != self.views[0].grid:
            raise InputError(f"the result's grid {self.grid} is not its first view's grid {self.views[0].grid}")
        self.pictures = tuple(self.pictures)

    @property
    def layer(self) -> int:
        """Layer probed."""
        return self.provenance.layer

    @property
    def lens(self) -> str:
        """Lens used."""
        return self.provenance.lens

    @property
    def view_index(self) -> np.ndarray:
        """Each token's view (index into :attr:`views`), int64 array of shape ``[n]``."""
        return view_indices(self.views)

    def picture(self, view: int) -> Image.Image | None:
        """The picture of view ``view`` (``view`` for the first one), or None when unknown."""
        if view == 0:
            return self.view
        return self.pictures[view] if view < len(self.pictures) else None

    def part(self, view: int) -> ProbeResult:
        """The tokens of view ``view`` alone, as a single-view result on that view's grid with its picture."""
        info = self.views[view]
        s = slice(info.start, info.stop)
        return replace(
            self,
            grid=info.grid,
            **{name: getattr(self, name)[s] for name in ("index", "row", "col", "position", "norm", "top_ids")},
            top_tokens=self.top_tokens[s],
            top_sims=self.top_sims[s],
            view=self.picture(view),
            views=(replace(info, start=0),),
            pictures=(),
        )

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def to_pandas(self) -> pd.DataFrame:
        """One row per visual token: index, (view, with several views,) row, col, position, norm, top_ids,
        top_tokens, top_sims."""
        frame = pd.DataFrame(
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
        if len(self.views) > 1:
            frame.insert(1, "view", self.view_index)
        return frame

    def token_dicts(self) -> list[dict[str, Any]]:
        """Tokens as plain JSON-ready dicts, in array order (``"view"`` only with several views)."""
        views = self.view_index.tolist() if len(self.views) > 1 else None
        out = []
        for i in range(len(self)):
            token: dict[str, Any] = {"index": int(self.index[i])}
            if views is not None:
                token["view"] = views[i]
            token |= {"row": int(self.row[i]), "col": int(self.col[i]), "position": int(self.position[i])}
            token |= {"norm": float(self.norm[i]), "top_ids": [int(x) for x in self.top_ids[i]]}
            token |= {"top_tokens": list(self.top_tokens[i]), "top_sims": [float(x) for x in self.top_sims[i]]}
            out.append(token)
        return out

    def views_dict(self) -> dict[str, Any]:
        """``{"views": [...]}`` (see :meth:`ViewInfo.to_dict`) unless the result is one plain ``"full"`` view."""
        return {} if is_plain(self.views, len(self)) else {"views": [v.to_dict() for v in self.views]}

    def to_dict(self, provenance: bool = True) -> dict[str, Any]:
        """The command line's JSON object (plus ``prompt``, ``text`` and ``provenance`` when asked; plus
        ``views`` when there are several views, extra tokens or markers)."""
        out: dict[str, Any] = {
            "model": self.provenance.model,
            "image": self.image,
            "layer": self.layer,
            "lens": self.lens,
            "grid": [int(self.grid[0]), int(self.grid[1])],
            **self.views_dict(),
            "tokens": self.token_dicts(),
        }
        if provenance:
            out["prompt"] = self.prompt
            out["text"] = self.text
            out["provenance"] = asdict(self.provenance)
        return out

    def grid_line(self) -> str:
        """``"4 x 4 = 16 visual tokens"``, or with several views ``"2 views: a 2 x 4, b 2 x 4 = 16 visual tokens"``."""
        if len(self.views) == 1:
            return f"{self.grid[0]} x {self.grid[1]} = {len(self)} visual tokens"
        shown = ", ".join(f"{v.name} {v.grid[0]} x {v.grid[1]}" for v in self.views)
        return f"{len(self.views)} views: {shown} = {len(self)} visual tokens"

    def summary(self) -> str:
        """A person's view (what ``embedlens probe`` prints): model, image, prompt, lens, grid, norms,
        the most common top-1 tokens and the first 8 tokens with their neighbours. No final newline."""
        norms = self.norm
        lines = [
            f"model   {self.provenance.model}",
            f"image   {self.image}",
            f"prompt  {self.prompt!r}",
            f"lens    {self.lens} lens at layer {self.layer}, top-{self.provenance.k}",
            f"grid    {self.grid_line()} at positions {int(self.position.min())}..{int(self.position.max())}",
            f"norm    min {norms.min():.3g}  median {float(sorted(norms)[len(norms) // 2]):.3g}  max {norms.max():.3g}",
        ]
        extra = [p for v in self.views for p in v.extra_positions]
        if extra:
            lines.append(f"extra   {len(extra)} visual tokens that are not grid cells (not probed) at {extra[:8]}")
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
        several = len(self.views) > 1
        where = "(view row, col)" if several else "(row, col)"
        lines += ["", f"first {show} visual tokens {where}: top-{self.provenance.k} tokens with scores"]
        for i in range(show):
            pairs = ", ".join(f"{t!r} {s:.3f}" for t, s in zip(self.top_tokens[i], self.top_sims[i], strict=True))
            name = f"{self.views[int(self.view_index[i])].name} " if several else ""
            lines.append(f"  {name}({self.row[i]:>2}, {self.col[i]:>2})  {pairs}")
        return "\n".join(lines)

    @classmethod
    def load(cls, directory: str | Path) -> ProbeResult:
        """Read a result written by :meth:`save` (from its JSON; files without views load as one view)."""
        data = read_result_json(directory)
        tokens = data["tokens"]
        prov = dict(data["provenance"])
        prov["exclude"] = tuple(prov.get("exclude", ()))
        columns = {name: [t[name] for t in tokens] for name in ("index", "row", "col", "position", "norm")}
        columns |= {name: [t[name] for t in tokens] for name in ("top_ids", "top_tokens", "top_sims")}
        return _from_columns(data, columns, Provenance(**prov), views_from_json(data, len(tokens)), ())


def _from_columns(
    data: dict[str, Any],
    columns: Any,
    provenance: Provenance,
    views: tuple[ViewInfo, ...],
    pictures: tuple[Image.Image | None, ...],
) -> ProbeResult:
    """A :class:`ProbeResult` from a saved JSON header and its token columns (lists or a frame)."""
    return ProbeResult(
        image=data["image"],
        prompt=data.get("prompt", ""),
        text=data.get("text", ""),
        grid=views[0].grid,
        index=np.asarray(columns["index"], dtype=np.int64),
        row=np.asarray(columns["row"], dtype=np.int64),
        col=np.asarray(columns["col"], dtype=np.int64),
        position=np.asarray(columns["position"], dtype=np.int64),
        norm=np.asarray(columns["norm"], dtype=np.float32),
        top_ids=np.stack([np.asarray(x) for x in columns["top_ids"]]).astype(np.int64),
        top_tokens=[list(t) for t in columns["top_tokens"]],
        top_sims=np.stack([np.asarray(x) for x in columns["top_sims"]]).astype(np.float64),
        provenance=provenance,
        view=pictures[0] if pictures else None,
        views=views,
        pictures=pictures,
    )


@dataclass
class MultiLayerProbe:
    """One image probed at several layers (and lenses) from one forward pass.

    Attributes:
        results: One :class:`ProbeResult` per (lens, layer), lens-major with layers ascending; all of the
            same image, prompt and views, each with the same ``n`` tokens in the same order.
    """

    results: list[ProbeResult]

    def __post_init__(self) -> None:
        if not self.results:
            raise InputError("a multi-layer probe needs at least one result")
        first = self.results[0]
        for other in self.results[1:]:
            if (other.image, other.views, len(other)) != (first.image, first.views, len(first)):
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
        """``(rows, cols)`` of the first view's patch grid."""
        return self.results[0].grid

    @property
    def views(self) -> tuple[ViewInfo, ...]:
        """The views of the image (see :class:`ProbeResult`)."""
        return self.results[0].views

    @property
    def view(self) -> Image.Image | None:
        """The picture the model saw (of the first view), if known."""
        return self.results[0].view

    def picture(self, view: int) -> Image.Image | None:
        """The picture of view ``view``, if known."""
        return self.results[0].picture(view)

    def part(self, view: int) -> MultiLayerProbe:
        """View ``view``'s tokens alone at every layer and lens (see :meth:`ProbeResult.part`)."""
        return MultiLayerProbe([result.part(view) for result in self.results])

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
            **first.views_dict(),
            "tokens": len(first),
            "layers": list(self.layers),
            "lenses": list(self.lenses),
            "provenance": provenance,
        }

    def save(self, directory: str | Path) -> dict[str, Path]:
        """Write ``tokens.parquet`` (``lens`` and ``layer`` columns), ``result.json`` and, when known, the
        picture of each view (``view.png`` for the first, ``view-<i>.png`` for the others) into
        ``directory``, each atomically."""
        paths = write_result_files(directory, self.to_pandas(), self.to_dict())
        saved = save_pictures([self.picture(v) for v in range(len(self.views))], directory)
        paths |= {("view" if path.name == VIEW_PNG else path.stem): path for path in saved}
        return paths

    @classmethod
    def load(cls, directory: str | Path) -> MultiLayerProbe:
        """Read a result written by :meth:`save`, or a single-layer :class:`ProbeResult` directory."""
        directory = Path(directory)
        data = read_result_json(directory)
        if data.get("format") != MULTI_LAYER_FORMAT:
            single = ProbeResult.load(directory)
            pictures = read_pictures(directory, len(single.views))
            return cls([replace(single, view=pictures[0], pictures=pictures)])
        frame = pd.read_parquet(directory / TOKENS_PARQUET)
        views = views_from_json(data, int(data["tokens"]))
        pictures = read_pictures(directory, len(views))
        base = dict(data["provenance"])
        base["exclude"] = tuple(base.get("exclude", ()))
        results = []
        for lens in data["lenses"]:
            for layer in data["layers"]:
                part = frame[(frame["lens"] == lens) & (frame["layer"] == layer)]
                provenance = Provenance(**{**base, "layer": int(layer), "lens": lens})
                results.append(_from_columns(data, part, provenance, views, pictures))
        return cls(results)


def with_layer(provenance: Provenance, layer: int, lens: str) -> Provenance:
    """A copy of ``provenance`` for another layer and lens (same run, same forward pass)."""
    return replace(provenance, layer=layer, lens=lens)
