"""Several sequences in one context (n_seq_max, ckv_decode_seq, ckv_decode_batch) and batched
completions (Llama.create_completion_batch), against the same sequences run one at a time.

A batch step reads the weights once for all rows, but every row must come out exactly as its
own one-token decode would: the matmuls work row by row on the same quantised activations and
each row attends to its own sequence's cache under its own KV policy. So the references are
single-sequence runs and the comparisons are bit for bit: logits rows, greedy texts, policy
stats. The clusterkv runs use ~300-token prompts at budget 64 with re-clustering every 32
tokens, so the batch steps really select clusters (and cluster new spans) per sequence.
"""
import numpy as np
import pytest

from conftest import N_THREADS, require_native

CKV = dict(kv_policy="clusterkv", kv_budget=64, kv_policy_params={"recluster_interval": 32})
STARTS = [0, 900, 2100, 3300]   # character offsets of the four prompts in the filler text


def _prompts(n_chars: int):
    from clusterkv_local.eval import synthetic_text

    text = synthetic_text(5000, seed=3)
    return [text[s:s + n_chars] for s in STARTS]


def _pair(path, n_seq, **kw):
    from clusterkv_local import Llama

    return (Llama(path, n_ctx=512, n_threads=N_THREADS, verbose=False, **kw),
            Llama(path, n_ctx=512, n_threads=N_THREADS, verbose=False, n_seq_max=n_seq, **kw))


@pytest.mark.parametrize("policy", [{}, CKV], ids=["full", "clusterkv"])
def test_batch_step_rows_equal_single_decodes(default_model_path, policy):
    require_native()
    one, many = _pair(default_model_path, 4, **policy)
    with one, many:
        prompts = [one.tokenize(p.encode()) for p in _prompts(1200)]
        steps = [[42, 1337, 500 + i, 7] for i in range(4)]   # a different token stream each
        ref = []
        for toks, stream in zip(prompts, steps):
            one._ctx.truncate(0)
            one._ctx.decode(toks)
            rows = []
            for t in stream:
                one._ctx.decode([t])
                rows.append(np.array(one._ctx.logits(-1)))
            ref.append(rows)
        ctx = many._ctx
        for i, toks in enumerate(prompts):
            ctx.decode_seq(i, toks)
        for step in range(len(steps[0])):
            order = [3, 1, 0, 2] if step % 2 else [0, 1, 2, 3]   # rows in any sequence order
            ctx.decode_batch([steps[s][step] for s in order], order)
            for row, s in enumerate(order):
                np.testing.assert_array_equal(np.array(ctx.logits(row)), ref[s][step])
        assert [ctx.n_past_seq(i) for i in range(4)] == [len(p) + 4 for p in prompts]
        if policy:
            s1, s4 = one.kv_stats(), many.kv_stats()
            assert s4["n_clusters"] > 0
            assert s4["n_steps"] == 4 * len(steps[0])
            # summed over sequences; the one-at-a-time context's stats hold all four runs too
            assert s4["n_attended"] == s1["n_attended"] and s4["n_cached"] == s1["n_cached"]
            assert s4["n_attended"] < s4["n_cached"]


@pytest.mark.parametrize("policy", [{}, CKV], ids=["full", "clusterkv"])
def test_batch_completions_equal_one_at_a_time(default_model_path, policy):
    require_native()
    one, many = _pair(default_model_path, 4, **policy)
    with one, many:
        prompts = _prompts(1000)[1:] + ["The capital of France is"]   # four, of different lengths
        kw = dict(max_tokens=40, temperature=0.0, stop=["\n\n"])
        singles = [one.create_completion(p, **kw) for p in prompts]
        ref = [r["choices"][0] for r in singles]
        out = many.create_completion_batch(prompts, **kw)
        got = out["choices"]
        assert [c["index"] for c in got] == [0, 1, 2, 3]
        assert [c["text"] for c in got] == [c["text"] for c in ref]
        assert [c["finish_reason"] for c in got] == [c["finish_reason"] for c in ref]
        for key in ("prompt_tokens", "completion_tokens"):
            assert out["usage"][key] == sum(r["usage"][key] for r in singles)
        # sampling: sequence i draws with seed + i, so sequence 0 is create_completion(seed)
        samp = many.create_completion_batch(prompts[:2], max_tokens=12, temperature=0.9, seed=11)
        alone = one.create_completion(prompts[0], max_tokens=12, temperature=0.9, seed=11)
        assert samp["choices"][0]["text"] == alone["choices"][0]["text"]
        # the Llama's own sequence works as before afterwards
        assert many.create_completion(prompts[0], **kw)["choices"][0]["text"] == ref[0]["text"]


def test_batch_errors(default_model_path):
    require_native()
    from clusterkv_local import Llama

    with pytest.raises(ValueError, match="n_seq_max"):
        Llama(default_model_path, n_ctx=64, n_seq_max=0, verbose=False)
    with pytest.raises(Exception, match=r"n_seq_max must be in \[1, 256\]"):
        Llama(default_model_path, n_ctx=64, n_seq_max=257, verbose=False)
    with Llama(default_model_path, n_ctx=64, n_threads=N_THREADS, n_seq_max=2,
               verbose=False) as llm:
        ctx = llm._ctx
        assert ctx.n_seq_max() == 2
        with pytest.raises(ValueError, match=r"1 to n_seq_max \(2\) prompts"):
            llm.create_completion_batch(["a", "b", "c"])
        with pytest.raises(Exception, match=r"sequence 2 is out of range \[0, n_seq_max = 2\)"):
            ctx.decode_seq(2, [1, 2])
        ctx.decode_seq(0, [1, 2])
        ctx.decode_seq(1, [3])
        with pytest.raises(Exception, match="sequence 1 appears twice"):
            ctx.decode_batch([5, 6], [1, 1])
        with pytest.raises(Exception, match="outside the vocabulary"):
            ctx.decode_batch([5, -1], [0, 1])
        assert (ctx.n_past_seq(0), ctx.n_past_seq(1)) == (2, 1)   # nothing was evaluated
        ctx.decode_seq(1, list(range(10, 73)))                      # sequence 1 is now full
        with pytest.raises(Exception, match="exceed the context window"):
            ctx.decode_batch([5, 6], [0, 1])
        assert (ctx.n_past_seq(0), ctx.n_past_seq(1)) == (2, 64)
        ctx.truncate_seq(1, 10)
        ctx.decode_batch([5, 6], [0, 1])
        assert (ctx.n_past_seq(0), ctx.n_past_seq(1)) == (3, 11)
