"""Llama's KV-policy API: kv_policy / kv_budget / kv_policy_params, kv_stats, kv_selection.

The name/key validation is pure Python; the rest needs a library with the KV-policy calls of
clusterkv.h and skips (saying so) when the loaded build predates them.
"""
import numpy as np
import pytest

from conftest import N_THREADS, require_native

_ffi = require_native()
from clusterkv_local import Llama  # noqa: E402
from clusterkv_local._internals import KV_POLICIES, kv_policies_available  # noqa: E402
from clusterkv_local.llama import kv_policy_settings  # noqa: E402

lib = _ffi.lib
needs_policies = pytest.mark.skipif(not kv_policies_available(),
                                    reason="libclusterkv built without the KV-policy calls")

PROMPT = (b"The history of caches begins with the observation that programs reuse data. "
          b"A small fast memory in front of a large slow one pays off when accesses repeat, "
          b"and every level of the hierarchy follows the same rule. ") * 3


def test_policy_names_map_to_the_header_enum():
    assert KV_POLICIES == {"full": lib.CKV_KV_POLICY_FULL,
                           "streaming": lib.CKV_KV_POLICY_STREAMING,
                           "quest": lib.CKV_KV_POLICY_QUEST, "h2o": lib.CKV_KV_POLICY_H2O,
                           "clusterkv": lib.CKV_KV_POLICY_CLUSTERKV}
    assert (KV_POLICIES["full"], KV_POLICIES["streaming"], KV_POLICIES["quest"],
            KV_POLICIES["h2o"], KV_POLICIES["clusterkv"]) == (0, 1, 2, 3, 4)


def test_settings_map_keywords_to_struct_fields():
    assert kv_policy_settings() == {"policy": 0}
    assert kv_policy_settings("CLUSTERKV", 1024, {
        "n_sink": 8, "n_dense_layers": 1, "recluster_interval": 160, "tokens_per_cluster": 40,
        "kmeans_iters": 5, "seed": 7, "select_per_kv_head": True}) == {
        "policy": 4, "budget": 1024, "n_sink": 8, "n_dense_layers": 1,
        "recluster_interval": 160, "tokens_per_cluster": 40, "kmeans_iters": 5, "seed": 7,
        "select_per_kv_head": 1}
    assert kv_policy_settings("quest", 256, {"page_size": 32}) == {
        "policy": 2, "budget": 256, "page_size": 32}
    assert kv_policy_settings("h2o", 512, {"recent_ratio": 0.25}) == {
        "policy": 3, "budget": 512, "recent_ratio": 0.25}
    # kmeans_init by name (enum ckv_kmeans_init) or number
    assert kv_policy_settings("clusterkv", 1024, {"kmeans_init": "Strided"}) == {
        "policy": 4, "budget": 1024, "kmeans_init": 1}
    assert kv_policy_settings("clusterkv", 1024, {"kmeans_init": "random"})["kmeans_init"] == 0
    assert kv_policy_settings("clusterkv", 1024, {"kmeans_init": 1})["kmeans_init"] == 1


@pytest.mark.parametrize("args, words", [
    (("lru", None, None), ["unknown kv_policy 'lru'", "full, streaming, quest, h2o, clusterkv"]),
    (("clusterkv", 512, {"n_clusters": 4}), ["unknown kv_policy_params key 'n_clusters'",
                                             "tokens_per_cluster"]),
    (("quest", 512, {"tokens_per_cluster": 40}), ["not used by kv_policy='quest'",
                                                  "used by clusterkv", "page_size"]),
    (("streaming", 512, {"recent_ratio": 0.3}), ["used by h2o", "n_sink, n_dense_layers"]),
    (("full", 512, None), ["kv_budget does not apply", "clusterkv"]),
    (("full", None, {"n_sink": 4}), ["not used by kv_policy='full'", "none"]),
    (("clusterkv", 512, {"budget": 5}), ["kv_budget argument"]),
    (("clusterkv", 512, {"kmeans_init": "kmeans++"}), ["unknown 'kmeans++'", "random, strided"]),
])
def test_bad_names_keys_and_combinations_raise_value_error(args, words):
    with pytest.raises(ValueError) as info:
        kv_policy_settings(*args)
    for word in words:
        assert word in str(info.value)


def test_llama_validates_before_loading(default_model_path):
    with pytest.raises(ValueError, match="valid policies"):
        Llama(default_model_path, kv_policy="sparse", verbose=False)
    with pytest.raises(TypeError, match="must be an int"):
        Llama(default_model_path, kv_policy="quest", kv_budget=1.5, verbose=False)


def _open(path, **kv):
    return Llama(path, n_ctx=512, n_threads=N_THREADS, seed=1, verbose=False, **kv)


@needs_policies
def test_native_range_errors_surface_as_value_error(default_model_path):
    with pytest.raises(ValueError, match="budget"):
        _open(default_model_path, kv_policy="clusterkv", kv_budget=-3)
    with pytest.raises(ValueError, match="page_size"):
        _open(default_model_path, kv_policy="quest", kv_budget=256,
              kv_policy_params={"page_size": 0})


@needs_policies
def test_kv_policy_reports_defaults_and_overrides(default_model_path):
    with _open(default_model_path, kv_policy="clusterkv", kv_budget=400,
               kv_policy_params={"tokens_per_cluster": 40}) as llm:
        settings = llm.kv_policy
    assert settings["policy"] == "clusterkv"
    assert settings["budget"] == 400 and settings["tokens_per_cluster"] == 40
    assert settings["recluster_interval"] == 320
    assert settings["n_sink"] == 16 and settings["n_dense_layers"] == 2  # header defaults


@needs_policies
def test_kv_stats_shape_and_counts(default_model_path):
    with _open(default_model_path, kv_policy="clusterkv", kv_budget=64,
               kv_policy_params={"recluster_interval": 32}) as llm:
        info = llm.model_info
        tokens = llm.tokenize(PROMPT)
        llm.eval(tokens)
        for t in tokens[:5]:
            llm.eval([t])
        stats = llm.kv_stats()
        assert set(stats) == {"n_steps", "n_attended", "n_cached", "density", "t_cluster_ms",
                              "t_select_ms", "n_clusters", "clusters", "n_fetched"}
        assert stats["n_steps"] == 5 and stats["n_fetched"] == 0   # nothing offloaded
        assert len(stats["clusters"]) == info.n_layer
        assert all(len(row) == info.n_head_kv for row in stats["clusters"])
        assert all(n == 0 for row in stats["clusters"][:2] for n in row)  # dense layers
        assert sum(map(sum, stats["clusters"])) == stats["n_clusters"] > 0
        assert 0 < stats["n_attended"] < stats["n_cached"]
        assert stats["density"] == pytest.approx(stats["n_attended"] / stats["n_cached"])
        assert stats["t_cluster_ms"] >= 0 and stats["t_select_ms"] >= 0
        selection = llm.kv_selection(10, 0)
        assert selection.dtype == np.int32
        # 64 sinks + clusters, the unclustered tail (< 32 positions) on top
        assert len(selection) <= 64 + 32 and len(set(selection.tolist())) == len(selection)
        assert set(range(16)) <= set(selection.tolist())       # sinks
        assert llm.n_tokens - 1 in selection                    # the current position
        dense = llm.kv_selection(0, 0)                          # a dense layer: everything
        assert sorted(dense.tolist()) == list(range(llm.n_tokens))
        with pytest.raises(ValueError, match="layer must be in"):
            llm.kv_selection(info.n_layer, 0)
        llm.reset_kv_stats()
        assert llm.kv_stats()["n_steps"] == 0


def _decode_logits(llm, tokens, n_steps):
    llm.reset()
    llm.eval(tokens)
    rows = []
    for t in tokens[:n_steps]:
        llm.eval([t])
        rows.append(np.array(llm.scores[llm.n_tokens - 1]))
    return np.stack(rows)


@needs_policies
@pytest.mark.parametrize("policy", ["streaming", "quest", "h2o", "clusterkv"])
def test_budget_covering_the_context_gives_the_full_logits(default_model_path, policy):
    """budget >= every cached position: each step attends everything, as `full` does."""
    with _open(default_model_path) as full:
        tokens = full.tokenize(PROMPT)
        expected = _decode_logits(full, tokens, 12)
    with _open(default_model_path, kv_policy=policy, kv_budget=512) as llm:
        got = _decode_logits(llm, tokens, 12)
        assert llm.kv_stats()["n_steps"] == 12
        assert sorted(llm.kv_selection(5, 0).tolist()) == list(range(llm.n_tokens))
    np.testing.assert_array_equal(got, expected)


@needs_policies
def test_kv_memory_and_offload_checks_on_the_cpu(default_model_path):
    """kv_memory() of a CPU context is its whole cache, in host memory; kv_offload (a GPU
    context's option) is refused on the CPU with the reason, and must be a bool."""
    from clusterkv_local import UnsupportedError

    with Llama(default_model_path, n_ctx=256, n_threads=N_THREADS, verbose=False) as llm:
        info = llm._info
        mem = llm.kv_memory()
        assert mem == {"device_kv": 0, "device_policy": 0,
                       "host_kv": 2 * info.n_layer * info.n_head_kv * 256 * info.head_dim * 2}
        assert llm.kv_stats()["n_fetched"] == 0
    with pytest.raises(UnsupportedError, match="kv_offload moves a GPU context's KV cache"):
        Llama(default_model_path, n_ctx=256, kv_policy="clusterkv", kv_offload=True, verbose=False)
    with pytest.raises(TypeError, match="kv_offload must be a bool"):
        Llama(default_model_path, n_ctx=256, kv_offload=1, verbose=False)
