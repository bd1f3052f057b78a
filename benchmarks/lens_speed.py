"""Speed and exactness of the embedding lens against the ways people compute it.

Run:  python benchmarks/lens_speed.py            (LLaVA-1.5-7B shapes, random table; about 1 minute)
      python benchmarks/lens_speed.py --model embedlens-mini --image photo.png   (a real table)

All figures come from this one run on this machine. Methods, each returning top-k ids per token:

  ours        EmbedLens ExactSearch: bf16 shortlist + rigorous bound + float64 re-rank (search only;
              the once-per-model table preparation is timed separately)
  per-token   torch cosine_similarity of one token against the whole table, as the reference
              notebooks probe (a sample of tokens is timed and extrapolated to all of them)
  ref-fp16    the reference's run-time rule: one float16 normalised matmul + topk
  faiss       faiss IndexFlatIP exact inner-product search on float32 normalised vectors
  fp32-mm     bare float32 matmul of the normalised tensors (no top-k): this machine's fp32 limit
  bf16-mm     bare bfloat16 matmul (no top-k): this machine's bf16 limit

"exact" compares each method's ids with two brute forces: float32 (normalise and multiply in float32,
sort by score then lower id) and float64 (the same in float64, the mathematically exact order).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from embedlens.nearest import ExactSearch


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


def stable_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k ids by score descending, ties by lower id (a stable sort of the full row)."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]


def real_inputs(model: str, image: str | None, prompt: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The input embedding table of ``model`` and the layer-0 visual tokens of ``image``."""
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
    return session.adapter.input_embeddings.weight.detach(), queries, f"{model} table, visual tokens of {label}"


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


def _peak_extra_memory(vocab: int, dim: int, tokens: int, k: int, dtype: str, queue) -> None:
    """In a fresh process: peak RSS above the starting point while preparing the table, then searching."""
    table = torch.cat([torch.randn(1024, dim).to(getattr(torch, dtype)) for _ in range(0, vocab, 1024)])[:vocab]
    queries = torch.randn(tokens, dim)
    _reset_peak()
    base = _rss_mib("VmRSS")
    search = ExactSearch(table, normalize=True)
    prepared_peak, prepared = _rss_mib("VmHWM"), _rss_mib("VmRSS")
    _reset_peak()
    search.search(queries, k)
    searched_peak = _rss_mib("VmHWM")
    queue.put((prepared_peak - base, prepared - base, searched_peak - prepared))


def measure_memory(vocab: int, dim: int, tokens: int, k: int, dtype: str) -> tuple[float, float, float]:
    """Run :func:`_peak_extra_memory` in a spawned process so other allocations do not hide it."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_peak_extra_memory, args=(vocab, dim, tokens, k, dtype, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=576, help="visual tokens (queries)")
    parser.add_argument("--vocab", type=int, default=32000, help="table rows")
    parser.add_argument("--dim", type=int, default=4096, help="hidden size")
    parser.add_argument("--table-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (each method once per round)")
    parser.add_argument("--per-token-sample", type=int, default=3, help="tokens timed for the per-token loop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="use this model's real input embedding table (e.g. embedlens-mini)")
    parser.add_argument("--image", help="with --model: image whose visual tokens are the queries")
    parser.add_argument("--prompt", default="Describe the image.")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    if args.model:
        table, queries, source = real_inputs(args.model, args.image, args.prompt)
    else:
        dtype = getattr(torch, args.table_dtype)
        table = torch.randn(args.vocab, args.dim).to(dtype)
        queries = torch.randn(args.tokens, args.dim) * 3.0
        source = f"random N(0,1) table in {args.table_dtype}, random queries (seed {args.seed})"
    n, (vocab, dim), k = queries.shape[0], table.shape, args.k
    flops = 2.0 * n * vocab * dim
    print(f"EmbedLens lens benchmark: {n} tokens x table {vocab} x {dim}, k={k}; {source}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    q32, t32 = normalise(queries.float()), normalise(table.float())
    ref32 = stable_topk(q32 @ t32.T, k)
    ref64 = stable_topk(normalise(queries.double()) @ normalise(table.double()).T, k)
    rows: list[tuple[str, float, torch.Tensor | None, str]] = []

    start = time.perf_counter()
    search = ExactSearch(table, normalize=True)
    prep = time.perf_counter() - start

    q16, t16 = q32.half(), t32.half()
    qb, tb = q32.bfloat16(), t32.bfloat16()
    timed: dict[str, Callable[[], object]] = {
        "ours": lambda: search.search(queries, k),
        "ref-fp16": lambda: torch.topk(q16 @ t16.T, k, dim=1).indices,
    }
    faiss_note = "not installed (pip install faiss-cpu)"
    try:
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())
        index = faiss.IndexFlatIP(dim)
        index.add(t32.numpy())
        qn = q32.numpy()
        timed["faiss"] = lambda: torch.from_numpy(index.search(qn, k)[1])
        faiss_note = f"faiss {faiss.__version__} IndexFlatIP"
    except ImportError:
        pass
    timed["fp32-mm"] = lambda: q32 @ t32.T
    timed["bf16-mm"] = lambda: qb @ tb.T
    best = best_times(timed, args.repeats)

    t, found = best["ours"]
    rows.append(("ours", t, found.ids, f"short={str(search.short_dtype).removeprefix('torch.')}"))
    candidates = found.candidates.float()

    sample = min(args.per_token_sample, n)
    tf32 = table.float()

    def per_token() -> torch.Tensor:
        out = []
        for i in range(sample):
            sims = torch.nn.functional.cosine_similarity(queries[i : i + 1].float(), tf32, dim=-1)
            out.append(stable_topk(sims[None], k)[0])
        return torch.stack(out)

    t_tok, ids_tok = best_time(per_token, 1)
    rows.append(("per-token", t_tok * n / sample, None, f"{t_tok / sample:.2f} s/token x {n}, sample {sample}"))
    per_token_exact = torch.equal(ids_tok, ref32[:sample])

    rows.append(("ref-fp16", *best["ref-fp16"], "fp16 matmul + topk (reference rule)"))
    if "faiss" in best:
        rows.append(("faiss", *best["faiss"], faiss_note))
    else:
        rows.append(("faiss", float("nan"), None, faiss_note))
    t_mm32 = best["fp32-mm"][0]
    rows.append(("fp32-mm", t_mm32, None, "bare matmul, no top-k"))
    rows.append(("bf16-mm", best["bf16-mm"][0], None, "bare matmul, no top-k"))

    print()
    print(f"{'method':<10} {'time s':>9} {'GFLOP/s':>8} {'vs fp32-mm':>10}  {'= fp32 bf':>9} {'= fp64 bf':>9}  note")
    for name, seconds, ids, note in rows:
        gflops = flops / seconds / 1e9 if seconds == seconds else float("nan")
        speed = t_mm32 / seconds if seconds == seconds else float("nan")
        if ids is None:
            eq32 = eq64 = "all" if name == "per-token" and per_token_exact else "-"
            if name == "per-token":
                eq32 = "yes" if per_token_exact else "no"
                eq64 = "yes" if torch.equal(ids_tok, ref64[:sample]) else "no"
        else:
            bad32 = int((ids != ref32).any(dim=1).sum())
            bad64 = int((ids != ref64).any(dim=1).sum())
            eq32 = "yes" if bad32 == 0 else f"{bad32} rows"
            eq64 = "yes" if bad64 == 0 else f"{bad64} rows"
        print(f"{name:<10} {seconds:>9.3f} {gflops:>8.0f} {speed:>9.2f}x  {eq32:>9} {eq64:>9}  {note}")

    ours = rows[0][1]
    faiss_time = next(r[1] for r in rows if r[0] == "faiss")
    print()
    print(f"ours vs bare fp32 matmul: {t_mm32 / ours:.2f}x faster (target >= 3x)")
    if faiss_time == faiss_time:
        print(f"ours vs faiss exact:      {faiss_time / ours:.2f}x faster (target >= 1x)")
    print(f"ours vs per-token loop:   {rows[1][1] / ours:.0f}x faster")
    print(f"fp32 brute force == fp64 brute force: {torch.equal(ref32, ref64)}")
    print(
        f"candidates re-ranked per token: mean {candidates.mean():.1f}, median "
        f"{statistics.median(candidates.tolist()):.0f}, max {int(candidates.max())} (of {vocab})"
    )
    cache_mib = (search.short.numel() * search.short.element_size() + 2 * vocab * 8) / 2**20
    print(f"table preparation (once per model and lens): {prep:.2f} s; cached table {cache_mib:.0f} MiB")
    bound = search.search_memory_bound / 2**20
    print(
        f"search peak extra memory bound: {bound:.0f} MiB (score blocks of {search.block_queries} queries in "
        f"{search.chunk_bytes / 2**20:.0f} MiB, their copies, re-rank rows); buffers kept between searches: "
        f"{search._workspace.nbytes / 2**20:.0f} MiB"
    )
    if not args.model:
        prep_peak, _kept, search_peak = measure_memory(vocab, dim, n, k, args.table_dtype)
        print(
            f"measured in a fresh process (RSS): table preparation peak +{prep_peak:.0f} MiB (cache "
            f"{cache_mib:.0f} MiB + transient chunks); one search peak +{search_peak:.0f} MiB beyond that "
            f"(freed pages are reused; bound {bound:.0f} MiB)"
        )


if __name__ == "__main__":
    main()
