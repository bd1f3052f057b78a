"""Compact encoding of probe results for the HTML report.

A probe panel carries, per lens and probed layer, every visual token's top-k ids and scores and its
norm. Written as JSON lists, 576 tokens x 33 layers x top-10 x 2 lenses would be about 8 MB of text;
encoded here it is about 3 MB and decodes in milliseconds:

* ids are replaced by their index into ONE table of the distinct ids of the whole report
  (:class:`TokenTable`: ``ids`` and ``pieces``), stored as little-endian ``uint16`` (``uint32`` when the
  table outgrows 65536 entries) and base64-encoded;
* scores and norms are ``float32`` (7 significant digits; the report shows 4 decimals), base64-encoded;
* groups are one character per token (:data:`embedlens.taxonomy.groups.CODES`).

Array layout (``L`` layers, ``n = rows * cols`` tokens in row-major grid order, ``k`` tokens each):
``ids`` and ``scores`` are flat ``[L, n, k]``; ``norms`` is flat ``[L, n]``. :func:`decode_array` is
the inverse used by the tests; the page decodes with ``atob`` and typed arrays.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from embedlens.errors import InputError
from embedlens.result import MultiLayerProbe, ProbeResult
from embedlens.taxonomy.groups import CODES

#: Side (pixels) up to which a view is embedded as PNG (small synthetic pictures stay exact); above it, JPEG.
PNG_MAX_SIDE = 160
#: JPEG quality of embedded photos.
JPEG_QUALITY = 88
#: Typed-array names the page understands, by numpy dtype.
_DTYPES = {"u16": np.dtype("<u2"), "u32": np.dtype("<u4"), "f32": np.dtype("<f4")}


@dataclass
class TokenTable:
    """The distinct vocabulary ids of a report with their pieces; panels refer to ids by their index here."""

    ids: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    _index: dict[int, int] = field(default_factory=dict, repr=False)

    def add(self, ids: np.ndarray, pieces: Sequence[Sequence[str]]) -> np.ndarray:
        """Register ``ids`` (shape ``[n, k]``) with their pieces; return their indices, same shape."""
        flat_ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        flat_pieces = [piece for row in pieces for piece in row]
        if len(flat_pieces) != flat_ids.size:
            raise InputError(f"{flat_ids.size} ids but {len(flat_pieces)} pieces")
        out = np.empty(flat_ids.size, dtype=np.int64)
        for position, (token_id, piece) in enumerate(zip(flat_ids.tolist(), flat_pieces, strict=True)):
            index = self._index.get(token_id)
            if index is None:
                index = self._index[token_id] = len(self.ids)
                self.ids.append(token_id)
                self.pieces.append(piece)
            out[position] = index
        return out.reshape(np.shape(ids))

    def to_dict(self) -> dict[str, Any]:
        """``{"ids": [...], "pieces": [...]}`` for the page."""
        return {"ids": self.ids, "pieces": self.pieces}


def encode_array(values: np.ndarray, kind: str) -> str:
    """Base64 of ``values`` as a little-endian typed array (``"u16"``, ``"u32"`` or ``"f32"``)."""
    return base64.b64encode(np.ascontiguousarray(values, dtype=_DTYPES[kind]).tobytes()).decode("ascii")


def decode_array(text: str, kind: str) -> np.ndarray:
    """Inverse of :func:`encode_array` (flat array)."""
    return np.frombuffer(base64.b64decode(text), dtype=_DTYPES[kind])


def image_uri(image: Image.Image) -> str:
    """``data:`` URI of ``image``: PNG for small pictures, JPEG for photos."""
    buffer = io.BytesIO()
    rgb = image.convert("RGB")
    if max(rgb.size) <= PNG_MAX_SIDE:
        rgb.save(buffer, format="PNG", optimize=True)
        mime = "image/png"
    else:
        rgb.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        mime = "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _grid_order(result: ProbeResult) -> np.ndarray:
    """Permutation that puts ``result``'s tokens in row-major grid order (checks every cell is there once)."""
    if len(result.views) > 1:
        raise InputError(f"{result.image}: a panel shows one view; encode each view's part (probe.part(view))")
    rows, cols = result.grid
    flat = np.asarray(result.row, dtype=np.int64) * cols + np.asarray(result.col, dtype=np.int64)
    if len(result) != rows * cols or not np.array_equal(np.sort(flat), np.arange(rows * cols)):
        raise InputError(f"{result.image}: the tokens do not cover the {rows} x {cols} grid once each")
    return np.argsort(flat, kind="stable")


def encode_probe(
    probe: MultiLayerProbe,
    table: TokenTable,
    *,
    groups: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The page's data for one probed image, or one view of it (without the picture; see :func:`image_uri`).

    Args:
        probe: The image's results, one per (lens, layer), of a single view (for an image with several
            views, one view's :meth:`~embedlens.result.MultiLayerProbe.part`).
        table: The report's token table (extended with this probe's ids).
        groups: Each token's group, in the results' token order, or None.

    Returns:
        ``{"grid", "n", "k", "layers", "lenses", "groups", "data": {lens: {"ids", "scores", "norms"}}, "idType"}``
        with arrays encoded by :func:`encode_array` in the layout described in the module docstring;
        ``idType`` is filled in by :func:`finish_id_type` once every panel is in the table.
    """
    first = probe.results[0]
    order = _grid_order(first)
    ks = {r.top_ids.shape[1] for r in probe.results}
    if len(ks) != 1:
        raise InputError(f"{probe.image}: the results keep different numbers of tokens ({sorted(ks)})")
    k = ks.pop()
    data: dict[str, Any] = {}
    for lens in probe.lenses:
        ids, scores, norms = [], [], []
        for layer in probe.layers:
            result = probe.get(layer, lens)
            if not np.array_equal(_grid_order(result), order):
                raise InputError(f"{probe.image}: layer {layer} lists its tokens in another order")
            ids.append(table.add(result.top_ids[order], [result.top_tokens[i] for i in order]))
            scores.append(np.asarray(result.top_sims, dtype=np.float64)[order])
            norms.append(np.asarray(result.norm, dtype=np.float64)[order])
        data[lens] = {"ids": np.stack(ids), "scores": encode_array(np.stack(scores), "f32")}
        data[lens]["norms"] = encode_array(np.stack(norms), "f32")
    codes = None
    if groups is not None:
        if len(groups) != len(first):
            raise InputError(f"{probe.image}: {len(groups)} group labels for {len(first)} tokens")
        codes = "".join(CODES[str(groups[i])] for i in order)
    return {
        "grid": [int(first.grid[0]), int(first.grid[1])],
        "n": len(first),
        "k": int(k),
        "layers": [int(layer) for layer in probe.layers],
        "lenses": list(probe.lenses),
        "groups": codes,
        "data": data,
    }


def finish_id_type(panels: Sequence[dict[str, Any]], table: TokenTable) -> None:
    """Encode every panel's id indices, as ``uint16`` when the table allows, else ``uint32`` (in place)."""
    kind = "u16" if len(table.ids) <= 1 << 16 else "u32"
    for panel in panels:
        panel["idType"] = kind
        for lens_data in panel["data"].values():
            if not isinstance(lens_data["ids"], str):
                lens_data["ids"] = encode_array(lens_data["ids"], kind)
