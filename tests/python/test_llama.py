"""The Llama API (clusterkv_local/llama.py) on the default model, SmolLM2-135M-Instruct Q4_1.

Facts used from the GGUF (shared/docs/models-and-data.md §1.2): vocab 49,152, n_embd 576,
bos 1 `<|im_start|>`, eos 2 `<|im_end|>`, no BOS added, digits split one per token, 272 tensors
(210 Q4_1, 1 Q8_0, 61 F32). Expected texts are never hard-coded: greedy runs are compared with
each other and with arg-max of the logits, so the tests hold for any correct forward pass.
"""
import os
import sys
import types
import warnings

import numpy as np
import pytest

from conftest import N_THREADS, require_native

require_native()

from clusterkv_local import (ClusterKVError, Llama, ModelFormatError,  # noqa: E402
                             ModelNotFoundError, UnsupportedError)
from clusterkv_local._internals import system_info  # noqa: E402
from clusterkv_local.llama import (TextAssembler, stop_holdback,  # noqa: E402
                                   utf8_complete_len)

PROMPT = "The three primary colors are"


def greedy(llm, prompt=PROMPT, **kw):
    kw.setdefault("max_tokens", 16)
    return llm.create_completion(prompt, temperature=0.0, **kw)


@pytest.fixture(scope="module")
def greedy_text(llm):
    """The greedy 16-token completion of PROMPT, computed once."""
    return greedy(llm)["choices"][0]["text"]


# ---------------------------------------------------------------------------------------------
# Pure helpers: UTF-8 holdback and stop strings
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data, expected", [
    (b"", 0), (b"abc", 3), ("é".encode(), 2), ("é".encode()[:1], 0),
    ("中".encode()[:2], 0), (b"a" + "中".encode()[:1], 1), ("🙂".encode()[:3], 0),
    ("🙂".encode(), 4), (b"\xff", 1), (b"\x80\x80", 2), (b"ab\xe4\xb8A", 5),
])
def test_utf8_complete_len(data, expected):
    assert utf8_complete_len(data) == expected


def test_stop_holdback():
    assert stop_holdback(b"Hello wor", [b"world"]) == 3
    assert stop_holdback(b"Hello", [b"world"]) == 0
    assert stop_holdback(b"a\n", [b"\n\n", b"xyz"]) == 1
    assert stop_holdback(b"abc", [b"c", b"bcd"]) == 2  # a full 1-byte stop is matched by feed


@pytest.mark.parametrize("step", [1, 2, 3, 5])
def test_text_assembler_never_splits_code_points_or_leaks_stops(step):
    text = "héllo 中文 🙂 wörld STOP never shown"
    data = text.encode()
    asm = TextAssembler([b"STOP", b"zzz"])
    chunks = []
    for i in range(0, len(data), step):
        stopped = asm.feed(data[i:i + step])
        chunks.append(asm.take())
        if stopped:
            break
    chunks.append(asm.take(final=True))
    expected = text[:text.index("STOP")]
    assert "".join(chunks) == expected == asm.text()
    assert asm.stopped
    for chunk in chunks:
        assert "S" not in chunk  # no chunk ever held a partial "STOP"


def test_text_assembler_releases_a_false_stop_start():
    asm = TextAssembler([b"ab"])
    asm.feed(b"xa")
    assert asm.take() == "x"          # "a" could start "ab"
    asm.feed("é".encode()[:1])
    assert asm.take() == "a"          # not a stop after all; the half "é" waits
    asm.feed("é".encode()[1:])
    assert asm.take() == "é"
    assert not asm.stopped and asm.text() == "xaé"


# ---------------------------------------------------------------------------------------------
# Loading, errors, lifetime
# ---------------------------------------------------------------------------------------------


def test_model_facts(llm):
    assert llm.n_vocab() == 49152
    assert llm.n_embd() == 576
    assert llm.n_ctx() == 512
    assert llm.token_bos() == 1 and llm.token_eos() == 2
    assert llm.metadata["general.architecture"] == "llama"
    assert llm.metadata["llama.context_length"] == "8192"
    assert llm.model_info.n_layer == 30 and llm.model_info.n_head_kv == 3
    assert llm.chat_format == "chat_template.default"


def test_missing_model_path():
    with pytest.raises(ModelNotFoundError, match="does not exist") as info:
        Llama("/nonexistent/model.gguf", verbose=False)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
    assert info.value.filename == "/nonexistent/model.gguf"


def test_malformed_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(ModelFormatError) as info:
        Llama(str(bad), verbose=False)
    assert info.value.status_name == "CKV_ERR_FORMAT" and info.value.message


def test_unknown_keyword_is_a_type_error(default_model_path):
    with pytest.raises(TypeError, match="no_such_option"):
        Llama(default_model_path, no_such_option=1, verbose=False)


def test_unimplemented_keyword_warns_only_when_set(default_model_path):
    with pytest.warns(UserWarning, match="flash_attn=True"):
        Llama(default_model_path, flash_attn=True, n_ctx=64, verbose=False).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Llama(default_model_path, flash_attn=False, n_ctx=64, verbose=False).close()


@pytest.mark.parametrize("kwargs, exc, name", [
    ({"n_ctx": -1}, ValueError, "n_ctx"), ({"n_batch": 0}, ValueError, "n_batch"),
    ({"n_gpu_layers": -2}, ValueError, "n_gpu_layers"), ({"n_ctx": "big"}, TypeError, "n_ctx"),
    ({"n_threads": -5}, ValueError, "n_threads"), ({"n_threads": 10000}, ValueError, "n_threads"),
])
def test_bad_constructor_parameters(default_model_path, kwargs, exc, name):
    with pytest.raises(exc, match=name):
        Llama(default_model_path, verbose=False, **kwargs)


@pytest.mark.skipif(not any(s in system_info() for s in ("CUDA: off", "CUDA: not built")),
                    reason="this build has CUDA")
def test_gpu_layers_on_cpu_build(default_model_path):
    with pytest.raises(UnsupportedError) as info:
        Llama(default_model_path, n_gpu_layers=-1, verbose=False)
    assert isinstance(info.value, ClusterKVError) and info.value.message


def test_close_twice_and_use_after_close(default_model_path):
    llm = Llama(default_model_path, n_ctx=64, verbose=False)
    llm.close()
    llm.close()
    with pytest.raises(RuntimeError, match="closed"):
        llm.tokenize(b"hi")
    with pytest.raises(RuntimeError, match="closed"):
        llm("hi", max_tokens=1)


def test_context_manager(default_model_path):
    with Llama(default_model_path, n_ctx=64, verbose=False) as llm:
        assert llm.tokenize(b"Hi", add_bos=False)
    with pytest.raises(RuntimeError):
        llm.eval([1])


def test_verbose_prints_a_short_summary(default_model_path, capsys):
    Llama(default_model_path, n_ctx=64, verbose=True).close()
    err = capsys.readouterr().err
    assert "loaded" in err and "n_ctx = 64" in err
    assert len(err.splitlines()) <= 3  # a summary, not a metadata dump


def test_metadata_only_and_vocab_only(default_model_path):
    with Llama(default_model_path, metadata_only=True, verbose=False) as meta:
        tensors = meta.tensors()
        assert len(tensors) == 272
        types_ = [t.type_name.lower() for t in tensors]
        assert (types_.count("q4_1"), types_.count("q8_0"), types_.count("f32")) == (210, 1, 61)
        embd = [t for t in tensors if t.name == "token_embd.weight"][0]
        assert embd.shape == (576, 49152)
        with pytest.raises(RuntimeError, match="metadata_only"):
            meta.eval([1])
    with Llama(default_model_path, vocab_only=True, verbose=False) as vocab:
        assert vocab.detokenize(vocab.tokenize(b"hello world")) == b"hello world"
        with pytest.raises(RuntimeError):
            vocab("hello", max_tokens=1)


# ---------------------------------------------------------------------------------------------
# Tokens and evaluation
# ---------------------------------------------------------------------------------------------


def test_tokenize_detokenize_round_trip(llm):
    text = "Hello, world! In 2024 a café served 中文 and 🙂.\n  indented"
    tokens = llm.tokenize(text.encode(), add_bos=False)
    assert all(isinstance(t, int) for t in tokens)
    assert llm.detokenize(tokens) == text.encode()
    assert llm.tokenize(text) == llm.tokenize(text.encode())  # str accepted too
    assert len(llm.tokenize(b"2024", add_bos=False)) == 4    # digits split one by one
    half = len(tokens) // 2
    assert llm.detokenize(tokens[half:], prev_tokens=tokens[:half]) == \
        text.encode()[len(llm.detokenize(tokens[:half])):]


def test_special_token_parsing(llm):
    assert llm.tokenize(b"<|im_start|>user", add_bos=False, special=True)[0] == 1
    assert 1 not in llm.tokenize(b"<|im_start|>user", add_bos=False, special=False)
    assert llm.detokenize([1], special=True) == b"<|im_start|>"
    assert llm.detokenize([1], special=False) == b""


def test_eval_and_scores(llm):
    tokens = llm.tokenize(PROMPT.encode())
    llm.reset()
    llm.eval(tokens)
    assert llm.n_tokens == len(tokens)
    assert llm.input_ids[:len(tokens)].tolist() == tokens
    assert llm.scores.shape == (512, 49152) and llm.scores.dtype == np.float32
    row = llm.scores[llm.n_tokens - 1]
    assert np.all(np.isfinite(row)) and row.std() > 0.1
    assert llm.sample(temp=0.0) == int(np.argmax(row))  # greedy = arg-max of the logits


def test_logits_all_rows_match_one_by_one_eval(llm_all_logits, llm):
    tokens = llm_all_logits.tokenize(b"One two three four five six")
    llm_all_logits.reset()
    llm_all_logits.eval(tokens)
    batched = llm_all_logits.scores[:len(tokens)].copy()
    llm_all_logits.reset()
    for t in tokens:
        llm_all_logits.eval([t])
    single = llm_all_logits.scores[:len(tokens)].copy()
    np.testing.assert_allclose(batched, single, atol=2e-2, rtol=1e-3)
    assert (batched.argmax(1) == single.argmax(1)).all()
    llm.reset()
    llm.eval(tokens)
    np.testing.assert_allclose(llm.scores[len(tokens) - 1], batched[-1], atol=2e-2, rtol=1e-3)


def test_eval_past_context_raises(llm):
    llm.reset()
    with pytest.raises(ValueError, match=r"Requested tokens \(600\) exceed context window of 512"):
        llm.eval([100] * 600)


# ---------------------------------------------------------------------------------------------
# Generation and completion
# ---------------------------------------------------------------------------------------------


def test_greedy_is_deterministic_and_matches_argmax(llm, greedy_text):
    a = greedy(llm)
    assert a["choices"][0]["text"] == greedy_text
    assert greedy_text.strip()
    tokens = llm.tokenize(PROMPT.encode())
    llm.reset()
    llm.eval(tokens)
    first = int(np.argmax(llm.scores[len(tokens) - 1]))
    assert a["choices"][0]["text"].encode().startswith(llm.detokenize([first]))


def test_completion_shape_and_length(llm):
    out = llm("Once upon a time", max_tokens=5, temperature=0.0)
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    assert isinstance(out["created"], int) and out["model"] == llm.model_path
    choice = out["choices"][0]
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["finish_reason"] == "length"
    usage = out["usage"]
    assert usage["completion_tokens"] == 5
    assert usage["prompt_tokens"] == len(llm.tokenize(b"Once upon a time"))
    assert usage["total_tokens"] == usage["prompt_tokens"] + 5


def test_seeded_sampling_is_reproducible(llm):
    def text(seed):
        return llm(PROMPT, max_tokens=8, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                   seed=seed)["choices"][0]["text"]

    assert text(42) == text(42)
    assert len({text(s) for s in (1, 2, 3)}) >= 2


def test_session_seed_makes_unseeded_calls_reproducible(default_model_path):
    def run():
        with Llama(default_model_path, n_ctx=128, seed=7, verbose=False) as m:
            return [m(PROMPT, max_tokens=6, temperature=1.0)["choices"][0]["text"]
                    for _ in range(2)]

    first, second = run(), run()
    assert first == second


def test_stop_string(llm, greedy_text):
    full = greedy_text
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    cut = full[:full.index(stop)]
    out = greedy(llm, stop=[stop, "never-appears"])
    assert out["choices"][0]["text"] == cut
    assert out["choices"][0]["finish_reason"] == "stop"
    assert greedy(llm, stop=stop)["choices"][0]["text"] == cut  # a plain str works too


def test_stream_matches_non_stream(llm):
    full = greedy(llm, max_tokens=24)
    chunks = list(greedy(llm, max_tokens=24, stream=True))
    assert chunks[-1]["choices"][0]["text"] == ""
    assert chunks[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert all(c["choices"][0]["text"] for c in chunks[:-1])  # no empty chunks before the end
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]
    assert len({c["id"] for c in chunks}) == 1


def test_stream_with_stop_never_leaks_it(llm, greedy_text):
    full = greedy_text
    stop = full.split()[2]
    chunks = [c["choices"][0]["text"] for c in greedy(llm, stop=[stop], stream=True)]
    assert "".join(chunks) == full[:full.index(stop)]
    assert not any(stop in c for c in chunks)


def test_stream_of_multibyte_text_is_valid_utf8(llm):
    prompt = "Emoji and Chinese: 🙂🙂 中文 🙂 中文"
    full = greedy(llm, prompt, max_tokens=24)["choices"][0]["text"]
    chunks = [c["choices"][0]["text"] for c in greedy(llm, prompt, max_tokens=24, stream=True)]
    assert "".join(chunks) == full
    assert all("\ufffd" not in c for c in chunks)


def test_prompt_too_long(llm):
    with pytest.raises(ValueError, match=r"Requested tokens \(\d+\) exceed context window of 512"):
        llm("word " * 600, max_tokens=4)
    with pytest.raises(ValueError, match="exceed context window"):
        llm("word " * 600, max_tokens=4, stream=True)  # raised at the call, not on iteration


def test_max_tokens_none_is_clipped_to_context(default_model_path):
    with Llama(default_model_path, n_ctx=16, verbose=False) as small:
        n_prompt = len(small.tokenize(PROMPT.encode()))
        for max_tokens in (None, -1, 1000):
            out = small(PROMPT, max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.3)
            assert out["usage"]["completion_tokens"] <= 16 - n_prompt
            if out["choices"][0]["finish_reason"] == "length":
                assert out["usage"]["completion_tokens"] == 16 - n_prompt


@pytest.mark.parametrize("kwargs, exc, name", [
    ({"top_p": 0.0}, ValueError, "top_p"), ({"top_p": 1.5}, ValueError, "top_p"),
    ({"min_p": -0.1}, ValueError, "min_p"), ({"repeat_penalty": 0.0}, ValueError, "repeat_penalty"),
    ({"temperature": float("nan")}, ValueError, "temperature"),
    ({"max_tokens": "5"}, TypeError, "max_tokens"), ({"top_k": 1.5}, TypeError, "top_k"),
    ({"stop": [3]}, TypeError, "stop"), ({"logprobs": 2}, ValueError, "logits_all"),
    ({"logit_bias": {10**6: 1.0}}, ValueError, "logit_bias"),
    ({"logit_bias": {5: float("nan")}}, ValueError, "logit_bias"),
    ({"typical_p": 0.0}, ValueError, "typical_p"),
    ({"mirostat_mode": 3}, ValueError, "mirostat_mode"),
    ({"mirostat_mode": 2, "mirostat_tau": 0.0}, ValueError, "mirostat_tau"),
    ({"mirostat_mode": 1, "mirostat_eta": -1.0}, ValueError, "mirostat_eta"),
])
def test_bad_completion_parameters(llm, kwargs, exc, name):
    with pytest.raises(exc, match=name):
        llm(PROMPT, **kwargs)


def test_unknown_completion_keyword(llm):
    with pytest.raises(TypeError):
        llm(PROMPT, max_tokens=1, bogus=True)


def test_unimplemented_sampling_option_warns(llm):
    with pytest.warns(UserWarning, match="tfs_z=0.5"):
        llm(PROMPT, max_tokens=1, tfs_z=0.5)


def test_echo_and_suffix(llm):
    out = greedy(llm, max_tokens=4, echo=True, suffix="<END>")["choices"][0]["text"]
    plain = greedy(llm, max_tokens=4)["choices"][0]["text"]
    assert out == PROMPT + plain + "<END>"


def test_token_list_prompt(llm, greedy_text):
    tokens = llm.tokenize(PROMPT.encode())
    assert greedy(llm, tokens)["choices"][0]["text"] == greedy_text


def test_prefix_reuse_evaluates_only_the_suffix(llm):
    first = "The quick brown fox jumps over the lazy dog."
    second = first + " Then the dog woke up and"
    tok1, tok2 = llm.tokenize(first.encode()), llm.tokenize(second.encode())
    shared = Llama.longest_token_prefix(tok1, tok2)
    assert shared >= len(tok1) - 1
    llm.reset()
    llm(first, max_tokens=1, temperature=0.0)
    assert llm.n_tokens == len(tok1)
    llm.reset_timings()
    llm(second, max_tokens=1, temperature=0.0)
    t = llm.timings()
    assert t["prompt_tokens"] + t["decode_tokens"] == len(tok2) - shared
    assert llm.n_tokens == len(tok2)


def test_generate_reuses_prefix_and_supports_reset_false(llm):
    tokens = llm.tokenize(PROMPT.encode())
    gen = llm.generate(tokens, temp=0.0)
    first = [next(gen) for _ in range(3)]
    gen.close()
    llm.reset_timings()
    again = llm.generate(tokens, temp=0.0)
    assert [next(again) for _ in range(3)] == first
    again.close()
    t = llm.timings()
    assert t["prompt_tokens"] + t["decode_tokens"] == 1 + 2  # last prompt token, then 2 more


def test_generate_with_processor_and_stopping_criteria(llm):
    tokens = llm.tokenize(PROMPT.encode())
    greedy_first = next(llm.generate(tokens, temp=0.0))

    def ban(input_ids, scores):
        scores = scores.copy()
        scores[greedy_first] = -np.inf
        return scores

    assert next(llm.generate(tokens, temp=0.0, logits_processor=[ban])) != greedy_first
    calls = []

    def stop_after_two(input_ids, logits):
        calls.append(len(input_ids))
        return len(calls) > 2

    produced = list(llm.generate(tokens, temp=0.0, stopping_criteria=stop_after_two))
    assert len(produced) == 2


def test_logit_bias_forces_a_token(llm):
    target = llm.tokenize(b" banana", add_bos=False)[0]
    out = llm(PROMPT, max_tokens=1, temperature=0.0, logit_bias={target: 100.0})
    assert out["choices"][0]["text"] == llm.detokenize([target]).decode()


def test_logprobs(llm_all_logits):
    out = llm_all_logits(PROMPT, max_tokens=4, temperature=0.0, logprobs=3)
    lp = out["choices"][0]["logprobs"]
    n = out["usage"]["completion_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n
    assert "".join(lp["tokens"]) == out["choices"][0]["text"]
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert value <= 0.0
        assert value == pytest.approx(max(top.values()))  # greedy picks the most likely
        assert top[token] == value
    echoed = llm_all_logits(PROMPT, max_tokens=2, temperature=0.0, logprobs=1, echo=True)
    elp = echoed["choices"][0]["logprobs"]
    assert elp["token_logprobs"][0] is None
    assert len(elp["tokens"]) == echoed["usage"]["total_tokens"]


def test_from_pretrained_glob(monkeypatch, default_model_path, tmp_path):
    calls = []

    class FakeFS:
        def ls(self, repo_id, recursive=True):
            return [{"name": repo_id + "/" + f} for f in
                    ("README.md", "m-Q4_1.gguf", "m-Q8_0.gguf", "sub/m-F16.gguf")]

    def hf_hub_download(repo_id, filename, subfolder=None, local_dir=None, cache_dir=None):
        calls.append((repo_id, filename, subfolder, cache_dir))
        return default_model_path

    fake = types.ModuleType("huggingface_hub")
    fake.HfFileSystem, fake.hf_hub_download = FakeFS, hf_hub_download
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    with pytest.raises(ValueError, match="Several files"):
        Llama.from_pretrained("org/repo", "*.gguf", verbose=False)
    with pytest.raises(ValueError, match="No files"):
        Llama.from_pretrained("org/repo", "*Q2_K.gguf", verbose=False)
    with Llama.from_pretrained("org/repo", "*Q4_1.gguf", cache_dir=str(tmp_path),
                               n_ctx=64, verbose=False) as m:
        assert m.n_ctx() == 64
    Llama.from_pretrained("org/repo", "*F16*", n_ctx=64, verbose=False).close()
    assert calls == [("org/repo", "m-Q4_1.gguf", None, str(tmp_path)),
                     ("org/repo", "m-F16.gguf", "sub", None)]


def test_from_pretrained_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match="huggingface-hub"):
        Llama.from_pretrained("org/repo", "*.gguf")


def test_from_registry(default_model_path):
    with Llama.from_registry(n_ctx=64, n_threads=N_THREADS, verbose=False) as m:
        assert m.model_path == default_model_path


def _locked_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmLck:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_use_mlock_locks_the_weights_in_ram(default_model_path):
    """use_mlock=True: the mapped file is locked (VmLck grows by its size) and the model works
    the same; the lock goes with the model. Where the system refuses (ulimit -l without
    CAP_IPC_LOCK), the load still succeeds with a warning (gguf_lock_image)."""
    size_kib = os.path.getsize(default_model_path) // 1024
    before = _locked_kib()
    with Llama(default_model_path, n_ctx=64, use_mlock=True, verbose=False) as llm:
        locked = _locked_kib() - before
        text = llm("The capital of France is", max_tokens=4, temperature=0)["choices"][0]["text"]
    if locked == 0:
        pytest.skip("mlock refused here (RLIMIT_MEMLOCK)")
    assert locked >= size_kib
    assert _locked_kib() - before < size_kib   # unlocked with the model
    with Llama(default_model_path, n_ctx=64, verbose=False) as llm:
        assert llm("The capital of France is", max_tokens=4, temperature=0)["choices"][0]["text"] == text


def test_pickle_recreates_the_llama_and_tokenizer_object(default_model_path):
    """As llama-cpp-python: pickling keeps the constructor call (not the evaluated tokens), so
    the copy gives the same completions; llm.tokenizer() encodes and decodes str."""
    import pickle

    with Llama(default_model_path, n_ctx=96, seed=5, n_threads=N_THREADS, verbose=False,
               kv_policy="streaming", kv_budget=32, rope_freq_scale=1.0) as llm:
        llm.eval(llm.tokenize(b"state that does not travel"))
        copy = pickle.loads(pickle.dumps(llm))
        try:
            assert copy.n_tokens == 0 and copy.n_ctx() == 96 and copy.kv_policy["budget"] == 32
            want = llm("Once upon a time", max_tokens=6, temperature=0.8, seed=1)
            got = copy("Once upon a time", max_tokens=6, temperature=0.8, seed=1)
            assert got["choices"][0]["text"] == want["choices"][0]["text"]
            tok = copy.tokenizer()
            ids = tok.encode("Hello <|im_start|> world")
            assert ids == llm.tokenize(b"Hello <|im_start|> world", special=True)
            assert tok.decode(ids[1:]) == llm.detokenize(ids[1:]).decode()
        finally:
            copy.close()
