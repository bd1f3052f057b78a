"""Reading EmbedLens output folders for the report: what each command wrote, recognised by its files.

Each reader returns a :class:`Section`: the kind of output, a title, its provenance (what is known of
the model, prompt, settings and versions) and the data the page shows. Readers only read; the writers
are ``result.py`` (probe), ``taxonomy/result.py`` (classify), ``taxonomy/stats.py`` (stats),
``taxonomy/discover.py`` (anchors JSON), ``bench/runner.py`` (eval), ``analysis/alignment.py`` (align)
and ``analysis/sweep.py`` (inject-sweep).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image, UnidentifiedImageError

from embedlens.errors import InputError
from embedlens.result import RESULT_JSON, TOKENS_PARQUET, VIEW_PNG, MultiLayerProbe

#: The kinds of output the report understands, in the order the page lists them.
KINDS = ("probe", "classify", "anchors", "stats", "eval", "inject-sweep", "align")


@dataclass
class Section:
    """One output folder (or anchors file), read.

    Attributes:
        kind: One of :data:`KINDS`.
        title: Heading on the page.
        source: The folder or file it was read from.
        provenance: Label -> text, shown with the section.
        data: What the section shows (kind-specific; see each reader).
        notes: Remarks shown under the heading (e.g. where the picture came from).
    """

    kind: str
    title: str
    source: Path
    provenance: dict[str, str]
    data: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"cannot read {path}: {err}") from None


def _run_json(directory: Path) -> dict[str, Any]:
    """The folder's ``run.json`` (what the run was asked to do), or ``{}`` when it has none."""
    return _json(directory / "run.json") if (directory / "run.json").is_file() else {}


def _options(run: dict[str, Any]) -> dict[str, Any]:
    """The ``options`` object of a ``run.json``, or ``{}``."""
    return run.get("options") if isinstance(run.get("options"), dict) else {}


def _identity(model: str | None, config_hash: str | None) -> dict[str, str | None]:
    """The model and the first 16 characters of its config hash (each left out when not recorded)."""
    return {"model": model, "config_hash": (config_hash or "")[:16] or None}


def _pick(data: dict[str, Any], *keys: str) -> dict[str, Any]:
    """``data``'s values of ``keys`` (None for those it lacks), in that order."""
    return {key: data.get(key) for key in keys}


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(v) for v in value) or "none"
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def layers_text(layers: list[int]) -> str:
    """``0-32 (33 layers)`` for a run of layers, else the list."""
    if len(layers) > 3 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]} ({len(layers)} layers)"
    return ", ".join(map(str, layers))


def _provenance(**items: Any) -> dict[str, str]:
    """Label -> text, leaving out what the output does not record."""
    return {label.replace("_", " "): _text(value) for label, value in items.items() if value is not None}


def read_section(path: str | Path) -> Section:
    """Recognise and read one output folder (or an anchors JSON file).

    Raises:
        InputError: When ``path`` does not exist or holds no EmbedLens output the report knows.
    """
    path = Path(path)
    if path.is_file():
        data = _json(path)
        if data.get("format") == "embedlens-anchors":
            return _anchors(path, data)
        raise InputError(f"{path} is not an anchors file (the only file the report reads; give folders otherwise)")
    if not path.is_dir():
        raise InputError(f"no such output folder: {path}")
    if (path / RESULT_JSON).is_file():
        return _probe(path, _json(path / RESULT_JSON))
    summary = path / "summary.json"
    if summary.is_file():
        data = _json(summary)
        if data.get("format") == "embedlens-stats":
            return _stats(path, data)
        if data.get("format") == "embedlens-align":
            return _align(path, data)
    if (path / "sweep.json").is_file():
        return _sweep(path, _json(path / "sweep.json"))
    if (path / "table.json").is_file():
        data = _json(path / "table.json")
        if data.get("format") == "embedlens-eval":
            return _eval(path, data)
    raise InputError(
        f"{path} holds no EmbedLens output the report knows (probe, classify, stats, eval, align, inject-sweep "
        "folders or an anchors JSON)"
    )


# --------------------------------------------------------------------------- probe / classify
def find_view(directory: Path, image: str, grid: tuple[int, int]) -> tuple[Image.Image | None, str]:
    """The picture to draw the grid on, and a note saying what it is.

    ``view.png`` (the picture the model saw, saved by multi-layer probes and ``--report``) wins; else the
    source image named in the result, found as given, beside the folder or in it, centre-cropped to the
    grid's shape (the model's own resize and crop may differ slightly); else None.
    """
    saved = directory / VIEW_PNG
    if saved.is_file():
        with Image.open(saved) as opened:
            return opened.convert("RGB"), "the picture the model saw"
    given = Path(image)
    for candidate in (given, directory / given, directory.parent / given, directory / given.name):
        if candidate.is_file():
            try:
                with Image.open(candidate) as opened:
                    picture = opened.convert("RGB")
            except (OSError, UnidentifiedImageError):
                continue
            return _crop_to(picture, grid), (
                f"the source image {candidate.name}, centre-cropped to the grid's shape (the run saved no "
                "view.png; the model's own resize and crop may differ)"
            )
    return None, f"the image {image} was not found and the run saved no view.png: the grid is drawn on blank"


def _crop_to(picture: Image.Image, grid: tuple[int, int]) -> Image.Image:
    rows, cols = grid
    width, height = picture.size
    target = cols / rows
    if width / height > target:
        new_width = round(height * target)
        left = (width - new_width) // 2
        return picture.crop((left, 0, left + new_width, height))
    new_height = round(width / target)
    top = (height - new_height) // 2
    return picture.crop((0, top, width, top + new_height))


def _views_text(views: Any) -> str:
    """``"a 2 x 4, b 2 x 4"``: each view's name and grid."""
    return ", ".join(f"{view.name} {view.grid[0]} x {view.grid[1]}" for view in views)


def _probe(directory: Path, data: dict[str, Any]) -> Section:
    """A probe (single or multi-layer) or classify folder: ``data`` holds ``probe``, ``groups``, ``view``
    (the first view's picture) and ``pictures`` (one per view of the image; None where unknown)."""
    probe = MultiLayerProbe.load(directory)
    groups = None
    kind = "probe"
    extra: dict[str, Any] = {}
    if "rule" in data:
        kind = "classify"
        frame = pd.read_parquet(directory / TOKENS_PARQUET, columns=["group"])
        groups = [str(g) for g in frame["group"]]
        extra = {"rule top-k": data["rule"]["top_k"], "precedence": data["rule"]["precedence"]}
        extra["anchors"] = {name: ids for name, ids in data["rule"]["anchors"].items()}
        extra["counts"] = data.get("counts")
    view, note = find_view(directory, probe.image, probe.grid)
    notes = [note]
    pictures = [view, *(probe.picture(v) for v in range(1, len(probe.views)))]
    missing = [info.name for info, picture in zip(probe.views[1:], pictures[1:], strict=True) if picture is None]
    if len(probe.views) > 1:
        notes[0] = f"view {probe.views[0].name}: {note}"
    if missing:
        notes.append(f"no saved picture of view(s) {', '.join(missing)}: their grids are drawn on blank")
    prov = data["provenance"]
    provenance = _provenance(
        model=prov.get("model"),
        revision=prov.get("revision") or "unknown",
        config_hash=(prov.get("config_hash") or "")[:16],
        prompt=data.get("prompt"),
        image=probe.image,
        layers=layers_text(list(probe.layers)),
        lenses=list(probe.lenses),
        top_k=prov.get("k"),
        exclude=prov.get("exclude"),
        dtype=prov.get("dtype"),
        **{key: value for key, value in extra.items() if value is not None},
        **({"views": _views_text(probe.views)} if len(probe.views) > 1 else {}),
        embedlens=prov.get("embedlens_version"),
        transformers=prov.get("transformers_version"),
        torch=prov.get("torch_version"),
        created=prov.get("created"),
    )
    title = f"{'Classify' if kind == 'classify' else 'Probe'}: {Path(probe.image).name}"
    data = {"probe": probe, "groups": groups, "view": view, "pictures": pictures}
    return Section(kind, title, directory, provenance, data, notes)


# --------------------------------------------------------------------------- anchors / stats
def _anchors(path: Path, data: dict[str, Any]) -> Section:
    provenance = _provenance(
        model=data.get("model"),
        vocab_hash=(data.get("vocab_hash") or "")[:16],
        top_k=data.get("top_k"),
        **_pick(data.get("evidence") or {}, "images", "visual_tokens", "method", "sink_layer", "cross_layer"),
    )
    return Section("anchors", f"Anchors: {path.name}", path, provenance, data)


def _stats(directory: Path, data: dict[str, Any]) -> Section:
    run = _run_json(directory)
    provenance = _provenance(
        **_identity(data.get("model"), run.get("config_hash")),
        dataset=data["dataset"]["source"],
        images_used=f"{data['images']['used']} of {data['images']['total']}",
        tokens=data.get("tokens"),
        rule_top_k=data["rule"]["top_k"],
        anchors=data["rule"]["anchors"],
        intervals=f"{data['intervals']['method']}, {data['intervals']['confidence']:.0%}, "
        f"{data['intervals']['resamples']} resamples, seed {data['intervals']['seed']}",
        prompt=_options(run).get("prompt"),
    )
    return Section("stats", f"Group statistics: {Path(data['dataset']['source']).name}", directory, provenance, data)


# --------------------------------------------------------------------------- eval / sweep / align
def _eval(directory: Path, data: dict[str, Any]) -> Section:
    run = _run_json(directory)
    provenance = _provenance(
        **_identity(run.get("model"), run.get("config_hash")),
        questions=data.get("questions"),
        items=f"{data['answered_in_every_setting']} of {data['items']} answered in every setting",
        confidence=data.get("confidence"),
        max_new_tokens=run.get("max_new_tokens"),
        suffix=run.get("suffix") or None,
        anchors=run.get("anchors"),
    )
    return Section("eval", f"Evaluation: {Path(str(data.get('questions'))).parent.name}", directory, provenance, data)


def _sweep(directory: Path, data: dict[str, Any]) -> Section:
    provenance = _provenance(**_pick(data, "model", "datasets", "best_layer", "timing"))
    return Section("inject-sweep", f"Injection sweep: {directory.name}", directory, provenance, data)


def _align(directory: Path, data: dict[str, Any]) -> Section:
    layers_file = directory / "layers.parquet"
    if not layers_file.is_file():
        raise InputError(f"{directory} has summary.json but no layers.parquet")
    frame = pd.read_parquet(layers_file)
    options = _options(_run_json(directory))
    provenance = _provenance(
        **_identity(data.get("model"), data.get("config_hash")),
        dataset=data.get("dataset"),
        images=data.get("images"),
        groups_from=data.get("groups_from"),
        text_reference=f"{data['text']['tokens']} tokens from {data['text']['passages']} passages",
        lens_layers=layers_text(list(data.get("lens_layers") or [])),
        lens_top_k=data.get("lens_top_k"),
        prompt=options.get("prompt"),
    )
    return Section(
        "align",
        f"Alignment: {Path(str(data.get('dataset'))).name}",
        directory,
        provenance,
        {"summary": data, "layers": frame},
    )
