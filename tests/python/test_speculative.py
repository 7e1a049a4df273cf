"""Speculative decoding with a draft model (clusterkv_local/speculative.py, Llama(draft_model=)).

Reference: the same Llama settings without a draft model. The guesses only change how many
forward passes run, never the tokens: greedy, seeded sampling with penalties, grammars,
stopping criteria and logprobs must give identical results, with fewer passes on repetitive
text. (The CPU path's logits of a token do not depend on how many tokens share its pass.)
"""
import numpy as np
import pytest

from conftest import N_THREADS, require_native

require_native()
from clusterkv_local import Llama, LlamaGrammar, LlamaPromptLookupDecoding  # noqa: E402
from clusterkv_local.speculative import LlamaDraftModel  # noqa: E402

CODE = ("def area(w, h):\n    return w * h\n\n\ndef perimeter(w, h):\n    return 2 * (w + h)\n\n\n"
        "# the same functions, renamed\ndef rect_area(w, h):\n")


def test_prompt_lookup_guesses_what_followed_the_last_match():
    draft = LlamaPromptLookupDecoding(max_ngram_size=2, num_pred_tokens=3)
    ids = np.array([5, 6, 7, 8, 9, 5, 6, 1, 2, 3, 9, 5, 6], dtype=np.intc)
    assert draft(ids).tolist() == [1, 2, 3]             # (5, 6) last seen before 1, 2, 3
    assert draft(np.array([4, 7, 1, 2, 7], dtype=np.intc)).tolist() == [1, 2, 7]   # a 1-gram
    assert draft(np.array([1, 2, 3], dtype=np.intc)).tolist() == []
    assert draft(np.array([3], dtype=np.intc)).tolist() == []
    assert LlamaPromptLookupDecoding(1, 10)(ids).tolist() == [1, 2, 3, 9, 5, 6]   # after a 6
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError):
            LlamaPromptLookupDecoding(max_ngram_size=bad)


class Counting:
    """Counts the Llama's forward passes and the logits rows they asked for."""

    def __init__(self, llm):
        self.passes, self.rows = 0, []
        decode = llm._ctx.decode

        def counted(tokens, all_logits=False):
            self.passes += 1
            self.rows.append(len(tokens) if all_logits else 1)
            return decode(tokens, all_logits)

        llm._ctx.decode = counted


def _pair(path, **kw):
    plain = Llama(path, n_ctx=512, n_threads=N_THREADS, verbose=False, **kw)
    spec = Llama(path, n_ctx=512, n_threads=N_THREADS, verbose=False,
                 draft_model=LlamaPromptLookupDecoding(num_pred_tokens=8), **kw)
    return plain, spec


@pytest.fixture(scope="module")
def pair(default_model_path):
    plain, spec = _pair(default_model_path)
    yield plain, spec
    plain.close()
    spec.close()


@pytest.mark.parametrize("sampling", [
    dict(temperature=0),
    dict(temperature=0.9, seed=11, top_k=30, repeat_penalty=1.15, frequency_penalty=0.3),
    dict(temperature=0.7, seed=5, mirostat_mode=2),
])
def test_same_tokens_in_fewer_passes(pair, sampling):
    plain, spec = pair
    counts = []
    outs = []
    for llm in (plain, spec):
        llm.reset()
        counter = Counting(llm)
        outs.append(llm(CODE, max_tokens=60, **sampling)["choices"][0])
        counts.append(counter.passes)
        del llm._ctx.decode
    assert outs[0]["text"] == outs[1]["text"] and outs[0]["finish_reason"] == outs[1]["finish_reason"]
    if sampling["temperature"] == 0:
        assert counts[1] < 0.7 * counts[0], counts   # the renamed copy is guessed from the code
    assert max(counter.rows) <= 1 + 8   # the prompt ran without logits rows, then token + guesses


def test_grammar_stops_and_logprobs_agree(default_model_path):
    plain, spec = _pair(default_model_path, logits_all=True)
    try:
        grammar = LlamaGrammar.from_string('root ::= "def " [a-z_]+ "(w, h):\\n    return " [^\\n]+ "\\n"')
        kw = dict(max_tokens=40, temperature=0.8, seed=2, logprobs=2)
        got = [llm(CODE, grammar=grammar, **kw)["choices"][0] for llm in (plain, spec)]
        assert got[0]["text"] == got[1]["text"] and got[0]["logprobs"] == got[1]["logprobs"]
        got = [llm(CODE, stop=["perimeter"], max_tokens=80, temperature=0)["choices"][0]
               for llm in (plain, spec)]
        assert got[0] == got[1]
        tokens = [[t for t in llm.generate(llm.tokenize(CODE.encode()), temp=0,
                                           stopping_criteria=lambda ids, logits: len(ids) > 70)]
                  for llm in (plain, spec)]
        assert tokens[0] == tokens[1] and len(tokens[0]) > 0
        assert np.array_equal(plain.scores[:plain.n_tokens], spec.scores[:spec.n_tokens])
    finally:
        plain.close()
        spec.close()


class Wrong(LlamaDraftModel):
    """Guesses tokens that are never drawn at temperature 0 (a draft that always fails)."""

    def __call__(self, input_ids, /, **kwargs):
        return np.array([0, 0, 0], dtype=np.intc)


def test_bad_guesses_cost_passes_but_not_tokens(default_model_path, pair):
    plain, _ = pair
    plain.reset()
    want = plain(CODE, max_tokens=20, temperature=0)["choices"][0]["text"]
    with Llama(default_model_path, n_ctx=512, n_threads=N_THREADS, verbose=False,
               draft_model=Wrong()) as llm:
        assert llm(CODE, max_tokens=20, temperature=0)["choices"][0]["text"] == want


def test_policies_other_than_full_decode_one_token_at_a_time(default_model_path):
    kw = dict(kv_policy="streaming", kv_budget=64)
    plain, spec = _pair(default_model_path, **kw)
    try:
        counts, texts = [], []
        for llm in (plain, spec):
            counter = Counting(llm)
            texts.append(llm(CODE * 3, max_tokens=30, temperature=0)["choices"][0]["text"])
            counts.append(counter.passes)
        assert texts[0] == texts[1] and counts[0] == counts[1]
    finally:
        plain.close()
        spec.close()


def test_bad_draft_models(default_model_path):
    with pytest.raises(TypeError, match="draft_model"):
        Llama(default_model_path, n_ctx=64, verbose=False, draft_model="lookup")
    with Llama(default_model_path, n_ctx=64, verbose=False,
               draft_model=lambda ids: np.array([10 ** 7])) as llm:
        with pytest.raises(ValueError, match="outside"):
            llm("Hi", max_tokens=3)
