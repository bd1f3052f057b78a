"""Speed and exactness of the embedding lens against the ways people compute it.

Run:  python benchmarks/lens_speed.py            (LLaVA-1.5-7B shapes, random table; about 1 minute)
      python benchmarks/lens_speed.py --case qwen2.5-vl-7b   (Qwen2.5-VL-7B shapes; 5-10 minutes, 7.7 GB peak RSS)
      python benchmarks/lens_speed.py --model embedlens-mini --image photo.png   (a real table)

Cases (``--case``; ``--tokens/--vocab/--dim/--table-dtype/--tokenizer-size`` override their shapes):

  llava-1.5-7b    576 visual tokens x table 32000 x 4096 (float16), every row a token; table and
                  queries i.i.d. N(0, 1) (queries x 3)
  qwen2.5-vl-7b   1024 visual tokens x table 152064 x 3584 (bfloat16), of which the tokenizer has 151665
                  tokens: the lens searches only those rows (``Lens.rows_left_out`` = 399) and must never
                  return an id past them. The table is drawn to look like a real one (see
                  :func:`shaped_inputs`): row directions N(0, I) plus a direction shared by all rows
                  (anisotropy), row norms log-normal; each query a weighted mix of 1-3 rows (drawn from
                  the whole table, padding rows included) plus N(0, I) noise, with log-normal norms.

All figures come from this one run on this machine. Methods, each returning top-k ids per token:

  ours        EmbedLens's embedding lens (ExactSearch: bf16 shortlist + rigorous bound + float64
              re-rank; search only, the once-per-model table preparation is timed separately)
  per-token   torch cosine_similarity of one token against the whole float32 table, as the reference
              notebooks probe (in slices of 8192 rows, whose temporaries would otherwise be two more
              copies of the table; a sample of tokens is timed and extrapolated to all of them)
  ref-<type>  the reference's run-time rule: one normalised matmul in the table's half type + topk
  faiss       faiss IndexFlatIP exact inner-product search on float32 normalised vectors
  fp32-mm     bare float32 matmul of the normalised tensors into a kept buffer (no top-k): this
              machine's fp32 limit
  bf16-mm     the same in bfloat16: this machine's bf16 limit

Every method searches the same rows (those below the tokenizer size). "exact" compares each method's
ids with two brute forces over those rows: float32 (normalise and multiply in float32, order by score
then lower id) and float64 (the same in float64, the mathematically exact order); the lens's float64
scores are compared with both too.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from queue import Empty
from types import SimpleNamespace

import torch

from embedlens.lens import EmbeddingLens

#: Table rows that the code outside the lens (drawing, brute forces, per-token loop) handles at once,
#: so that its temporaries stay small beside a 2 GB table.
SLICE_ROWS = 8192


@dataclass(frozen=True)
class Case:
    """One benchmark shape.

    Attributes:
        tokens: Visual tokens (queries).
        vocab: Rows of the embedding table.
        dim: Hidden size.
        table_dtype: Type the table is stored in (the model's weights).
        tokenizer_size: Tokens the tokenizer has: the lens searches rows below it only.
        data: ``"normal"`` (i.i.d. N(0, 1)) or ``"shaped"`` (:func:`shaped_inputs`).
        repeats: Timed rounds (each method once per round).
    """

    tokens: int
    vocab: int
    dim: int
    table_dtype: str
    tokenizer_size: int
    data: str
    repeats: int


CASES = {
    "llava-1.5-7b": Case(576, 32000, 4096, "float16", 32000, "normal", 5),
    "qwen2.5-vl-7b": Case(1024, 152064, 3584, "bfloat16", 151665, "shaped", 3),
}


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Minimum wall time over ``repeats`` calls (after one warm-up) and the last result."""
    return best_times({"fn": fn}, repeats)["fn"]


def best_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, object]]:
    """Minimum wall time of each function over ``repeats`` rounds, and its last result.

    Every round calls each function once, in turn (after one warm-up call each), so that a slow spell of
    a shared machine falls on all of them alike and the ratios between them stay fair.
    """
    results = {name: fn() for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: (min(times[name]), results[name]) for name in fns}


def normalise(x: torch.Tensor) -> torch.Tensor:
    norms = x.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, x / norms.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))


def top_rows(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query, the ``k`` best of ``scores`` (shape ``[n, m]``; their row ids ``ids``, the same shape,
    ascending along each row), by score descending then lower id: ``(ids, scores)``, shape ``[n, k]``."""
    k, width = min(k, scores.shape[1]), min(k + 16, scores.shape[1])
    if width < scores.shape[1]:
        # Sort only the best k + 16 when they hold every score equal to the k-th (the usual case).
        wide = torch.topk(scores, width, dim=1)
        if bool((wide.values[:, -1] < wide.values[:, k - 1]).all()):
            kept_ids = torch.gather(ids, 1, wide.indices)
            by_id = torch.argsort(kept_ids, dim=1)
            scores, ids = torch.gather(wide.values, 1, by_id), torch.gather(kept_ids, 1, by_id)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.gather(ids, 1, order), torch.gather(scores, 1, order)


def brute_force(
    queries: torch.Tensor, rows: Callable[[int, int], torch.Tensor], first: int, last: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` table rows ``first:last`` of each query by (score descending, id ascending).

    ``rows(a, b)`` gives rows ``a:b`` normalised in the brute force's type, ``queries`` are normalised
    in it. The table is multiplied ``SLICE_ROWS`` rows at a time and each slice's winners are
    merged with the best so far (kept first: they have the lower ids, and the sorts are stable), so the
    result is that of one full sort while only one slice of scores exists at a time.
    """
    best_ids = torch.zeros(queries.shape[0], 0, dtype=torch.long)
    best_scores = torch.zeros(queries.shape[0], 0, dtype=queries.dtype)
    for start in range(first, last, SLICE_ROWS):
        stop = min(start + SLICE_ROWS, last)
        ids = torch.arange(start, stop).expand(queries.shape[0], -1)
        slice_ids, slice_scores = top_rows(queries @ rows(start, stop).T, ids, k)
        best_ids, best_scores = top_rows(
            torch.cat([best_scores, slice_scores], dim=1), torch.cat([best_ids, slice_ids], dim=1), k
        )
    return best_ids, best_scores


def shaped_inputs(case: Case, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random table and queries shaped like a real embedding table and layer-0 visual tokens.

    Table row ``j``: direction ``g_j + 0.3 m`` with ``g_j ~ N(0, I/d)`` and ``m`` one random unit vector
    shared by every row (real embedding tables are anisotropic), scaled to a norm ``exp(0.35 z_j)`` with
    ``z_j ~ N(0, 1)``; stored in ``case.table_dtype``. Rows past the tokenizer are drawn the same way.
    Query ``i``: ``sum_a w_a e_a / |e_a| + 1.5 x_i`` over 1-3 rows ``a`` drawn uniformly from the whole
    table (padding rows included), weights ``w_a ~ U(0.3, 1)``, noise ``x_i ~ N(0, I/d)``, scaled to a
    norm ``30 exp(0.5 z_i)``.
    """
    generator = torch.Generator().manual_seed(seed)
    shared = normalise(torch.randn(1, case.dim, generator=generator))
    table = torch.empty(case.vocab, case.dim, dtype=getattr(torch, case.table_dtype))
    for start in range(0, case.vocab, SLICE_ROWS):
        stop = min(start + SLICE_ROWS, case.vocab)
        rows = torch.randn(stop - start, case.dim, generator=generator) / math.sqrt(case.dim) + 0.3 * shared
        norms = torch.exp(0.35 * torch.randn(stop - start, 1, generator=generator))
        table[start:stop] = normalise(rows) * norms
    picks = torch.randint(0, case.vocab, (case.tokens, 3), generator=generator)
    weights = torch.empty(case.tokens, 3).uniform_(0.3, 1.0, generator=generator)
    weights *= torch.arange(3)[None, :] < torch.randint(1, 4, (case.tokens, 1), generator=generator)
    mixed = (weights[:, :, None] * normalise(table[picks.flatten()].float()).view(case.tokens, 3, -1)).sum(1)
    noise = torch.randn(case.tokens, case.dim, generator=generator) / math.sqrt(case.dim)
    norms = 30 * torch.exp(0.5 * torch.randn(case.tokens, 1, generator=generator))
    return table, normalise(mixed + 1.5 * noise) * norms


def random_inputs(case: Case, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The case's table ``[vocab, dim]``, queries ``[tokens, dim]`` (float32) and a line saying how drawn."""
    if case.data == "shaped":
        table, queries = shaped_inputs(case, seed)
        about = "anisotropic rows, log-normal norms; queries mix 1-3 rows + noise"
        return table, queries, f"random table shaped like a real one ({about}) in {case.table_dtype}, seed {seed}"
    torch.manual_seed(seed)
    table = torch.randn(case.vocab, case.dim).to(getattr(torch, case.table_dtype))
    queries = torch.randn(case.tokens, case.dim) * 3.0
    return table, queries, f"random N(0,1) table in {case.table_dtype}, random queries (seed {seed})"


class _SizedTokenizer:
    """Just enough of a tokenizer for a lens: its length (rows past it are padding) and pieces."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [f"<{i}>" for i in ids]


def embedding_lens(table: torch.Tensor, tokenizer_size: int) -> EmbeddingLens:
    """The embedding lens over ``table`` for a tokenizer of ``tokenizer_size`` tokens (no model needed)."""
    adapter = SimpleNamespace(tokenizer=_SizedTokenizer(tokenizer_size), input_embeddings=SimpleNamespace(weight=table))
    return EmbeddingLens(adapter)  # type: ignore[arg-type]  # the lens reads only these two


def real_inputs(model: str, image: str | None, prompt: str) -> tuple[torch.Tensor, torch.Tensor, int, str]:
    """The input embedding table of ``model``, the layer-0 visual tokens of ``image``, the tokenizer size."""
    import embedlens
    from embedlens.capture import run_captured

    session = embedlens.load(model, device="cpu")
    if image is None:
        from PIL import Image

        generator = torch.Generator().manual_seed(0)
        pixels = (torch.rand(336, 336, 3, generator=generator) * 255).to(torch.uint8).numpy()
        picture: object = Image.fromarray(pixels)
        label = "random-noise image"
    else:
        picture, label = image, image
    batch = session.prepare([picture], [prompt])
    hidden = run_captured(session.adapter, batch.inputs, [0]).hidden[0]
    queries = hidden[0, batch.spans[0][0].positions]
    table = session.adapter.input_embeddings.weight.detach()
    return table, queries, len(session.adapter.tokenizer), f"{model} table, visual tokens of {label}"


def cpu_description() -> str:
    """The CPU model (with its family and model numbers), core count and bfloat16 units (Linux ``/proc/cpuinfo``)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    model = fields.get("model name", "unknown CPU")
    if "cpu family" in fields and "model" in fields:
        model += f" family {fields['cpu family']} model {fields['model']}"
    flags = [
        name
        for name, check in (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
        if getattr(torch.cpu, check, lambda: False)()
    ]
    units = ", ".join(flags) if flags else "no bfloat16 matrix units"
    return f"{model} ({os.cpu_count()} cores; {units}), {torch.get_num_threads()} threads"


def _rss_mib(field: str) -> float:
    """``VmRSS`` (current) or ``VmHWM`` (peak) of this process in MiB, from /proc (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    """Make ``VmHWM`` restart from the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def _peak_extra_memory(case: Case, seed: int, k: int, queue) -> None:
    """In a fresh process: peak RSS above the starting point while preparing the lens, then searching."""
    table, queries, _ = random_inputs(case, seed)
    _reset_peak()
    base = _rss_mib("VmRSS")
    search = embedding_lens(table, case.tokenizer_size)._search
    prepared_peak, prepared = _rss_mib("VmHWM"), _rss_mib("VmRSS")
    _reset_peak()
    search.search(queries, k)
    searched_peak = _rss_mib("VmHWM")
    queue.put((prepared_peak - base, prepared - base, searched_peak - prepared))


def measure_memory(case: Case, seed: int, k: int) -> tuple[float, float, float]:
    """Run :func:`_peak_extra_memory` in a spawned process so other allocations do not hide it."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_peak_extra_memory, args=(case, seed, k, queue))
    process.start()
    while True:
        try:
            result = queue.get(timeout=1.0)
            break
        except Empty:
            if not process.is_alive():
                raise RuntimeError(f"the memory measurement failed (exit code {process.exitcode})") from None
    process.join()
    return result


def float32_table(table: torch.Tensor, rows: int) -> tuple[torch.Tensor, object | None, str]:
    """Rows ``:rows`` normalised in float32, and a faiss ``IndexFlatIP`` over them sharing that memory.

    The index copies the rows when they are added; the returned tensor is then a view of the index's own
    storage, so the run holds one float32 copy of the table, not two. Without faiss: the tensor alone.
    """
    t32 = torch.empty(rows, table.shape[1])
    for start in range(0, rows, SLICE_ROWS):
        t32[start : start + SLICE_ROWS] = normalise(table[start : min(start + SLICE_ROWS, rows)].float())
    try:
        import faiss
    except ImportError:
        return t32, None, "not installed (pip install faiss-cpu)"
    faiss.omp_set_num_threads(torch.get_num_threads())
    index = faiss.IndexFlatIP(table.shape[1])
    index.add(t32.numpy())
    del t32
    stored = faiss.rev_swig_ptr(index.get_xb(), rows * table.shape[1]).reshape(rows, table.shape[1])
    return torch.from_numpy(stored), index, f"faiss {faiss.__version__} IndexFlatIP"


def exactness(ids: torch.Tensor | None, reference: torch.Tensor) -> str:
    """``yes`` when every token's ids equal the reference's, else how many tokens differ."""
    if ids is None:
        return "-"
    bad = int((ids != reference).any(dim=1).sum())
    return "yes" if bad == 0 else f"{bad} rows"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="llava-1.5-7b", choices=sorted(CASES), help="shapes and data")
    parser.add_argument("--tokens", type=int, help="visual tokens (queries)")
    parser.add_argument("--vocab", type=int, help="table rows")
    parser.add_argument("--dim", type=int, help="hidden size")
    parser.add_argument("--table-dtype", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--tokenizer-size", type=int, help="tokens the tokenizer has (default: every row)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, help="timed rounds (each method once per round)")
    parser.add_argument("--per-token-sample", type=int, default=3, help="tokens timed for the per-token loop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="use this model's real input embedding table (e.g. embedlens-mini)")
    parser.add_argument("--image", help="with --model: image whose visual tokens are the queries")
    parser.add_argument("--prompt", default="Describe the image.")
    args = parser.parse_args()

    case = CASES[args.case]
    overrides = {"tokens": args.tokens, "vocab": args.vocab, "dim": args.dim, "table_dtype": args.table_dtype}
    case = replace(case, **{key: value for key, value in overrides.items() if value is not None})
    tokenizer_size = args.tokenizer_size or (case.tokenizer_size if args.vocab is None else case.vocab)
    case = replace(case, tokenizer_size=tokenizer_size, repeats=args.repeats or case.repeats)
    k = args.k
    memory = None
    if args.model:
        table, queries, tokenizer_size, source = real_inputs(args.model, args.image, args.prompt)
    else:
        memory = measure_memory(case, args.seed, k)  # first, while this process is still small
        table, queries, source = random_inputs(case, args.seed)
    start = time.perf_counter()
    lens = embedding_lens(table, tokenizer_size)
    prep = time.perf_counter() - start
    search, searchable = lens._search, lens.searchable_rows
    n, (vocab, dim) = queries.shape[0], table.shape
    flops = 2.0 * n * searchable * dim
    print(f"EmbedLens lens benchmark: {n} tokens x table {vocab} x {dim}, k={k}; {source}")
    print(f"searched rows: {searchable} (tokenizer size {tokenizer_size}; lens.rows_left_out = {lens.rows_left_out})")
    print(f"cpu: {cpu_description()}; torch {torch.__version__}")

    t32, index, faiss_note = float32_table(table, searchable)
    q32 = normalise(queries.float())
    half = table.dtype if table.dtype in (torch.float16, torch.bfloat16) else torch.float16
    half_name = str(half).removeprefix("torch.").replace("float", "fp").replace("bfp", "bf")
    # The low-precision tables and the bare matmuls' outputs, freed once the timing is done.
    kept = {dtype: t32.to(dtype) for dtype in {half, torch.bfloat16}}
    kept["out32"] = torch.empty(n, searchable)
    kept["out16"] = torch.empty(n, searchable, dtype=torch.bfloat16)
    q_half, qb = q32.to(half), q32.bfloat16()
    timed: dict[str, Callable[[], object]] = {
        "ours": lambda: search.search(queries, k),
        f"ref-{half_name}": lambda: torch.topk(q_half @ kept[half].T, k, dim=1).indices,
    }
    if index is not None:
        qn = q32.numpy()
        timed["faiss"] = lambda: torch.from_numpy(index.search(qn, k)[1])
    timed["fp32-mm"] = lambda: torch.mm(q32, t32.T, out=kept["out32"]).shape
    timed["bf16-mm"] = lambda: torch.mm(qb, kept[torch.bfloat16].T, out=kept["out16"]).shape
    best = best_times(timed, case.repeats)
    kept.clear()

    ref32, ref32_scores = brute_force(q32, lambda a, b: t32[a:b], 0, searchable, k)
    q64 = normalise(queries.double())
    ref64, ref64_scores = brute_force(q64, lambda a, b: normalise(table[a:b].double()), 0, searchable, k)

    t_ours, found = best["ours"]
    rows: list[tuple[str, float, torch.Tensor | None, str]] = []
    rows.append(("ours", t_ours, found.ids, f"short={str(search.short_dtype).removeprefix('torch.')}"))
    sample = min(args.per_token_sample, n)

    def per_token() -> torch.Tensor:
        out = []
        for i in range(sample):
            query = queries[i : i + 1].float()
            sims = torch.cat(
                [
                    torch.nn.functional.cosine_similarity(query, t32[start : start + SLICE_ROWS], dim=-1)
                    for start in range(0, searchable, SLICE_ROWS)
                ]
            )
            out.append(top_rows(sims[None], torch.arange(searchable)[None], k)[0][0])
        return torch.stack(out)

    t_tok, ids_tok = best_time(per_token, 1)
    rows.append(("per-token", t_tok * n / sample, None, f"{t_tok / sample:.2f} s/token x {n}, sample {sample}"))
    rows.append((f"ref-{half_name}", *best[f"ref-{half_name}"], f"{half_name} matmul + topk (reference rule)"))
    rows.append(("faiss", *best["faiss"], faiss_note) if "faiss" in best else ("faiss", math.nan, None, faiss_note))
    t_mm32 = best["fp32-mm"][0]
    rows.append(("fp32-mm", t_mm32, None, "bare matmul, no top-k"))
    rows.append(("bf16-mm", best["bf16-mm"][0], None, "bare matmul, no top-k"))

    print()
    print(f"{'method':<10} {'time s':>9} {'GFLOP/s':>8} {'vs fp32-mm':>10}  {'= fp32 bf':>9} {'= fp64 bf':>9}  note")
    for name, seconds, ids, note in rows:
        gflops, speed = flops / seconds / 1e9, t_mm32 / seconds
        eq32, eq64 = exactness(ids, ref32), exactness(ids, ref64)
        if name == "per-token":
            eq32, eq64 = exactness(ids_tok, ref32[:sample]), exactness(ids_tok, ref64[:sample])
        print(f"{name:<10} {seconds:>9.3f} {gflops:>8.0f} {speed:>9.2f}x  {eq32:>9} {eq64:>9}  {note}")

    faiss_time = rows[3][1]
    print()
    print(f"ours vs bare fp32 matmul: {t_mm32 / t_ours:.2f}x faster (target >= 3x)")
    if not math.isnan(faiss_time):
        print(f"ours vs faiss exact:      {faiss_time / t_ours:.2f}x faster (target >= 1x)")
    print(f"ours vs per-token loop:   {rows[1][1] / t_ours:.0f}x faster")
    print(f"fp32 brute force == fp64 brute force: {torch.equal(ref32, ref64)}")
    print(
        f"ours, scores: max |ours - fp64 brute force| = {(found.scores - ref64_scores).abs().max():.1e}, "
        f"max |ours - fp32 brute force| = {(found.scores - ref32_scores.double()).abs().max():.1e}"
    )
    if searchable < vocab:
        _, padding_best = brute_force(q64, lambda a, b: normalise(table[a:b].double()), searchable, vocab, 1)
        reach = int((padding_best[:, 0] > ref64_scores[:, -1]).sum())
        print(
            f"rows past the tokenizer: largest id returned {int(found.ids.max())} (< {searchable}: "
            f"{int(found.ids.max()) < searchable}); an unrestricted search would have put one of the "
            f"{vocab - searchable} padding rows in the top-{k} of {reach} of {n} tokens"
        )
    candidates = found.candidates.float()
    print(
        f"candidates re-ranked per token: mean {candidates.mean():.1f}, median "
        f"{statistics.median(candidates.tolist()):.0f}, max {int(candidates.max())} (of {searchable})"
    )
    cache_mib = (search.short.numel() * search.short.element_size() + 2 * searchable * 8) / 2**20
    print(f"table preparation (once per model and lens): {prep:.2f} s; cached table {cache_mib:.0f} MiB")
    bound = search.search_memory_bound / 2**20
    print(
        f"search peak extra memory bound: {bound:.0f} MiB (score blocks of {search.block_queries} queries in "
        f"{search.chunk_bytes / 2**20:.0f} MiB, their copies, re-rank rows); buffers kept between searches: "
        f"{search._workspace.nbytes / 2**20:.0f} MiB"
    )
    if memory is not None:
        prep_peak, _kept, search_peak = memory
        print(
            f"measured in a fresh process (RSS): table preparation peak +{prep_peak:.0f} MiB (cache "
            f"{cache_mib:.0f} MiB + transient chunks); one search peak +{search_peak:.0f} MiB beyond that "
            f"(freed pages are reused; bound {bound:.0f} MiB)"
        )


if __name__ == "__main__":
    main()
