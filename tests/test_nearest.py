"""ExactSearch against a float64 brute force: same ids, same order, whatever the dtypes and block sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedlens.nearest import _SHORTLIST_EXTRA, ExactSearch, _slice_top

V, D, N = 300, 48, 9
TABLE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHORT_DTYPES = [torch.float32, torch.bfloat16]
# (normalize, with_bias): cosine, inner product, inner product + bias
SCORINGS = [(True, False), (False, False), (False, True)]
SCORING_IDS = ["cosine", "inner", "inner+bias"]


def brute_force(
    table: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    *,
    normalize: bool,
    bias: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Reference: float64, normalise (zero vectors stay zero), matmul, sort by (score desc, id asc)."""
    t = table.double()
    q = queries.double()
    if normalize:
        t_norm = t.norm(dim=1, keepdim=True)
        q_norm = q.norm(dim=1, keepdim=True)
        t = torch.where(t_norm > 0, t / t_norm, torch.zeros_like(t))
        q = torch.where(q_norm > 0, q / q_norm, torch.zeros_like(q))
    scores = q @ t.T
    if bias is not None:
        scores = scores + bias.double()
    ids = np.arange(table.shape[0]) if allowed is None else allowed.numpy()
    scores = scores.numpy()[:, ids]
    out_ids, out_scores = [], []
    for row in scores:
        order = np.lexsort((ids, -row))[:k]  # last key is primary: score desc, then id asc
        out_ids.append(ids[order])
        out_scores.append(row[order])
    return np.array(out_ids), np.array(out_scores)


def make_case(seed: int, dtype: torch.dtype, v: int = V) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random table, queries and bias with planted exact ties, a zero row and a zero query.

    Ties (exact in every float type, so every correct method must see them as ties):
    row 250 == row 40 and row 10 == row 200 (duplicates), row 7 == 2 * row 150 (same direction).
    Queries 0-2 point at those rows, so the tied pairs compete for the top places.
    """
    g = torch.Generator().manual_seed(seed)
    table = (torch.randn(v, D, generator=g) * 2).to(dtype)
    table[250] = table[40]
    table[10] = table[200]
    table[7] = table[150] * 2
    table[33] = 0
    queries = torch.randn(N, D, generator=g)
    queries[0] = table[200].float()
    queries[1] = table[150].float() * 0.5
    queries[2] = table[40].float() + 0.01 * torch.randn(D, generator=g)
    queries[3] = 0
    queries[4] = -table[100].float()  # most scores of this query are far from it; some negative top-k
    bias = torch.randn(v, generator=g)
    return table, queries, bias


def assert_matches(found, expected_ids: np.ndarray, expected_scores: np.ndarray) -> None:
    np.testing.assert_array_equal(found.ids.numpy(), expected_ids)
    np.testing.assert_allclose(found.scores.numpy(), expected_scores, rtol=1e-12, atol=1e-12)


class TestMatchesBruteForce:
    """The lenses promise *exact* top-k: any difference to the float64 reference is a wrong answer
    that a user would read as a finding about the model."""

    @pytest.mark.parametrize("k", [1, 3, 10, V])
    @pytest.mark.parametrize("short_dtype", SHORT_DTYPES, ids=str)
    @pytest.mark.parametrize(("normalize", "with_bias"), SCORINGS, ids=SCORING_IDS)
    @pytest.mark.parametrize("dtype", TABLE_DTYPES, ids=str)
    def test_all_dtypes_scorings_and_k(self, dtype, normalize, with_bias, short_dtype, k):
        for seed in range(2):
            table, queries, bias = make_case(seed, dtype)
            bias = bias if with_bias else None
            search = ExactSearch(table, normalize=normalize, bias=bias, short_dtype=short_dtype)
            found = search.search(queries, k)
            assert found.ids.shape == (N, k)
            assert found.scores.dtype == torch.float64
            assert_matches(found, *brute_force(table, queries, k, normalize=normalize, bias=bias))

    @pytest.mark.parametrize("short_dtype", SHORT_DTYPES, ids=str)
    @pytest.mark.parametrize(("normalize", "with_bias"), SCORINGS, ids=SCORING_IDS)
    def test_tiny_blocks_change_nothing(self, normalize, with_bias, short_dtype):
        """Memory knobs (query blocks, re-rank gathers, table slices) must never change a result, not even a bit."""
        table, queries, bias = make_case(3, torch.bfloat16)
        bias = bias if with_bias else None
        reference = ExactSearch(table, normalize=normalize, bias=bias, short_dtype=short_dtype).search(queries, 10)
        knobs = [(1, 1, V), (1, 3, V), (V * 7 * 3, 2, V), (10**9, 1, V), (10**9, 2048, 7), (V * 7 * 3, 5, 64)]
        for chunk_bytes, rerank_rows, shortlist_rows in knobs:
            search = ExactSearch(
                table,
                normalize=normalize,
                bias=bias,
                short_dtype=short_dtype,
                chunk_bytes=chunk_bytes,
                rerank_rows=rerank_rows,
                shortlist_rows=shortlist_rows,
            )
            found = search.search(queries, 10)
            assert torch.equal(found.ids, reference.ids)
            assert torch.equal(found.scores, reference.scores)
        assert_matches(reference, *brute_force(table, queries, 10, normalize=normalize, bias=bias))

    @pytest.mark.parametrize("shortlist_rows", [7, 64, 10**6])
    def test_candidates_past_the_shortlist_in_table_slices(self, shortlist_rows):
        """Many near-equal rows push a query's candidates past the k + 96 shortlist: the rest of the
        table is scanned, whether its approximate scores were kept (one slice) or must be recomputed."""
        g = torch.Generator().manual_seed(12)
        base = torch.randn(D, generator=g)
        table = base + 1e-3 * torch.randn(V, D, generator=g)  # every row within bf16 rounding of the others
        queries = base[None] + 1e-3 * torch.randn(4, D, generator=g)
        search = ExactSearch(table, normalize=True, short_dtype=torch.bfloat16, shortlist_rows=shortlist_rows)
        found = search.search(queries, 10)
        assert int(found.candidates.min()) > 10 + _SHORTLIST_EXTRA  # the scan beyond the shortlist really ran
        assert_matches(found, *brute_force(table, queries, 10, normalize=True))

    def test_reused_buffers_leave_earlier_results_alone(self):
        """The search keeps scratch buffers between calls: results must not alias them."""
        table, queries, _ = make_case(8, torch.float32)
        search = ExactSearch(table, normalize=True, short_dtype=torch.bfloat16)
        first = search.search(queries, 5)
        kept_ids, kept_scores = first.ids.clone(), first.scores.clone()
        other = search.search(torch.randn(2 * N, D), 7)  # a larger block through the same buffers
        assert torch.equal(first.ids, kept_ids) and torch.equal(first.scores, kept_scores)
        again = search.search(queries, 5)
        assert torch.equal(again.ids, kept_ids) and torch.equal(again.scores, kept_scores)
        assert other.ids.shape == (2 * N, 7)
        assert search._workspace.nbytes > 0

    def test_buffers_made_in_inference_mode_serve_later_calls(self):
        table, queries, _ = make_case(9, torch.float32)
        search = ExactSearch(table, normalize=True, short_dtype=torch.bfloat16)
        with torch.inference_mode():
            inside = search.search(queries, 4)
        outside = search.search(queries, 4)
        with torch.no_grad():
            again = search.search(queries, 4)
        assert torch.equal(inside.ids, outside.ids) and torch.equal(outside.ids, again.ids)

    def test_many_queries_in_many_blocks(self):
        g = torch.Generator().manual_seed(11)
        table = torch.randn(V, D, generator=g)
        queries = torch.randn(101, D, generator=g)
        search = ExactSearch(table, normalize=True, short_dtype=torch.bfloat16, chunk_bytes=V * 7 * 4)
        assert_matches(search.search(queries, 5), *brute_force(table, queries, 5, normalize=True))

    @pytest.mark.parametrize("short_dtype", SHORT_DTYPES, ids=str)
    @pytest.mark.parametrize(("normalize", "with_bias"), SCORINGS, ids=SCORING_IDS)
    @pytest.mark.parametrize("dtype", TABLE_DTYPES, ids=str)
    def test_allowed_subset(self, dtype, normalize, with_bias, short_dtype):
        """Excluded tokens (special, bytes) are implemented as ``allowed``: they must never leak back."""
        table, queries, bias = make_case(5, dtype)
        bias = bias if with_bias else None
        g = torch.Generator().manual_seed(5)
        # keep both members of some tied pairs, and the zero row
        chosen = torch.randperm(V, generator=g)[: V // 3]
        allowed = torch.unique(torch.cat([chosen, torch.tensor([7, 10, 33, 40, 150, 200, 250])]))
        search = ExactSearch(table, normalize=normalize, bias=bias, allowed=allowed, short_dtype=short_dtype)
        assert search.size == allowed.numel()
        for k in (1, 4, allowed.numel()):
            found = search.search(queries, k)
            assert bool(torch.isin(found.ids, allowed).all())
            assert_matches(found, *brute_force(table, queries, k, normalize=normalize, bias=bias, allowed=allowed))
        # k = size: every allowed id exactly once per query
        full = search.search(queries, allowed.numel())
        for row in full.ids:
            assert torch.equal(torch.sort(row).values, allowed)

    @pytest.mark.parametrize("short_dtype", SHORT_DTYPES, ids=str)
    @pytest.mark.parametrize(("normalize", "with_bias"), SCORINGS, ids=SCORING_IDS)
    def test_leading_rows_of_a_larger_table(self, normalize, with_bias, short_dtype):
        """A table larger than its tokenizer: only the leading rows may come back, even when the rows past
        them are the best matches (the queries point at them), in one table slice or several."""
        table, queries, bias = make_case(10, torch.bfloat16)
        bias = bias if with_bias else None
        queries[5:] = table[[260, 271, 285, 299]].float() * 3  # rows past the allowed ones
        allowed = torch.arange(250)
        expected = brute_force(table, queries, 10, normalize=normalize, bias=bias, allowed=allowed)
        for shortlist_rows, rerank_rows in ((V, 2048), (64, 3)):
            search = ExactSearch(
                table,
                normalize=normalize,
                bias=bias,
                allowed=allowed,
                short_dtype=short_dtype,
                shortlist_rows=shortlist_rows,
                rerank_rows=rerank_rows,
            )
            assert search.size == 250
            found = search.search(queries, 10)
            assert int(found.ids.max()) < 250
            assert_matches(found, *expected)

    @pytest.mark.parametrize("shortlist_rows", [6000, 2500, 3001])
    @pytest.mark.parametrize("short_dtype", SHORT_DTYPES, ids=str)
    def test_wide_slices_ranked_by_group_maxima(self, short_dtype, shortlist_rows):
        """Slices wide enough for the grouped top-k (about sqrt(m / width) interleaved column groups, plus
        left-over columns when m is not a multiple): the results must still be the brute force's,
        with duplicate rows (ties) and queries pointing at rows in the left-over columns."""
        g = torch.Generator().manual_seed(21)
        table = torch.randn(6000, 16, generator=g)
        table[5999] = table[17]
        table[4000] = table[3]
        queries = torch.randn(6, 16, generator=g)
        queries[0] = table[17] + 0.05 * torch.randn(16, generator=g)
        queries[1] = table[3]
        queries[2] = table[5998] * 2
        for k in (1, 5, 40):
            found = ExactSearch(table, normalize=True, short_dtype=short_dtype, shortlist_rows=shortlist_rows).search(
                queries, k
            )
            assert_matches(found, *brute_force(table, queries, k, normalize=True))

    def test_group_maxima_keep_the_largest_values(self):
        """``_slice_top`` returns the width largest values of each row, whatever the layout of ties."""
        g = torch.Generator().manual_seed(22)
        scores = torch.randn(5, 5003, generator=g).bfloat16()
        scores[1] = 0.5  # every column tied
        scores[2, ::7] = 3.0  # many ties at the top, spread over the groups
        scores[3, -3:] = 9.0  # the best in the left-over columns
        for width in (1, 20, 100):
            values, columns = _slice_top(scores, width)
            expected = torch.topk(scores, width, dim=1).values
            assert torch.equal(torch.sort(values, dim=1, descending=True).values, expected)
            assert torch.equal(torch.gather(scores, 1, columns), values)
            assert all(len(set(row)) == width for row in columns.tolist())

    @pytest.mark.parametrize("spread", [1e-5, 1e-4, 3e-3, 3e-2])
    @pytest.mark.parametrize("normalize", [True, False], ids=["cosine", "inner"])
    @pytest.mark.parametrize("short_dtype", SHORT_DTYPES, ids=str)
    def test_rows_the_short_type_cannot_tell_apart(self, normalize, short_dtype, spread):
        """Near-duplicate rows collapse (or swap order) in the short type; only a correct error bound
        keeps the right rows for the exact re-rank."""
        for seed in range(3):
            g = torch.Generator().manual_seed(seed)
            base = torch.randn(D, generator=g)
            table = base + spread * torch.randn(V, D, generator=g)
            queries = base + spread * torch.randn(4, D, generator=g)
            found = ExactSearch(table, normalize=normalize, short_dtype=short_dtype).search(queries, 20)
            assert_matches(found, *brute_force(table, queries, 20, normalize=normalize))

    @pytest.mark.parametrize("with_bias", [False, True], ids=["inner", "inner+bias"])
    @pytest.mark.parametrize("short_dtype", SHORT_DTYPES, ids=str)
    def test_all_scores_negative_and_large(self, with_bias, short_dtype):
        """The candidate cutoff is derived separately for negative scores; large logits stress the bound."""
        g = torch.Generator().manual_seed(2)
        direction = torch.randn(D, generator=g)
        table = (torch.randn(V, D, generator=g).abs() * direction.sign() + 0.1 * direction) * 300
        queries = -(direction + 0.1 * torch.randn(5, D, generator=g)) * 50
        bias = torch.randn(V, generator=g) * 1000 - 1e4 if with_bias else None
        found = ExactSearch(table, normalize=False, bias=bias, short_dtype=short_dtype).search(queries, 7)
        assert bool((found.scores < 0).all())
        assert_matches(found, *brute_force(table, queries, 7, normalize=False, bias=bias))

    def test_no_queries(self):
        table, _, _ = make_case(0, torch.float32)
        found = ExactSearch(table, normalize=True).search(torch.zeros(0, D), 4)
        assert found.ids.shape == (0, 4)
        assert found.scores.shape == (0, 4)

    def test_candidates_cover_k(self):
        table, queries, _ = make_case(0, torch.float32)
        found = ExactSearch(table, normalize=True, short_dtype=torch.bfloat16).search(queries, 6)
        assert found.candidates.shape == (N,)
        assert bool((found.candidates >= 6).all())


class TestTies:
    """Ties are real in vocabularies (duplicate or rescaled rows); a documented rule (lower id first)
    keeps results reproducible across machines, dtypes and block sizes."""

    @pytest.mark.parametrize("short_dtype", SHORT_DTYPES, ids=str)
    @pytest.mark.parametrize("normalize", [True, False], ids=["cosine", "inner"])
    @pytest.mark.parametrize("dtype", TABLE_DTYPES, ids=str)
    def test_duplicate_rows_lower_id_first(self, dtype, normalize, short_dtype):
        table, queries, _ = make_case(4, dtype)
        found = ExactSearch(table, normalize=normalize, short_dtype=short_dtype).search(queries, 2)
        # query 0 == row 200 == row 10: the copy with the lower id comes first, with the same score
        assert found.ids[0].tolist() == [10, 200]
        assert found.scores[0, 0] == found.scores[0, 1]
        if normalize:
            # query 2 is near row 40 == row 250
            assert found.ids[2].tolist() == [40, 250]

    @pytest.mark.parametrize("short_dtype", SHORT_DTYPES, ids=str)
    @pytest.mark.parametrize("rerank_rows", [1, 2048])
    def test_all_rows_identical(self, short_dtype, rerank_rows):
        table = torch.randn(1, D).expand(50, D).contiguous()
        search = ExactSearch(table, normalize=True, short_dtype=short_dtype, rerank_rows=rerank_rows)
        found = search.search(torch.randn(3, D), 50)
        assert found.ids.tolist() == [list(range(50))] * 3

    @pytest.mark.parametrize("short_dtype", SHORT_DTYPES, ids=str)
    @pytest.mark.parametrize("scale", [2.0, 0.25, 3.0, 1.5, 0.75, 5.0])
    def test_scaled_duplicate_rows_under_cosine(self, scale, short_dtype):
        """``c * e`` (c > 0) has exactly the cosine of ``e``: the lower id must come first.

        The rows are rounded to bfloat16 first, so ``c * e`` is exactly representable: the tie is exact
        in real arithmetic, and the scaled copy deliberately gets the *higher* id.
        """
        wrong = []
        for seed in range(20):
            g = torch.Generator().manual_seed(seed)
            table = torch.randn(50, 16, generator=g).bfloat16().float()
            table[30] = table[7] * scale
            assert torch.equal(table[30].double(), table[7].double() * scale)  # exact copy of the direction
            query = table[7:8] + 0.01 * torch.randn(1, 16, generator=g)
            found = ExactSearch(table, normalize=True, short_dtype=short_dtype).search(query, 2)
            if found.ids[0].tolist() != [7, 30]:
                wrong.append((seed, found.ids[0].tolist(), found.scores[0].tolist()))
        assert not wrong, f"scaled duplicate ({scale} x row 7 at id 30) not ranked lower-id-first: {wrong}"

    @pytest.mark.parametrize("short_dtype", SHORT_DTYPES, ids=str)
    def test_power_of_two_scaled_rows_in_random_table(self, short_dtype):
        table, queries, _ = make_case(6, torch.float32)
        found = ExactSearch(table, normalize=True, short_dtype=short_dtype).search(queries, 3)
        # query 1 points along row 150 == row 7 / 2: cosine tie, id 7 first
        assert found.ids[1, :2].tolist() == [7, 150]
        assert found.scores[1, 0] == found.scores[1, 1]

    @pytest.mark.parametrize("short_dtype", SHORT_DTYPES, ids=str)
    def test_zero_rows_and_zero_queries_under_cosine(self, short_dtype):
        """Zero vectors have no direction: they score 0 against everything (not NaN, not an error)."""
        table, queries, _ = make_case(7, torch.float32)
        search = ExactSearch(table, normalize=True, short_dtype=short_dtype)
        everything = search.search(queries, V)
        assert bool(torch.isfinite(everything.scores).all())
        position = (everything.ids == 33).nonzero()[:, 1]
        scores_of_zero_row = everything.scores[torch.arange(N), position]
        assert bool((scores_of_zero_row == 0).all())
        # the zero query ties with every row: ids in order
        assert everything.ids[3].tolist() == list(range(V))
        assert bool((everything.scores[3] == 0).all())

    def test_zero_query_with_allowed_returns_first_allowed_ids(self):
        table, _, _ = make_case(7, torch.float32)
        allowed = torch.arange(100, 200)
        found = ExactSearch(table, normalize=True, allowed=allowed).search(torch.zeros(1, D), 5)
        assert found.ids[0].tolist() == [100, 101, 102, 103, 104]


class TestErrors:
    """Bad arguments must fail loudly instead of returning plausible-looking garbage."""

    @pytest.fixture
    def search(self) -> ExactSearch:
        table, _, _ = make_case(0, torch.float32)
        return ExactSearch(table, normalize=True)

    @pytest.mark.parametrize("k", [0, -1, V + 1])
    def test_k_out_of_range(self, search, k):
        with pytest.raises(ValueError, match="k must be"):
            search.search(torch.randn(2, D), k)

    def test_k_larger_than_allowed(self):
        table, _, _ = make_case(0, torch.float32)
        search = ExactSearch(table, normalize=True, allowed=torch.arange(10))
        search.search(torch.randn(1, D), 10)
        with pytest.raises(ValueError, match="k must be"):
            search.search(torch.randn(1, D), 11)

    @pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
    def test_non_finite_query(self, search, bad):
        queries = torch.randn(3, D)
        queries[1, 5] = bad
        with pytest.raises(ValueError, match="NaN or infinite"):
            search.search(queries, 3)

    def test_wrong_query_shape(self, search):
        with pytest.raises(ValueError, match="queries must be"):
            search.search(torch.randn(2, D + 1), 3)
        with pytest.raises(ValueError, match="queries must be"):
            search.search(torch.randn(D), 3)

    def test_table_must_be_2d(self):
        with pytest.raises(ValueError, match="table must be"):
            ExactSearch(torch.randn(D), normalize=True)

    def test_bias_with_cosine(self):
        with pytest.raises(ValueError, match="bias"):
            ExactSearch(torch.randn(5, D), normalize=True, bias=torch.randn(5))

    @pytest.mark.parametrize("allowed", [[3, 1, 2], [1, 1, 2]])
    def test_allowed_must_be_sorted_unique(self, allowed):
        with pytest.raises(ValueError, match="sorted and unique"):
            ExactSearch(torch.randn(5, D), normalize=True, allowed=torch.tensor(allowed))
