"""GBNF grammars: the native engine against independent references, and constrained generation.

- Regular grammars drawn at random are rendered twice, as GBNF and as a Python regular
  expression; `LlamaGrammar.accepts` must agree with `re.fullmatch` on strings drawn from the
  grammar, mutated and random (multi-byte characters included).
- The token mask (`ckv_grammar_apply`, a walk over the sorted vocabulary) is checked against a
  Thompson NFA written here over the same random expressions, token by token, on SmolLM2's
  49152-token vocabulary, and against the per-token `allows()` path on the JSON grammar.
- Generation: a grammar that admits one sentence must produce it; JSON mode must produce JSON.
"""
import json
import random
import re
import time

import numpy as np
import pytest

from conftest import require_native

require_native()

from clusterkv_local import JSON_GBNF, Llama, LlamaGrammar  # noqa: E402
from clusterkv_local._internals import _Grammar  # noqa: E402

ALPHABET = ["a", "b", "c", " ", '"', "\\", "-", "]", "\n", "é", "ж", "😀"]


# ---------------------------------------------------------------------------------------------
# Random regular expressions: one tree, two renderings (GBNF, Python re) and an NFA
# ---------------------------------------------------------------------------------------------

def gbnf_char(c: str) -> str:
    return {'"': '\\"', "\\": "\\\\", "\n": "\\n", "]": "\\]", "-": "\\-", "^": "\\^",
            "[": "\\["}.get(c, c)


class Node:
    """kind: lit (text), cls (members: [(lo, hi)], negated), any, cat/alt (kids), rep (kid, lo,
    hi or None), ref (kid, its own rule)."""

    def __init__(self, kind, **kw):
        self.kind = kind
        self.__dict__.update(kw)

    def nullable(self) -> bool:
        if self.kind == "lit":
            return self.text == ""
        if self.kind in ("cls", "any"):
            return False
        if self.kind == "cat":
            return all(k.nullable() for k in self.kids)
        if self.kind == "alt":
            return any(k.nullable() for k in self.kids)
        if self.kind == "rep":
            return self.lo == 0 or self.kid.nullable()
        return self.kid.nullable()


def random_node(rng: random.Random, depth: int) -> Node:
    kinds = ["lit", "cls", "any"] + (["cat", "alt", "rep", "ref"] * 2 if depth > 0 else [])
    kind = rng.choice(kinds)
    if kind == "lit":
        return Node("lit", text="".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 3))))
    if kind == "cls":
        members = []
        for _ in range(rng.randint(1, 3)):
            a, b = sorted(rng.sample(ALPHABET, 2), key=ord) if rng.random() < 0.3 else \
                [rng.choice(ALPHABET)] * 2
            members.append((a, b))
        return Node("cls", members=members, negated=rng.random() < 0.3)
    if kind == "any":
        return Node("any")
    if kind in ("cat", "alt"):
        return Node(kind, kids=[random_node(rng, depth - 1) for _ in range(rng.randint(2, 3))])
    if kind == "ref":
        return Node("ref", kid=random_node(rng, depth - 1))
    kid = random_node(rng, depth - 1)
    # Unbounded repetition of something that can be empty is refused (it never ends).
    forms = [(0, 1), (0, 2), (1, 3), (2, 2)] + ([] if kid.nullable() else [(0, None), (1, None),
                                                                             (2, None)])
    lo, hi = rng.choice(forms)
    return Node("rep", kid=kid, lo=lo, hi=hi)


def to_gbnf(node: Node, rules: list) -> str:
    k = node.kind
    if k == "lit":
        return '"%s"' % "".join(gbnf_char(c) for c in node.text)
    if k == "cls":
        body = "".join(gbnf_char(a) if a == b else "%s-%s" % (gbnf_char(a), gbnf_char(b))
                       for a, b in node.members)
        return "[%s%s]" % ("^" if node.negated else "", body)
    if k == "any":
        return "."
    if k == "cat":
        return " ".join(to_gbnf(c, rules) for c in node.kids)
    if k == "alt":
        return "( %s )" % " | ".join(to_gbnf(c, rules) for c in node.kids)
    if k == "ref":
        name = "r%d" % (len(rules) + 1)
        rules.append(None)
        rules[int(name[1:]) - 1] = "%s ::= %s" % (name, to_gbnf(node.kid, rules))
        return name
    op = {(0, 1): "?", (0, None): "*", (1, None): "+"}.get((node.lo, node.hi))
    if op is None:
        op = "{%d,%s}" % (node.lo, "" if node.hi is None else node.hi) if node.hi != node.lo \
            else "{%d}" % node.lo
    return "( %s )%s" % (to_gbnf(node.kid, rules), op)


def to_regex(node: Node) -> str:
    k = node.kind
    if k == "lit":
        return re.escape(node.text)
    if k == "cls":
        body = "".join(re.escape(a) if a == b else "%s-%s" % (re.escape(a), re.escape(b))
                       for a, b in node.members)
        return "[%s%s]" % ("^" if node.negated else "", body)
    if k == "any":
        return "."
    if k == "cat":
        return "".join("(?:%s)" % to_regex(c) for c in node.kids)
    if k == "alt":
        return "(?:%s)" % "|".join(to_regex(c) for c in node.kids)
    if k == "ref":
        return "(?:%s)" % to_regex(node.kid)
    return "(?:%s){%d,%s}" % (to_regex(node.kid), node.lo, "" if node.hi is None else node.hi)


def grammar_text(node: Node) -> str:
    rules = []
    root = "root ::= " + to_gbnf(node, rules)
    return "\n".join([root] + rules) + "\n"


def sample_string(rng: random.Random, node: Node) -> str:
    k = node.kind
    if k == "lit":
        return node.text
    if k == "cls":
        for _ in range(50):
            c = rng.choice(ALPHABET + ["x", "\t"])
            inside = any(ord(a) <= ord(c) <= ord(b) for a, b in node.members)
            if inside != node.negated:
                return c
        return ""
    if k == "any":
        return rng.choice(ALPHABET)
    if k == "cat":
        return "".join(sample_string(rng, c) for c in node.kids)
    if k == "alt":
        return sample_string(rng, rng.choice(node.kids))
    if k == "ref":
        return sample_string(rng, node.kid)
    n = rng.randint(node.lo, node.hi if node.hi is not None else node.lo + 3)
    return "".join(sample_string(rng, node.kid) for _ in range(n))


def mutate(rng: random.Random, s: str) -> str:
    i = rng.randint(0, len(s))
    op = rng.randrange(3)
    if op == 0 and s:
        return s[:max(0, i - 1)] + s[i:]
    if op == 1:
        return s[:i] + rng.choice(ALPHABET) + s[i:]
    return s[:i] + rng.choice(ALPHABET) + s[i + 1:]


class NFA:
    """Thompson construction over code points: viable(prefix) says whether some text starting
    with prefix matches (every state built here can reach the accepting one)."""

    def __init__(self, node: Node):
        self.eps, self.edges = [], []  # per state: epsilon targets; (predicate, target)
        self.start, self.accept = self.build(node)

    def state(self) -> int:
        self.eps.append([])
        self.edges.append([])
        return len(self.eps) - 1

    def build(self, node: Node):
        s, e = self.state(), self.state()
        k = node.kind
        if k == "lit":
            cur = s
            for c in node.text:
                nxt = self.state()
                self.edges[cur].append((lambda x, c=c: x == c, nxt))
                cur = nxt
            self.eps[cur].append(e)
        elif k in ("cls", "any"):
            if k == "any":
                pred = lambda x: True  # noqa: E731
            else:
                pred = (lambda x, m=node.members, neg=node.negated:
                        any(ord(a) <= ord(x) <= ord(b) for a, b in m) != neg)
            self.edges[s].append((pred, e))
        elif k == "cat":
            cur = s
            for kid in node.kids:
                a, b = self.build(kid)
                self.eps[cur].append(a)
                cur = b
            self.eps[cur].append(e)
        elif k == "alt":
            for kid in node.kids:
                a, b = self.build(kid)
                self.eps[s].append(a)
                self.eps[b].append(e)
        elif k == "ref":
            a, b = self.build(node.kid)
            self.eps[s].append(a)
            self.eps[b].append(e)
        else:
            cur = s
            for _ in range(node.lo):
                a, b = self.build(node.kid)
                self.eps[cur].append(a)
                cur = b
            if node.hi is None:
                a, b = self.build(node.kid)
                self.eps[cur].append(a)
                self.eps[b].append(cur)
                self.eps[cur].append(e)
            else:
                for _ in range(node.hi - node.lo):
                    a, b = self.build(node.kid)
                    self.eps[cur].append(a)
                    self.eps[cur].append(e)
                    cur = b
                self.eps[cur].append(e)
        return s, e

    def closure(self, states):
        todo, seen = list(states), set(states)
        while todo:
            for t in self.eps[todo.pop()]:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return frozenset(seen)

    def run(self, states, text: str):
        for c in text:
            states = self.closure({t for s in states for pred, t in self.edges[s] if pred(c)})
            if not states:
                break
        return states


# ---------------------------------------------------------------------------------------------
# Text acceptance
# ---------------------------------------------------------------------------------------------

def test_random_regular_grammars_agree_with_python_re():
    rng = random.Random(7)
    checked = accepted = 0
    for case in range(60):
        node = random_node(rng, 3)
        text = grammar_text(node)
        grammar = LlamaGrammar.from_string(text)
        pattern = re.compile(to_regex(node), re.DOTALL)
        samples = [sample_string(rng, node) for _ in range(12)]
        strings = samples + [mutate(rng, s) for s in samples] + \
            ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 6))) for _ in range(12)]
        for s in strings:
            want = pattern.fullmatch(s) is not None
            assert grammar.accepts(s) == want, (text, to_regex(node), s)
            checked += 1
            accepted += want
    assert checked == 60 * 36 and 0.2 * checked < accepted < 0.9 * checked


@pytest.mark.parametrize("grammar, yes, no", [
    # comments, a rule spread over lines inside parentheses, alternatives after a newline + |
    ('# greeting\nroot ::= ( "hi"   # short\n  | "hello" ) ws name\nws ::= " "+\n'
     'name ::= [A-Z] [a-z]*\n',
     ["hi Bo", "hello  Ann", "hi X"], ["hi", "hi bo", "hey Bo", "hello Ann "]),
    (r'root ::= "\x41\u00e9\U0001F600\t\"\\"', ["Aé😀\t\"\\"], ["Aé😀", "A\\u00e9"]),
    (r'root ::= [\]\-^a]+', ["]-^a", "a"], ["b", ""]),
    (r'root ::= [^a-z\n]{2,3}', ["AB", "12!", "éé"], ["aB", "A\nB", "A", "ABCD"]),
    ('root ::= "a"{0} "b"{3} "c"{1,}',
     ["bbbc", "bbbccc"], ["abbbc", "bbc", "bbb"]),
    ('root ::= x x\nx ::= "a" | "ab"\n', ["aa", "aab", "abab", "aba"], ["a", "abb"]),
    ('root ::= item ("," item)*\nitem ::= [0-9]+ | "(" root ")"\n',
     ["1", "1,(2,3),((4))", "(1,(2))"], ["", "1,", "(1", "())"]),
    ('root ::= ""', [""], ["a"]),
    ('root ::= . .', ["ab", "\n😀"], ["a", "abc"]),
])
def test_hand_written_grammars(grammar, yes, no):
    g = LlamaGrammar.from_string(grammar)
    assert [g.accepts(s) for s in yes] == [True] * len(yes)
    assert [g.accepts(s) for s in no] == [False] * len(no)


@pytest.mark.parametrize("grammar, message", [
    ('root ::= x', "rule 'x' is used but not defined"),
    ('start ::= "a"', "no rule named 'root'"),
    ('root ::= root "a" | "b"', "rule 'root' can reach itself"),
    ('root ::= a\na ::= b? root\nb ::= "b"', "can reach itself"),
    ('root ::= ("a"?)*', "can reach itself"),
    ('root ::= "abc', "line 1, column 10: unterminated string literal"),
    ('root ::= "a"\n\nroot ::= "b"', "line 3, column 1: rule defined twice"),
    ('root ::= [b-a]', "end before its start"),
    ('root ::= []', "empty character class"),
    ('root ::= "a"{3,1}', "n < m"),
    ('root ::= "a"{99999}', "repetition count too large"),
    ('root ::= * "a"', "a repetition must follow a symbol"),
    ('root ::= "a" )', "unexpected character"),
    ('root ::= ( "a"', "expected ')'"),
    ('root "a"', "expected '::='"),
    (r'root ::= "\q"', "unknown escape"),
    (r'root ::= "\u12"', "hex digits"),
    ('root ::= <[1000]>', "token references"),
    ('', "no rules"),
])
def test_grammar_errors_name_the_problem(grammar, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LlamaGrammar.from_string(grammar)


def test_grammar_argument_types():
    with pytest.raises(TypeError):
        LlamaGrammar.from_string(b'root ::= "a"')
    g = LlamaGrammar.from_string('root ::= "a"')
    assert g.grammar == 'root ::= "a"' and g.root == "root" and "root" in repr(g)


def test_text_may_stop_inside_a_utf8_sequence():
    state = _Grammar(None, 'root ::= "a" [é-ê] "b"')
    assert state.accept_text(b"a\xc3")       # first byte of é: é or ê may still follow
    assert not state.is_complete()
    assert not state.accept_text(b"\x80")     # \xc3\x80 is À: refused, the state stays
    assert state.accept_text(b"\xa9b") and state.is_complete()
    state.reset()
    assert not state.accept_text(b"a\xc0\x80")  # overlong encoding
    assert not state.accept_text(b"\xff")


def test_long_repetitions_do_not_deepen_the_stacks():
    # A rule that ends in a reference to itself is a loop, not a nesting: 10000 repetitions
    # stay far below the nesting limit (4096).
    for grammar in ('root ::= "a"*', 'root ::= x\nx ::= "a" x |', 'root ::= ("a" | "b")+ "."'):
        g = LlamaGrammar.from_string(grammar)
        text = "a" * 10000 + ("." if "." in grammar else "")
        assert g.accepts(text)
    deep = LlamaGrammar.from_string('root ::= "(" root ")" | "x"')
    assert deep.accepts("(" * 1000 + "x" + ")" * 1000)
    with pytest.raises(ValueError, match="nesting deeper than"):
        deep.accepts("(" * 5000 + "x" + ")" * 5000)


def test_huge_or_deep_grammars_fail_cleanly_or_compile_fast():
    """Grammars can come from anywhere (e.g. a JSON Schema): deep nesting is an error, never a
    native stack overflow, and the checks stay linear in the number of rules."""
    with pytest.raises(ValueError, match="groups nested too deeply"):
        LlamaGrammar.from_string("root ::= " + "(" * 100000 + '"a"' + ")" * 100000)
    chain = "root ::= a0\n" + "".join("a%d ::= a%d\n" % (i, i + 1) for i in range(100000))
    with pytest.raises(ValueError, match="nesting deeper than"):
        LlamaGrammar.from_string(chain + 'a100000 ::= "x"\n')    # 100000 rules before a character
    with pytest.raises(ValueError, match="rule 'a0' can reach itself"):
        LlamaGrammar.from_string(chain + 'a100000 ::= a0 "x"\n')
    start = time.perf_counter()
    wide = LlamaGrammar.from_string("root ::= a0\n" + "".join(
        'a%d ::= "x" a%d | ""\n' % (i, i + 1) for i in range(100000)) + 'a100000 ::= ""\n')
    assert time.perf_counter() - start < 5.0
    assert wide.accepts("xxx") and not wide.accepts("xy")


def test_from_file(tmp_path):
    path = tmp_path / "g.gbnf"
    path.write_text('root ::= "ok"\n', encoding="utf-8")
    assert LlamaGrammar.from_file(str(path)).accepts("ok")


# ---------------------------------------------------------------------------------------------
# Token masks on a real vocabulary
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vocab_llm(default_model_path):
    model = Llama(default_model_path, vocab_only=True, verbose=False)
    yield model
    model.close()


def pieces(llm):
    return [llm._model.token_to_piece(t) for t in range(llm.n_vocab())]


def test_mask_matches_an_nfa_token_by_token(vocab_llm):
    """For each token: allowed <=> the text so far + its piece can still match (a piece that
    ends inside a UTF-8 sequence is left out: the NFA reads whole code points)."""
    rng = random.Random(3)
    all_pieces = pieces(vocab_llm)
    eog = [vocab_llm._model.is_eog(t) for t in range(len(all_pieces))]
    cases = 0
    while cases < 4:
        node = random_node(rng, 3)
        nfa = NFA(node)
        prefix = sample_string(rng, node)[:rng.randint(0, 3)]
        state = vocab_llm._grammar_for(LlamaGrammar.from_string(grammar_text(node)))
        if not state.accept_text(prefix.encode()):
            continue
        at = nfa.run(nfa.closure({nfa.start}), prefix)
        mask = np.isfinite(state.apply(np.zeros(len(all_pieces), np.float32)))
        compared = 0
        for t, piece in enumerate(all_pieces):
            if eog[t]:
                assert mask[t] == (nfa.accept in at), t
                continue
            try:
                text = piece.decode("utf-8")
            except UnicodeDecodeError:
                continue
            assert mask[t] == (bool(text) and bool(nfa.run(at, text))), (grammar_text(node),
                                                                          prefix, piece)
            compared += 1
        assert compared > 40000
        cases += 1


@pytest.mark.parametrize("prefix", [b"", b"{", b'{"na', b'{"name": "caf\xc3', b'{"a": [1, 2',
                                    b'{"a": 1}', b'{"a": -', b'{"a": 1.5e'])
def test_json_mask_equals_per_token_checks(vocab_llm, prefix):
    state = vocab_llm._grammar_for(LlamaGrammar.from_string(JSON_GBNF))
    assert state.accept_text(prefix)
    n = vocab_llm.n_vocab()
    logits = np.zeros(n, np.float32)
    masked = np.random.default_rng(0).random(n) < 0.1  # entries already -inf stay so
    logits[masked] = -np.inf
    mask = np.isfinite(state.apply(logits))
    allowed = np.array([state.allows(t) for t in range(n)])
    assert np.array_equal(mask, allowed & ~masked)
    assert allowed.sum() > 0
    if prefix == b'{"a": 1}':  # complete: only end-of-generation tokens
        assert set(np.flatnonzero(allowed)) == {t for t in range(n) if vocab_llm._model.is_eog(t)}


def test_accept_token_refuses_a_forbidden_token(vocab_llm):
    state = vocab_llm._grammar_for('root ::= "ab" | "ac"')
    a, b, z = (vocab_llm.tokenize(x.encode(), add_bos=False)[0] for x in ("a", "b", "z"))
    with pytest.raises(ValueError, match="does not allow token"):
        state.accept_token(z)
    state.accept_token(a)                       # unchanged by the refusal above
    eos = vocab_llm.token_eos()
    assert not state.allows(eos)
    state.accept_token(b)
    assert state.is_complete() and state.allows(eos) and not state.allows(a)
    with pytest.raises(ValueError, match="no token can continue"):
        state.apply(np.full(vocab_llm.n_vocab(), -np.inf, np.float32))


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------

def test_a_one_sentence_grammar_is_what_gets_generated(llm):
    sentence = "The café is open, 7 days a week! 😀"
    grammar = LlamaGrammar.from_string('root ::= "%s"' % sentence)
    for temperature in (0, 1.5):
        out = llm("Once upon a time", grammar=grammar, max_tokens=64, temperature=temperature,
                  seed=5)
        assert out["choices"][0]["text"] == sentence
        assert out["choices"][0]["finish_reason"] == "stop"


def test_choice_grammar_with_sampling_and_streaming(llm):
    grammar = 'root ::= ("yes" | "no" | "maybe") "."'
    texts = set()
    for seed in range(6):
        out = llm("Q: Is the sky green? A:", grammar=grammar, max_tokens=8, temperature=1.0,
                  seed=seed)
        text = out["choices"][0]["text"]
        streamed = "".join(c["choices"][0]["text"] for c in llm(
            "Q: Is the sky green? A:", grammar=grammar, max_tokens=8, temperature=1.0,
            seed=seed, stream=True))
        assert text in ("yes.", "no.", "maybe.") and streamed == text
        texts.add(text)
    assert len(texts) >= 2  # the draw still samples among the allowed answers


def test_generate_yields_only_grammar_tokens(llm):
    grammar = LlamaGrammar.from_string('root ::= [0-9]+ ("," [0-9]+)*')
    tokens = []
    for token in llm.generate(llm.tokenize(b"Numbers:"), temp=0.9, grammar=grammar):
        if llm._model.is_eog(token) or len(tokens) == 12:
            break
        tokens.append(token)
    text = llm.detokenize(tokens).decode()
    assert re.fullmatch(r"[0-9]+(,[0-9]+)*,?", text), text


def test_json_mode_chat_gives_json(llm):
    for seed in (1, 2, 3):
        out = llm.create_chat_completion(
            [{"role": "user", "content": "Describe a dog as JSON with name and age."}],
            response_format={"type": "json_object"}, max_tokens=200, temperature=0.7, seed=seed)
        choice = out["choices"][0]
        if choice["finish_reason"] == "stop":
            assert isinstance(json.loads(choice["message"]["content"]), dict)
        else:  # cut by max_tokens: still a prefix the grammar allows
            assert LlamaGrammar.from_string(JSON_GBNF)._text_state.accept_text(
                choice["message"]["content"].encode())


def test_json_schema_chat_follows_the_schema(llm):
    schema = {"type": "object", "properties": {"name": {"type": "string"},
                                               "age": {"type": "integer"},
                                               "good": {"type": "boolean"}},
              "required": ["name", "age", "good"]}
    out = llm.create_chat_completion(
        [{"role": "user", "content": "A dog as JSON."}], temperature=0, max_tokens=120,
        response_format={"type": "json_schema", "json_schema": {"name": "dog", "schema": schema}})
    value = json.loads(out["choices"][0]["message"]["content"])
    assert list(value) == ["name", "age", "good"]
    assert isinstance(value["name"], str) and type(value["age"]) is int
    assert isinstance(value["good"], bool)


def test_response_format_errors(llm):
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(ValueError, match="only one of grammar, response_format"):
        llm.create_chat_completion(messages, grammar='root ::= "a"',
                                   response_format={"type": "json_object"})
    with pytest.raises(ValueError, match="'text', 'json_object' or 'json_schema'"):
        llm.create_chat_completion(messages, response_format={"type": "xml"})
    with pytest.raises(ValueError, match="must be a dict"):
        llm.create_chat_completion(messages, response_format="json")
    with pytest.raises(TypeError, match="LlamaGrammar or GBNF text"):
        llm("Hi", grammar=42)
    out = llm.create_chat_completion(messages, response_format={"type": "text"}, max_tokens=2,
                                     temperature=0)
    assert out["choices"][0]["message"]["content"] is not None


# ---------------------------------------------------------------------------------------------
# Tool calls forced by tool_choice / function_call
# ---------------------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer"}}, "required": ["city", "unit", "days"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "string"}}, "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris for the next 3 days?"}]


def check_weather_arguments(arguments: str):
    value = json.loads(arguments)
    assert list(value) == ["city", "unit", "days"]
    assert isinstance(value["city"], str) and value["unit"] in ("celsius", "fahrenheit")
    assert type(value["days"]) is int


def test_a_named_tool_choice_returns_its_call(llm):
    out = llm.create_chat_completion(
        ASK, tools=[WEATHER, TIME], temperature=0, max_tokens=80,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    check_weather_arguments(call["function"]["arguments"])
    # streamed: the same call, then a chunk with the finish_reason
    chunks = list(llm.create_chat_completion(
        ASK, tools=[WEATHER, TIME], temperature=0, max_tokens=80, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    delta = chunks[1]["choices"][0]["delta"]
    assert delta["tool_calls"][0]["index"] == 0 and "content" not in delta
    assert delta["tool_calls"][0]["function"] == call["function"]
    assert len(chunks) == 3 and chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_required_tool_choice_picks_one_of_the_tools(llm):
    names = set()
    for seed in range(4):
        out = llm.create_chat_completion(ASK, tools=[WEATHER, TIME], tool_choice="required",
                                         temperature=1.0, seed=seed, max_tokens=120)
        choice = out["choices"][0]
        if choice["finish_reason"] == "length":
            continue  # cut short: the partial text stays in content
        (call,) = choice["message"]["tool_calls"]
        name = call["function"]["name"]
        names.add(name)
        if name == "get_weather":
            check_weather_arguments(call["function"]["arguments"])
        else:
            assert isinstance(json.loads(call["function"]["arguments"])["zone"], str)
    assert names and names <= {"get_weather", "get_time"}


def test_legacy_function_call(llm):
    out = llm.create_chat_completion(ASK, functions=[WEATHER["function"]], temperature=0,
                                     function_call={"name": "get_weather"}, max_tokens=80)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "function_call"
    assert choice["message"]["function_call"]["name"] == "get_weather"
    check_weather_arguments(choice["message"]["function_call"]["arguments"])


def test_tool_choice_auto_and_none_reply_with_text(llm):
    """SmolLM2's template does not show the tools, so it answers in text."""
    for tool_choice in ("auto", "none", None):
        out = llm.create_chat_completion(ASK, tools=[WEATHER], tool_choice=tool_choice,
                                         temperature=0, max_tokens=8)
        assert isinstance(out["choices"][0]["message"]["content"], str)
        assert "tool_calls" not in out["choices"][0]["message"]


def test_tool_choice_errors(llm):
    with pytest.raises(ValueError, match="'get_time', which is not among the tools"):
        llm.create_chat_completion(ASK, tools=[WEATHER], max_tokens=4, tool_choice={
            "type": "function", "function": {"name": "get_time"}})
    with pytest.raises(ValueError, match="tool_choice must be"):
        llm.create_chat_completion(ASK, tools=[WEATHER], tool_choice="always", max_tokens=4)
    with pytest.raises(ValueError, match="'required' needs tools"):
        llm.create_chat_completion(ASK, tool_choice="required", max_tokens=4)
    with pytest.raises(ValueError, match="only one of grammar, response_format"):
        llm.create_chat_completion(ASK, tools=[WEATHER], tool_choice="required",
                                   response_format={"type": "json_object"}, max_tokens=4)
    with pytest.raises(ValueError, match="each tool needs"):
        llm.create_chat_completion(ASK, tools=[{"type": "function"}], tool_choice="required")
    with pytest.raises(ValueError, match="unsupported JSON Schema keyword 'pattern'"):
        bad = {"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"x": {"type": "string", "pattern": "a+"}}}}}
        llm.create_chat_completion(ASK, tools=[bad], tool_choice="required")
