"""The tokenizer (native/src/tokenizer*.c, unicode*.c) against ids recorded from llama.cpp.

tests/fixtures/tokenizer_<name>.json were written by tests/fixtures/record_tokenizer.py from
llama.cpp as vendored in llama-cpp-python 0.3.36 (commit 0c1e570): ids for 73 hard strings
under every add_special / parse_special combination, detokenized bytes, token pieces, the
end-of-generation set and every token's attributes. The models are loaded vocab-only through
the C API (ckv_model_load, ckv_tokenize, ...), not through Llama.

Where the models come from:
  * SmolLM2-135M-Instruct.Q4_1.gguf (gpt2 BPE, pre-tokenizer smollm) is always tested: it is
    looked up in the registry cache (conftest.model_folders()), else fetched like the other tests do
    (clusterkv_local.models, the default registry model).
  * qwen2.5-coder-0.5b-instruct-q4_k_m.gguf (gpt2 BPE, qwen2) and gemma-3-270m-q4_k_m.gguf
    (SentencePiece) are tested when found in the registry cache (conftest.model_folders()), and
    skipped otherwise.
  * "Variant" fixtures (the gpt2 / default / llama3 pre-tokenizers, a missing pre-tokenizer,
    add_space_prefix) are a model's metadata with one tokenizer key changed; they are rebuilt
    here with record_tokenizer.make_variant (needs the `gguf` package, else skipped).
Every model file must have the sha256 its fixture was recorded from.
"""
import base64
import functools
import glob
import importlib.util
import json
import os

import pytest
from clusterkv_local.models import sha256_file
from conftest import model_folders

from conftest import require_native

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
FIXTURE_FILES = sorted(glob.glob(os.path.join(FIXTURES, "tokenizer_*.json")))
ALWAYS = "SmolLM2-135M-Instruct.Q4_1.gguf"  # fetched when missing
COMBOS = [(False, False), (False, True), (True, False), (True, True)]

# llama.cpp attribute bits -> enum ckv_token_attr (the class tokenizer.c reports)
ATTR_UNKNOWN, ATTR_UNUSED, ATTR_NORMAL, ATTR_CONTROL, ATTR_USER_DEFINED, ATTR_BYTE = 1, 2, 4, 8, 16, 32


def attr_class(bits: int) -> int:
    for bit, cls in ((ATTR_CONTROL, 3), (ATTR_USER_DEFINED, 4), (ATTR_UNKNOWN, 2), (ATTR_BYTE, 6),
                     (ATTR_UNUSED, 5), (ATTR_NORMAL, 1)):
        if bits & bit:
            return cls
    return 0


def load_fixture(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def fixture_id(path: str) -> str:
    return os.path.basename(path)[len("tokenizer_"):-len(".json")]


# Hashing a model once per test run is enough.
sha256 = functools.lru_cache(maxsize=None)(sha256_file)


def find_model(file: str, sha: str) -> str:
    for d in model_folders():
        path = os.path.join(d, file)
        if os.path.exists(path) and sha256(path) == sha:
            return path
    if file == ALWAYS:
        from clusterkv_local import models

        path = models.model_path(models.DEFAULT_MODEL)
        assert sha256(path) == sha, "%s is not the model the fixtures were recorded from" % path
        return path
    pytest.skip("%s not found in %s" % (file, model_folders()))


def recorder():
    spec = importlib.util.spec_from_file_location("record_tokenizer",
                                                  os.path.join(FIXTURES, "record_tokenizer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def variant(base: str, overrides: dict, tmp_dir) -> str:
    pytest.importorskip("gguf")
    path = os.path.join(str(tmp_dir), "variant.gguf")
    recorder().make_variant(base, path, overrides)
    return path


# ---------------------------------------------------------------------------------------------
# A vocab-only model through the C API
# ---------------------------------------------------------------------------------------------

class Vocab:
    def __init__(self, path: str):
        _ffi = require_native()
        self.ffi, self.lib = _ffi.ffi, _ffi.lib
        params = self.ffi.new("struct ckv_model_params *")
        self.lib.ckv_model_default_params(params)
        params.vocab_only = True
        out = self.ffi.new("ckv_model **")
        st = self.lib.ckv_model_load(path.encode(), params, out)
        assert st == 0, (st, self.error())
        self.model = out[0]
        self.n_tokens = self.lib.ckv_vocab_n_tokens(self.model)

    def close(self):
        self.lib.ckv_model_free(self.model)

    def error(self) -> str:
        return self.ffi.string(self.lib.ckv_last_error()).decode(errors="replace")

    def tokenize_status(self, text: bytes, add: bool, parse: bool, cap: int):
        buf = self.ffi.new("ckv_token[]", max(cap, 1))
        n = self.ffi.new("int32_t *")
        st = self.lib.ckv_tokenize(self.model, text, len(text), buf, cap, add, parse, n)
        return st, n[0], list(buf[0:min(cap, n[0])])

    def tokenize(self, text: bytes, add: bool, parse: bool) -> list:
        st, n, ids = self.tokenize_status(text, add, parse, len(text) + 8)
        assert st == 0, (st, self.error())
        return ids

    def piece(self, token: int, special: bool) -> bytes:
        buf = self.ffi.new("char[]", 4096)
        n = self.ffi.new("int32_t *")
        st = self.lib.ckv_token_to_piece(self.model, token, buf, 4096, special, n)
        assert st == 0, (st, self.error())
        return self.ffi.buffer(buf, n[0])[:]

    def detokenize_status(self, ids: list, special: bool, cap: int):
        arr = self.ffi.new("ckv_token[]", ids or [0])
        buf = self.ffi.new("char[]", max(cap, 1))
        n = self.ffi.new("int32_t *")
        st = self.lib.ckv_detokenize(self.model, arr, len(ids), buf, cap, special, n)
        return st, n[0], self.ffi.buffer(buf, min(cap, n[0]))[:]

    def detokenize(self, ids: list, special: bool) -> bytes:
        st, _, out = self.detokenize_status(ids, special, 64 * len(ids) + 64)
        assert st == 0, (st, self.error())
        return out


@pytest.fixture(scope="module", params=FIXTURE_FILES, ids=fixture_id)
def case(request, tmp_path_factory):
    """(fixture, loaded Vocab) for one fixture file."""
    fixture = load_fixture(request.param)
    model = fixture["model"]
    path = find_model(model["file"], model["sha256"])
    if model["variant_overrides"]:
        path = variant(path, model["variant_overrides"], tmp_path_factory.mktemp(fixture_id(request.param)))
    vocab = Vocab(path)
    yield fixture, vocab
    vocab.close()


def expected_ids(c: dict, add: bool, parse: bool) -> list:
    ids = c["ids"]
    value = ids["add%d_parse%d" % (add, parse)]
    return ids[value] if isinstance(value, str) else value


def recorded_cases(fixture: dict) -> list:
    return [c for c in fixture["cases"] if "ids" in c]


# ---------------------------------------------------------------------------------------------
# Against llama.cpp
# ---------------------------------------------------------------------------------------------

def test_fixtures_are_complete():
    names = {fixture_id(p) for p in FIXTURE_FILES}
    assert {"smollm2", "qwen25", "gemma3"} <= names
    for path in FIXTURE_FILES:
        fixture = load_fixture(path)
        assert fixture["reference"]["llama_cpp_commit"].startswith("0c1e570")
        assert len(fixture["cases"]) >= 60


def test_token_ids_match_llama_cpp(case):
    fixture, vocab = case
    wrong = []
    for c in recorded_cases(fixture):
        text = base64.b64decode(c["bytes_b64"])
        for add, parse in COMBOS:
            got, want = vocab.tokenize(text, add, parse), expected_ids(c, add, parse)
            if got != want:
                wrong.append("%s add=%d parse=%d\n   want %s\n   got  %s" % (c["name"], add, parse, want, got))
    assert not wrong, "%d mismatches:\n%s" % (len(wrong), "\n".join(wrong[:10]))


def test_detokenize_matches_llama_cpp(case):
    fixture, vocab = case
    wrong = []
    for c in recorded_cases(fixture):
        for key, want in c["detokenize"].items():
            combo, special = key.rsplit("_special", 1)
            add, parse = combo == "add1_parse1", combo == "add1_parse1"
            got = vocab.detokenize(expected_ids(c, add, parse), special == "1")
            if got != base64.b64decode(want):
                wrong.append("%s %s: want %r got %r" % (c["name"], key, base64.b64decode(want), got))
    assert not wrong, "\n".join(wrong[:10])


def test_pieces_match_llama_cpp(case):
    fixture, vocab = case
    wrong = [(t, special) for t, plain, rendered in fixture["pieces"]
             for special, want in ((False, plain), (True, rendered))
             if vocab.piece(t, special) != base64.b64decode(want)]
    assert not wrong, wrong[:20]


def test_vocab_metadata_matches_llama_cpp(case):
    fixture, vocab = case
    info, lib, m = fixture["vocab"], vocab.lib, vocab.model
    assert vocab.n_tokens == info["n_tokens"]
    assert lib.ckv_token_bos(m) == info["bos"]
    assert lib.ckv_token_eos(m) == info["eos"]
    assert bool(lib.ckv_vocab_add_bos(m)) == info["add_bos"]
    assert [t for t in range(vocab.n_tokens) if lib.ckv_token_is_eog(m, t)] == info["eog"]
    assert not lib.ckv_token_is_eog(m, -1)
    wrong = [(t, bits) for first, count, bits in info["attr_runs"] for t in range(first, first + count)
             if lib.ckv_token_attr(m, t) != attr_class(bits)]
    assert not wrong, wrong[:20]


SPM_SPACE = "\u2581".encode()


def is_sentencepiece(vocab: Vocab) -> bool:
    space = vocab.tokenize(b" ", False, False)
    return vocab.ffi.string(vocab.lib.ckv_token_text(vocab.model, space[0])) == SPM_SPACE


def test_round_trip_is_byte_exact(case):
    """Valid UTF-8 text comes back unchanged from its own ids (rendering special tokens, since
    without parse_special a BPE merge can still land on a control token's text). A literal
    U+2581 in SentencePiece text is the space marker and comes back as a space, as in llama.cpp."""
    fixture, vocab = case
    if fixture["model"]["variant_overrides"]:
        pytest.skip("variants clean spaces or add prefixes; covered by the detokenize fixtures")
    wrong = []
    for c in recorded_cases(fixture):
        text = base64.b64decode(c["bytes_b64"])
        try:
            text.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if SPM_SPACE in text and is_sentencepiece(vocab):
            continue
        for parse in (False, True):
            back = vocab.detokenize(vocab.tokenize(text, False, parse), True)
            if back != text:
                wrong.append((c["name"], parse, back))
    assert not wrong, wrong[:10]


def test_text_that_aborts_llama_cpp_still_tokenizes(case):
    """llama.cpp throws on a 4-byte sequence above U+10FFFF; we treat its bytes as invalid."""
    fixture, vocab = case
    for c in fixture["cases"]:
        if c.get("llama_cpp") == "abort":
            text = base64.b64decode(c["bytes_b64"])
            ids = vocab.tokenize(text, True, True)
            assert ids and all(0 <= t < vocab.n_tokens for t in ids)
            assert vocab.detokenize(ids, False).startswith(b"ok ")


# ---------------------------------------------------------------------------------------------
# Buffers and errors
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    fixture = load_fixture(os.path.join(FIXTURES, "tokenizer_smollm2.json"))
    path = find_model(fixture["model"]["file"], fixture["model"]["sha256"])
    vocab = Vocab(path)
    yield path, vocab
    vocab.close()


def test_buffer_too_small_reports_the_size(smol):
    _, vocab = smol
    lib = vocab.lib
    text = b"Hello world, this is a test."
    full = vocab.tokenize(text, False, False)
    st, n, partial = vocab.tokenize_status(text, False, False, 3)
    assert st == lib.CKV_ERR_BUFFER_TOO_SMALL and n == len(full) and partial == full[:3]
    st, n, _ = vocab.tokenize_status(text, False, False, 0)
    assert st == lib.CKV_ERR_BUFFER_TOO_SMALL and n == len(full)
    st, n, out = vocab.detokenize_status(full, False, 4)
    assert st == lib.CKV_ERR_BUFFER_TOO_SMALL and n == len(text)
    st, n, out = vocab.detokenize_status(full, False, len(text))
    assert st == 0 and out == text


def test_bad_arguments_are_rejected(smol):
    _, vocab = smol
    lib, ffi, m = vocab.lib, vocab.ffi, vocab.model
    n = ffi.new("int32_t *")
    buf = ffi.new("char[]", 16)
    assert lib.ckv_tokenize(m, b"abc", -1, ffi.NULL, 0, False, False, n) == lib.CKV_ERR_INVALID_ARG
    assert lib.ckv_token_to_piece(m, vocab.n_tokens, buf, 16, False, n) == lib.CKV_ERR_INVALID_ARG
    assert lib.ckv_token_to_piece(m, -1, buf, 16, False, n) == lib.CKV_ERR_INVALID_ARG
    st, _, _ = vocab.detokenize_status([1, vocab.n_tokens], False, 64)
    assert st == lib.CKV_ERR_INVALID_ARG and "outside the vocabulary" in vocab.error()
    assert lib.ckv_token_text(m, vocab.n_tokens) == ffi.NULL
    assert ffi.string(lib.ckv_token_text(m, 1)) == b"<|im_start|>"


@pytest.mark.parametrize("overrides, message", [
    ({"tokenizer.ggml.pre": ["STRING", "no-such-pre"]}, "no-such-pre"),
    ({"tokenizer.ggml.model": ["STRING", "bert"]}, "bert"),
])
def test_unsupported_tokenizers_are_named(smol, tmp_path, overrides, message):
    path = variant(smol[0], overrides, tmp_path)
    _ffi = require_native()
    ffi, lib = _ffi.ffi, _ffi.lib
    params = ffi.new("struct ckv_model_params *")
    lib.ckv_model_default_params(params)
    params.vocab_only = True
    out = ffi.new("ckv_model **")
    assert lib.ckv_model_load(path.encode(), params, out) == lib.CKV_ERR_UNSUPPORTED
    assert message in ffi.string(lib.ckv_last_error()).decode()


def test_missing_token_list_is_a_format_error(smol, tmp_path):
    path = variant(smol[0], {"tokenizer.ggml.tokens": None}, tmp_path)
    _ffi = require_native()
    ffi, lib = _ffi.ffi, _ffi.lib
    params = ffi.new("struct ckv_model_params *")
    lib.ckv_model_default_params(params)
    params.vocab_only = True
    out = ffi.new("ckv_model **")
    assert lib.ckv_model_load(path.encode(), params, out) == lib.CKV_ERR_FORMAT
    assert "tokenizer.ggml.tokens" in ffi.string(lib.ckv_last_error()).decode()


def test_essays_give_the_documented_token_count(smol):
    """All 51 Paul Graham essays (644 KB) give 153,955 SmolLM2 tokens, the count llama.cpp's
    tokenizer gives (shared/docs/models-and-data.md, appendix B)."""
    _, vocab = smol
    essays = sorted(glob.glob(os.path.join(ROOT, "..", "shared", "data", "pg_essays", "*.txt")))
    if not essays:
        pytest.skip("shared/data/pg_essays not present")
    text = b"".join(open(p, "rb").read() for p in essays)
    assert len(vocab.tokenize(text, False, False)) == 153955
