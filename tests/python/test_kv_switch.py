"""Switching the KV policy of a context that holds a prompt (ckv_context_set_kv_policy,
Llama.set_kv_policy): since prefill is dense, a prompt prefilled under `full` and then switched
must give bit-identical decode logits to a context created with the new policy and prefilled the
same way. The eval harness relies on this to prefill each case once for every policy.
"""
import numpy as np
import pytest

from conftest import N_THREADS, require_native

require_native()
from clusterkv_local import Llama  # noqa: E402
from clusterkv_local._internals import kv_policies_available  # noqa: E402

pytestmark = pytest.mark.skipif(not kv_policies_available(),
                                reason="libclusterkv built without the KV-policy calls")

N_CTX = 1024
TEXT = (b"Caches work because programs reuse data: a small fast memory in front of a large slow "
        b"one pays off when accesses repeat. Line 17 of the ledger says the harbor opened in "
        b"1893, and the copper mine closed in 1921. ") * 14
# Sparse at this prompt length (about 600 tokens): the budget is well below the context.
CONFIGS = {
    "clusterkv": (256, {"recluster_interval": 64, "tokens_per_cluster": 32}),
    "quest": (128, {"page_size": 16}),
    "streaming": (128, None),
}


def _open(path, policy="full", budget=None, params=None):
    return Llama(path, n_ctx=N_CTX, n_threads=N_THREADS, verbose=False, kv_policy=policy,
                 kv_budget=budget, kv_policy_params=params)


def _decode_rows(llm, tokens):
    """Logits after each of tokens, fed one decode step at a time."""
    rows = []
    for t in tokens:
        llm.eval([t])
        rows.append(np.array(llm.scores[llm.n_tokens - 1]))
    return np.stack(rows)


@pytest.fixture(scope="module")
def prompt(default_model_path):
    with _open(default_model_path) as llm:
        tokens = llm.tokenize(TEXT)
    assert 500 < len(tokens) < N_CTX - 32
    return tokens[:-12], tokens[-12:]  # prefilled context, then decode steps


@pytest.fixture(scope="module")
def native_rows(default_model_path, prompt):
    """Per policy: decode logits of a context created with it, and its last selection size."""
    context, steps = prompt
    out = {}
    for name, (budget, params) in CONFIGS.items():
        with _open(default_model_path, name, budget, params) as llm:
            llm.eval(context)
            rows = _decode_rows(llm, steps)
            out[name] = (rows, len(llm.kv_selection(5, 0)))
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_switch_after_prefill_equals_a_context_created_with_the_policy(
        default_model_path, prompt, native_rows, name):
    context, steps = prompt
    budget, params = CONFIGS[name]
    with _open(default_model_path) as llm:
        llm.eval(context)
        llm.set_kv_policy(name, budget, params)
        assert llm.kv_policy["policy"] == name and llm.kv_policy["budget"] == budget
        rows = _decode_rows(llm, steps)
        n_selected = len(llm.kv_selection(5, 0))
    expected, expected_selected = native_rows[name]
    tail = (params or {}).get("recluster_interval", 0)  # clusterkv's tail is on top of it
    assert n_selected == expected_selected <= budget + tail < len(context)  # sparse, same lists
    np.testing.assert_array_equal(rows, expected)


def test_switch_truncate_switch_again_as_the_eval_harness_does(default_model_path, prompt,
                                                               native_rows):
    """full prefill -> clusterkv decode -> back to the prompt -> quest: still identical."""
    context, steps = prompt
    with _open(default_model_path) as llm:
        llm.eval(context)
        llm.set_kv_policy("clusterkv", *CONFIGS["clusterkv"])
        first = _decode_rows(llm, steps)
        llm.n_tokens = len(context)  # drop the decoded steps, keep the prompt
        llm.set_kv_policy("quest", *CONFIGS["quest"])
        second = _decode_rows(llm, steps)
        assert llm.kv_stats()["n_steps"] == len(steps)  # stats restart with the new policy
    np.testing.assert_array_equal(first, native_rows["clusterkv"][0])
    np.testing.assert_array_equal(second, native_rows["quest"][0])


def test_switch_back_to_full_is_exact(default_model_path, prompt):
    context, steps = prompt
    with _open(default_model_path) as llm:
        llm.eval(context)
        reference = _decode_rows(llm, steps)
        llm.n_tokens = len(context)
        llm.set_kv_policy("streaming", 128)
        sparse = _decode_rows(llm, steps)
        llm.n_tokens = len(context)
        llm.set_kv_policy("full")
        again = _decode_rows(llm, steps)
    assert not np.array_equal(sparse, reference)  # the switch had an effect
    np.testing.assert_array_equal(again, reference)


def test_h2o_is_refused_with_a_prompt_and_accepted_on_an_empty_cache(default_model_path, prompt):
    context, steps = prompt
    with _open(default_model_path) as llm:
        llm.eval(context)
        with pytest.raises(ValueError, match="h2o.*attention weights"):
            llm.set_kv_policy("h2o", 256)
        assert llm.kv_policy["policy"] == "full"
        llm.reset()
        llm.set_kv_policy("h2o", 256)
        assert llm.kv_policy["policy"] == "h2o"
        llm.eval(context[:64])
        llm.eval([steps[0]])  # decodes under h2o
        assert llm.kv_stats()["n_steps"] == 1


@pytest.mark.parametrize("args, words", [
    (("clusterkv", 10, None), "budget"),                        # < n_sink + 1
    (("quest", 512, {"page_size": 0}), "page_size"),
    (("streaming", 512, {"n_dense_layers": 999}), "n_dense_layers"),
    (("clusterkv", 1024, {"kmeans_iters": 0}), "kmeans_iters"),
])
def test_bad_params_leave_the_old_policy_in_force(default_model_path, prompt, native_rows,
                                                  args, words):
    context, steps = prompt
    budget, params = CONFIGS["quest"]
    with _open(default_model_path, "quest", budget, params) as llm:
        llm.eval(context)
        before = llm.kv_policy
        with pytest.raises(ValueError, match=words):
            llm.set_kv_policy(*args)
        assert llm.kv_policy == before
        rows = _decode_rows(llm, steps)
    np.testing.assert_array_equal(rows, native_rows["quest"][0])
