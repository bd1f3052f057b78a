"""The evaluation table: per setting and category, scores with bootstrap intervals, paired deltas,
yes/no F1, tokens and FLOPs (``table.json``), and its markdown (``table.md``)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from embedlens.bench.vqa import QuestionSet, yes_no_f1
from embedlens.runs import bootstrap_interval, resolved
from embedlens.synth.qa import normalize_answer

if TYPE_CHECKING:
    from embedlens.bench.runner import EvalOptions, Setting

EVAL_FORMAT = "embedlens-eval"


def _interval(values: np.ndarray, resamples: int, confidence: float, rng: np.random.Generator) -> list[float]:
    """Percentile bootstrap interval of the mean of ``values`` (rows resampled)."""
    low, high = bootstrap_interval(values, resamples, confidence, rng)
    return [float(low[0]), float(high[0])]


def summarise(
    rows: Sequence[dict[str, Any]],
    questions: QuestionSet,
    settings: Sequence[Setting],
    options: EvalOptions,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """Per setting and category: scores with intervals, paired deltas, yes/no F1, tokens and FLOPs."""
    rng = np.random.default_rng(seed)
    ok_items = [
        q.index
        for q in questions.items
        if all(r["status"] == "ok" for r in rows if r["index"] == q.index)  # answered in every setting
    ]
    by_setting: dict[int, dict[int, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        by_setting[r["setting_index"]][r["index"]] = r
    categories = sorted({q.category for q in questions.items})
    category_items = {
        c: [q for q in questions.items if q.category == c and q.index in set(ok_items)] for c in categories
    }
    baseline = by_setting[0]
    summary: dict[str, Any] = {
        "format": EVAL_FORMAT,
        "questions": str(resolved(questions.source)),
        "items": len(questions.items),
        "answered_in_every_setting": len(ok_items),
        "skipped_rows": len(questions.skipped),
        "confidence": options.confidence,
        "categories": categories,
        "settings": [],
        "families": [],
    }
    for number, setting in enumerate(settings):
        mine = by_setting[number]
        entry: dict[str, Any] = {**setting.to_dict(), "categories": {}}
        for category in categories:
            items = category_items[category]
            scores = np.array([mine[q.index]["score"] for q in items], dtype=float)
            base = np.array([baseline[q.index]["score"] for q in items], dtype=float)
            relaxed = np.array([mine[q.index]["relaxed"] for q in items], dtype=float)
            cell: dict[str, Any] = {
                "n": len(items),
                "score": float(scores.mean()) if items else float("nan"),
                "interval": _interval(scores, options.bootstrap, options.confidence, rng),
                "relaxed": float(relaxed.mean()) if items else float("nan"),
            }
            if number:
                cell["delta"] = float((scores - base).mean()) if items else float("nan")
                cell["delta_interval"] = _interval(scores - base, options.bootstrap, options.confidence, rng)
            yes_items = [q for q in items if q.type == "yesno"]
            if yes_items:
                predicted = [mine[q.index]["yesno"] for q in yes_items]
                truth = [normalize_answer(q.answers[0]) for q in yes_items]
                cell["yesno_accuracy"] = float(np.mean([p == t for p, t in zip(predicted, truth, strict=True)]))
                cell["yesno_f1"] = yes_no_f1(predicted, truth)
                cell["yesno_n"] = len(yes_items)
            entry["categories"][category] = cell
        answered = [mine[i] for i in ok_items]
        entry["tokens_layer0"] = float(np.mean([r["tokens_layer0"] for r in answered])) if answered else None
        entry["tokens_mean"] = float(np.mean([r["tokens_mean"] for r in answered])) if answered else None
        entry["pruned"] = float(np.mean([r["pruned"] for r in answered])) if answered else None
        entry["gflops"] = float(np.mean([r["gflops"] for r in answered])) if answered else None
        all_scores = np.array([r["score"] for r in answered], dtype=float)
        entry["overall"] = float(all_scores.mean()) if answered else float("nan")
        entry["overall_relaxed"] = float(np.mean([r["relaxed"] for r in answered])) if answered else float("nan")
        entry["overall_interval"] = _interval(all_scores, options.bootstrap, options.confidence, rng)
        summary["settings"].append(entry)
    base_flops = summary["settings"][0]["gflops"]
    for entry in summary["settings"]:
        entry["flops_ratio"] = entry["gflops"] / base_flops if base_flops else None
    families = sorted({s.family for s in settings if s.family})
    for family in families:
        members = [e for s, e in zip(settings, summary["settings"], strict=True) if s.family == family]
        cell = {"name": family, "seeds": len(members), "categories": {}}
        for category in [*categories, "overall"]:
            values = [m["overall"] if category == "overall" else m["categories"][category]["score"] for m in members]
            cell["categories"][category] = {"mean": float(np.mean(values)), "spread": float(np.std(values))}
        cell["pruned"] = float(np.mean([m["pruned"] for m in members]))
        summary["families"].append(cell)
    return summary


def _pct(value: float) -> str:
    return "n/a" if value != value else f"{value * 100:.1f}"


def render_markdown(table: dict[str, Any]) -> str:
    """The summary as markdown tables: scores (with intervals and deltas), yes/no, tokens and FLOPs."""
    categories = table["categories"]
    level = round(table["confidence"] * 100)
    lines = [
        f"Scores in % ({level}% bootstrap intervals over questions); delta = setting - baseline, paired.",
        f"{table['answered_in_every_setting']} of {table['items']} questions answered in every setting"
        + (f"; {table['skipped_rows']} rows skipped" if table["skipped_rows"] else "")
        + ".",
        "",
        "| setting | " + " | ".join(categories) + " | overall | pruned | tokens L0 | FLOPs |",
        "|---" * (len(categories) + 5) + "|",
    ]
    for entry in table["settings"]:
        cells = []
        for category in categories:
            cell = entry["categories"][category]
            text = f"{_pct(cell['score'])} [{_pct(cell['interval'][0])}, {_pct(cell['interval'][1])}]"
            if "delta" in cell:
                low, high = cell["delta_interval"]
                text += f"<br>Δ {cell['delta'] * 100:+.1f} [{low * 100:+.1f}, {high * 100:+.1f}]"
            cells.append(text)
        overall = f"{_pct(entry['overall'])}"
        ratio = entry["flops_ratio"]
        lines.append(
            f"| {entry['name']} | " + " | ".join(cells) + f" | {overall} | {entry['pruned']:.1f} | "
            f"{entry['tokens_layer0']:.1f} | {entry['gflops']:.3g} G ({ratio:.2f}x) |"
        )
    if table["families"]:
        lines += ["", "| random control (over seeds) | " + " | ".join(categories) + " | overall | pruned |"]
        lines.append("|---" * (len(categories) + 3) + "|")
        for family in table["families"]:
            cells = [
                f"{_pct(family['categories'][c]['mean'])} ± {_pct(family['categories'][c]['spread'])}"
                for c in [*categories, "overall"]
            ]
            lines.append(
                f"| {family['name']} ({family['seeds']} seeds) | " + " | ".join(cells) + f" | {family['pruned']:.1f} |"
            )
    lines += [
        "",
        "Relaxed scores in % (the answer appears as whole words in the reply; letters and yes/no still strict):",
        "",
        "| setting | " + " | ".join(categories) + " | overall |",
        "|---" * (len(categories) + 2) + "|",
    ]
    for entry in table["settings"]:
        cells = [_pct(entry["categories"][c]["relaxed"]) for c in categories]
        lines.append(f"| {entry['name']} | " + " | ".join(cells) + f" | {_pct(entry['overall_relaxed'])} |")
    yes_rows = [
        (entry["name"], c, entry["categories"][c])
        for entry in table["settings"]
        for c in categories
        if "yesno_f1" in entry["categories"][c]
    ]
    if yes_rows:
        lines += ["", "| setting | category | yes/no questions | accuracy | F1 (yes) |", "|---|---|---|---|---|"]
        for name, category, cell in yes_rows:
            accuracy, f1 = _pct(cell["yesno_accuracy"]), _pct(cell["yesno_f1"])
            lines.append(f"| {name} | {category} | {cell['yesno_n']} | {accuracy} | {f1} |")
    return "\n".join(lines) + "\n"
