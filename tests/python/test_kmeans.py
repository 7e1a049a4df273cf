"""ClusterKV building blocks against independent references: ckv_kmeans_cosine against a numpy
implementation of the algorithm documented in native/src/kmeans.h (same init rows -> same labels,
centroids within float rounding), its seeded init against a Python replica of the splitmix64 +
partial Fisher-Yates draw, and ckv_cluster_select against a brute-force sort-and-walk.
"""
import numpy as np
import pytest

from conftest import require_native

_ffi = require_native()
ffi, lib = _ffi.ffi, _ffi.lib

MASK64 = (1 << 64) - 1


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------

def kmeans_reference(x, k, max_iter, init_rows):
    """Cosine k-means as kmeans.h documents it, in float64: returns (centroids f32, labels,
    n_iter)."""
    x64 = x.astype(np.float64)
    xnorm = np.linalg.norm(x64, axis=1, keepdims=True)
    xn = np.divide(x64, xnorm, out=np.zeros_like(x64), where=xnorm > 0)
    cent = x[np.asarray(init_rows)].astype(np.float32).copy()

    def assign():
        c64 = cent.astype(np.float64)
        cnorm = np.linalg.norm(c64, axis=1, keepdims=True)
        cn = np.divide(c64, cnorm, out=np.zeros_like(c64), where=cnorm > 0)
        return np.argmax(xn @ cn.T, axis=1)          # first maximum: the lowest index

    labels = assign()
    n_iter = 0
    while n_iter < max_iter:
        for j in range(k):
            members = labels == j
            if members.any():                         # an empty cluster keeps its centroid
                cent[j] = (x64[members].sum(axis=0) / members.sum()).astype(np.float32)
        n_iter += 1
        new = assign()
        if np.array_equal(new, labels):
            break
        labels = new
    return cent, labels, n_iter


def splitmix64_init_rows(seed, n, k):
    """Python replica of kmeans_init_rows: splitmix64 stream + partial Fisher-Yates."""
    state = seed & MASK64
    perm = list(range(n))
    for i in range(k):
        state = (state + 0x9E3779B97F4A7C15) & MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        r = z ^ (z >> 31)
        j = i + (((r >> 32) * (n - i)) >> 32)
        perm[i], perm[j] = perm[j], perm[i]
    return perm[:k]


def select_reference(scores, sizes, budget):
    """Descending score, ties lowest index (NaN last); take clusters while the total is below
    the budget."""
    keyed = [(-np.inf if np.isnan(s) else s, c) for c, s in enumerate(scores)]
    order = [c for _, c in sorted(keyed, key=lambda t: (-t[0], t[1]))]
    chosen, total = [], 0
    for c in order:
        if total >= budget:
            break
        chosen.append(c)
        total += sizes[c]
    return chosen


# ---------------------------------------------------------------------------------------------
# Native calls
# ---------------------------------------------------------------------------------------------

def last_error():
    return ffi.string(lib.ckv_last_error()).decode(errors="replace")


def kmeans_native(x, k, max_iter, init_rows=None, seed=0):
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    cent = np.zeros((k, d), np.float32)
    labels = np.full(n, -7, np.int32)
    n_iter = ffi.new("int32_t *")
    rows = ffi.NULL
    if init_rows is not None:
        rows_arr = np.ascontiguousarray(init_rows, dtype=np.int32)
        rows = ffi.cast("const int32_t *", rows_arr.ctypes.data)
    status = lib.ckv_kmeans_cosine(ffi.cast("const float *", x.ctypes.data), n, d, k, max_iter,
                                   seed, rows, ffi.cast("float *", cent.ctypes.data),
                                   ffi.cast("int32_t *", labels.ctypes.data), n_iter)
    assert status == 0, last_error()
    return cent, labels, n_iter[0]


def select_native(scores, sizes, budget):
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    sizes = np.ascontiguousarray(sizes, dtype=np.int32)
    chosen = np.full(max(len(scores), 1), -1, np.int32)
    n_chosen = ffi.new("int32_t *")
    status = lib.ckv_cluster_select(ffi.cast("const float *", scores.ctypes.data),
                                    ffi.cast("const int32_t *", sizes.ctypes.data), len(scores),
                                    budget, ffi.cast("int32_t *", chosen.ctypes.data), n_chosen)
    return status, chosen[:n_chosen[0]].tolist()


def heavy_tailed_keys(rng, n, d):
    """Key-like rows: a shared offset, a few high-magnitude outlier channels, noise."""
    x = rng.standard_normal((n, d)).astype(np.float32)
    x += rng.standard_normal(d).astype(np.float32) * 2
    x[:, :3] *= 8
    return x


# ---------------------------------------------------------------------------------------------
# k-means
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,d,k,seed", [(500, 64, 8, 1), (1000, 64, 13, 2), (257, 32, 40, 3),
                                        (300, 7, 5, 4), (2000, 64, 25, 5)])
def test_kmeans_matches_numpy_reference(n, d, k, seed):
    rng = np.random.default_rng(seed)
    x = heavy_tailed_keys(rng, n, d) if seed % 2 else rng.standard_normal((n, d)).astype(np.float32)
    init = rng.choice(n, size=k, replace=False)
    ref_c, ref_l, ref_it = kmeans_reference(x, k, 20, init)
    c, labels, it = kmeans_native(x, k, 20, init_rows=init)
    np.testing.assert_array_equal(labels, ref_l)
    assert it == ref_it
    np.testing.assert_allclose(c, ref_c, rtol=1e-6, atol=1e-6)


def test_kmeans_centroids_are_plain_means_after_convergence():
    rng = np.random.default_rng(11)
    x = heavy_tailed_keys(rng, 800, 64)
    c, labels, it = kmeans_native(x, 10, 200, seed=5)
    assert it < 200
    for j in range(10):
        members = x[labels == j].astype(np.float64)
        if len(members):
            np.testing.assert_allclose(c[j], members.mean(axis=0), rtol=1e-5, atol=1e-6)
    # converged: every row is at its highest-cosine centroid
    cn = c / np.linalg.norm(c, axis=1, keepdims=True)
    np.testing.assert_array_equal(labels, np.argmax(x @ cn.T, axis=1))


def test_kmeans_seeded_init_is_the_documented_draw():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((333, 16)).astype(np.float32)
    for seed in (0, 1, 12345, 2**32 - 1):
        rows = splitmix64_init_rows(seed, 333, 9)
        assert len(set(rows)) == 9
        seeded = kmeans_native(x, 9, 20, seed=seed)
        explicit = kmeans_native(x, 9, 20, init_rows=rows)
        np.testing.assert_array_equal(seeded[1], explicit[1])
        np.testing.assert_array_equal(seeded[0], explicit[0])
    # different seeds give different initialisations
    assert splitmix64_init_rows(0, 333, 9) != splitmix64_init_rows(1, 333, 9)
    # max_iter 1 with the seeded draw: one update of the centroids from the init
    ref_c, ref_l, _ = kmeans_reference(x, 9, 1, splitmix64_init_rows(42, 333, 9))
    c, labels, it = kmeans_native(x, 9, 1, seed=42)
    assert it == 1
    np.testing.assert_array_equal(labels, ref_l)
    np.testing.assert_allclose(c, ref_c, rtol=1e-6, atol=1e-6)


def test_kmeans_early_stop_on_separable_data():
    rng = np.random.default_rng(3)
    directions = rng.standard_normal((4, 32)).astype(np.float32) * 10
    x = np.repeat(directions, 50, axis=0) + rng.standard_normal((200, 32)).astype(np.float32) * 0.1
    init = [0, 50, 100, 150]                    # one row of each group
    c, labels, it = kmeans_native(x, 4, 20, init_rows=init)
    assert it == 1                              # the first update already changes nothing
    np.testing.assert_array_equal(labels, np.repeat(np.arange(4), 50))
    np.testing.assert_allclose(c, x.reshape(4, 50, 32).mean(axis=1), rtol=1e-5, atol=1e-5)


def test_kmeans_is_scale_invariant_per_row():
    # cosine assignment: scaling a row by a positive factor never changes its label
    rng = np.random.default_rng(9)
    x = rng.standard_normal((400, 64)).astype(np.float32)
    init = np.arange(0, 400, 40)
    _, labels, _ = kmeans_native(x, 10, 1, init_rows=init)
    scaled = x * rng.uniform(0.5, 2.0, size=(400, 1)).astype(np.float32)
    ref_c, ref_l, _ = kmeans_reference(scaled, 10, 1, init)
    _, scaled_labels, _ = kmeans_native(scaled, 10, 1, init_rows=init)
    np.testing.assert_array_equal(scaled_labels, ref_l)


def test_kmeans_k_equals_n_and_k_one():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((37, 24)).astype(np.float32)
    c, labels, it = kmeans_native(x, 37, 20, init_rows=np.arange(37))
    np.testing.assert_array_equal(labels, np.arange(37))     # every row its own centroid
    np.testing.assert_array_equal(c, x)
    assert it == 1
    c, labels, it = kmeans_native(x, 1, 20, seed=3)
    assert (labels == 0).all() and it == 1
    np.testing.assert_allclose(c[0], x.astype(np.float64).mean(axis=0), rtol=1e-5, atol=1e-6)


def test_kmeans_many_clusters_no_cap():
    # far beyond the reference code's 256-cluster limit, and not a multiple of the 16-wide tile
    rng = np.random.default_rng(21)
    x = heavy_tailed_keys(rng, 3000, 64)
    init = rng.choice(3000, size=301, replace=False)
    ref_c, ref_l, ref_it = kmeans_reference(x, 301, 3, init)
    c, labels, it = kmeans_native(x, 301, 3, init_rows=init)
    np.testing.assert_array_equal(labels, ref_l)
    assert it == ref_it == 3
    np.testing.assert_allclose(c, ref_c, rtol=1e-6, atol=1e-6)
    assert labels.max() > 256


def test_kmeans_ties_and_duplicates_go_to_lowest_index():
    x = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], np.float32)
    # duplicate init rows: identical centroids, so the first assignment gives every row to
    # centroid 0; the update moves it to the mean (0.5, 0.5) and centroid 1 (empty) stays at
    # (1, 0), which then wins row 0 back
    c, labels, it = kmeans_native(x, 2, 20, init_rows=[0, 0])
    assert labels.tolist() == [1, 0, 0, 0] and it == 2
    ref_c, ref_l, ref_it = kmeans_reference(x, 2, 20, [0, 0])
    np.testing.assert_array_equal(labels, ref_l)
    np.testing.assert_allclose(c, ref_c, rtol=1e-6)
    # the zero row scores 0 against everything: lowest index
    _, labels, _ = kmeans_native(x[[3, 0, 1]], 3, 1, init_rows=[1, 2, 0])
    assert labels[0] == 0


@pytest.mark.parametrize("n,d,k,max_iter,rows,needle", [
    (10, 4, 0, 20, None, "k must be in [1, n = 10]"),
    (10, 4, 11, 20, None, "k must be in [1, n = 10]"),
    (10, 0, 2, 20, None, "d (0) must be >= 1"),
    (0, 4, 1, 20, None, "n (0)"),
    (10, 4, 2, 0, None, "max_iter must be >= 1"),
    (10, 4, 2, 20, [0, 10], "init_rows[1] = 10"),
    (10, 4, 2, 20, [-1, 3], "init_rows[0] = -1"),
])
def test_kmeans_invalid_args(n, d, k, max_iter, rows, needle):
    x = np.zeros((max(n, 1), max(d, 1)), np.float32)
    cent = np.zeros((max(k, 1), max(d, 1)), np.float32)
    labels = np.zeros(max(n, 1), np.int32)
    rows_arr = np.asarray(rows if rows is not None else [0], np.int32)
    status = lib.ckv_kmeans_cosine(ffi.cast("const float *", x.ctypes.data), n, d, k, max_iter, 0,
                                   ffi.cast("const int32_t *", rows_arr.ctypes.data) if rows else ffi.NULL,
                                   ffi.cast("float *", cent.ctypes.data),
                                   ffi.cast("int32_t *", labels.ctypes.data), ffi.NULL)
    assert status == lib.CKV_ERR_INVALID_ARG
    assert needle in last_error()
    status = lib.ckv_kmeans_cosine(ffi.NULL, 10, 4, 2, 20, 0, ffi.NULL,
                                   ffi.cast("float *", cent.ctypes.data),
                                   ffi.cast("int32_t *", labels.ctypes.data), ffi.NULL)
    assert status == lib.CKV_ERR_INVALID_ARG and "must not be NULL" in last_error()


# ---------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------

def test_select_matches_brute_force_random():
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(1, 400))
        # coarse scores make ties common; a few sizes are zero
        scores = np.round(rng.standard_normal(n) * 3) / 2 if trial % 2 else rng.standard_normal(n)
        sizes = rng.integers(0, 160, size=n)
        budget = int(rng.integers(0, int(sizes.sum()) + 200))
        status, chosen = select_native(scores, sizes, budget)
        assert status == 0, last_error()
        assert chosen == select_reference(scores.astype(np.float32), sizes, budget)
        total = int(sizes[chosen].sum())
        # the taken clusters cover the budget, and all but the last one fit inside it
        assert total >= min(budget, int(sizes.sum()))
        if chosen:
            assert total - sizes[chosen[-1]] < budget


def test_select_exact_order_and_ties():
    scores = [1.0, 3.0, 3.0, 2.0, float("nan"), 3.0]
    sizes = [10, 10, 10, 10, 10, 10]
    assert select_native(scores, sizes, 1000)[1] == [1, 2, 5, 3, 0, 4]
    assert select_native(scores, sizes, 25)[1] == [1, 2, 5]     # the last one is cut by the caller
    assert select_native(scores, sizes, 20)[1] == [1, 2]
    assert select_native(scores, sizes, 1)[1] == [1]
    assert select_native(scores, sizes, 0)[1] == []


def test_select_beyond_256_clusters():
    # the reference kernel silently ignored clusters >= 256 and mis-sorted past 128
    rng = np.random.default_rng(4)
    scores = rng.standard_normal(1000).astype(np.float32)
    scores[[300, 777, 999]] = [10, 11, 12]
    status, chosen = select_native(scores, np.full(1000, 80), 240)
    assert status == 0 and chosen == [999, 777, 300]


def test_select_invalid_args():
    status, _ = select_native([1.0, 2.0], [3, 4], -1)
    assert status == lib.CKV_ERR_INVALID_ARG and "budget (-1)" in last_error()
    status, _ = select_native([1.0, 2.0], [3, -4], 5)
    assert status == lib.CKV_ERR_INVALID_ARG and "sizes[1] = -4" in last_error()
    n_chosen = ffi.new("int32_t *")
    assert lib.ckv_cluster_select(ffi.NULL, ffi.NULL, 3, 5, ffi.NULL, n_chosen) == lib.CKV_ERR_INVALID_ARG
    assert lib.ckv_cluster_select(ffi.NULL, ffi.NULL, 0, 5, ffi.NULL, n_chosen) == 0
    assert n_chosen[0] == 0
