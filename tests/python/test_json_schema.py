"""JSON grammars (clusterkv_local/json_schema.py) run through the GBNF engine (grammar.py).

The truth each test checks against is independent of the grammars: json.loads for JSON_GBNF
and JSON_VALUE_GBNF, and for json_schema_to_gbnf instances that are valid or invalid by
construction.
"""
import functools
import json
import random
import re

import pytest

from conftest import require_native

require_native()

from clusterkv_local.grammar import LlamaGrammar  # noqa: E402
from clusterkv_local.json_schema import (JSON_GBNF, JSON_VALUE_GBNF,  # noqa: E402
                                         json_schema_to_gbnf)


@functools.lru_cache(maxsize=None)
def compiled(grammar_text: str) -> LlamaGrammar:
    return LlamaGrammar.from_string(grammar_text, verbose=False)


def accepts(grammar_text: str, text: str) -> bool:
    return compiled(grammar_text).accepts(text)


# --- JSON_GBNF against json.loads --------------------------------------------------------

# Between two tokens: nothing, one space, or one newline and at most 20 spaces or tabs.
BOUNDED_WS = re.compile(r"(?: |\n[ \t]{0,20})?")


def _reject_constant(name):
    raise ValueError("not JSON: " + name)


def bounded_whitespace(text: str) -> bool:
    """Whether every whitespace run outside strings in `text` (valid JSON) is one the grammar
    allows, with none before or after the value."""
    runs, run, in_string, escaped = [], "", False, False
    for c in text:
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
            continue
        if c in " \t\n\r":
            run += c
            continue
        runs.append(run)
        run = ""
        in_string = c == '"'
    runs.append(run)
    return runs[0] == "" and runs[-1] == "" and all(BOUNDED_WS.fullmatch(r) for r in runs)


def json_truth(text: str, objects_only: bool = True) -> bool:
    """What the grammar must decide for `text`, from json.loads. json.loads is looser than the
    grammar in two ways, both taken out here: it parses NaN, Infinity and -Infinity (not JSON,
    so parse_constant refuses them), and it allows any run of [ \\t\\n\\r] between tokens and
    around the value, which the grammar bounds on purpose (bounded_whitespace)."""
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except ValueError:
        return False
    return (isinstance(value, dict) or not objects_only) and bounded_whitespace(text)


def random_ws(rng: random.Random, style: str) -> str:
    if style == "compact":
        return ""
    if style == "spaced":
        return rng.choice(["", " "])
    return rng.choice(["", "", " ", "\n" + "".join(rng.choice(" \t")
                                                  for _ in range(rng.randint(0, 20)))])


def random_number(rng: random.Random) -> str:
    digits = lambda n: "".join(rng.choice("0123456789") for _ in range(n))  # noqa: E731
    whole = rng.choice(["0", str(rng.randint(1, 9)), str(rng.randint(10, 10 ** 15))])
    fraction = rng.choice(["", "", "." + digits(rng.randint(1, 6))])
    exponent = rng.choice(["", "", rng.choice("eE") + rng.choice(["", "+", "-"])
                           + digits(rng.randint(1, 3))])
    return rng.choice(["", "-"]) + whole + fraction + exponent


# Pieces of a JSON string's text: plain and non-ASCII characters (astral too), DEL and C1
# (legal unescaped), and every escape form, a surrogate pair and a lone surrogate included.
STRING_PIECES = (list("abcXYZ019 /'#{}[],:")
                 + ["é", "ß", "中文", "😀", "\u2028", "\x7f", "\x80"]
                 + ['\\"', "\\\\", "\\/", "\\b", "\\f", "\\n", "\\r", "\\t", "\\u00e9",
                    "\\u00E9", "\\ud83d\\ude00", "\\ud800", "\\u0000", "\\uFFFF"])


def random_string(rng: random.Random) -> str:
    return '"%s"' % "".join(rng.choice(STRING_PIECES) for _ in range(rng.randint(0, 8)))


def random_value(rng: random.Random, depth: int, style: str) -> str:
    kinds = ["string", "number", "literal"] + (["object", "array"] * 2 if depth < 4 else [])
    kind = rng.choice(kinds)
    if kind == "object":
        return random_object(rng, depth + 1, style)
    if kind == "array":
        ws = lambda: random_ws(rng, style)  # noqa: E731
        items = [random_value(rng, depth + 1, style) for _ in range(rng.randint(0, 4))]
        if not items:
            return "[" + ws() + "]"
        return "[" + ws() + ("," + ws()).join(item + ws() for item in items) + "]"
    if kind == "string":
        return random_string(rng)
    if kind == "number":
        return random_number(rng)
    return rng.choice(["true", "false", "null"])


def random_object(rng: random.Random, depth: int, style: str) -> str:
    ws = lambda: random_ws(rng, style)  # noqa: E731
    members = [random_string(rng) + ws() + ":" + ws() + random_value(rng, depth, style) + ws()
               for _ in range(rng.randint(0, 4))]
    return "{" + ws() + ",".join(members[:1] + [ws() + m for m in members[1:]]) + "}"


def random_python_value(rng: random.Random, depth: int = 0):
    kind = rng.choice(["dict", "list", "str", "int", "float", "const"] if depth < 3
                      else ["str", "int", "float", "const"])
    if kind == "dict":
        return {random_python_string(rng): random_python_value(rng, depth + 1)
                for _ in range(rng.randint(0, 3))}
    if kind == "list":
        return [random_python_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind == "str":
        return random_python_string(rng)
    if kind == "int":
        return rng.randint(-10 ** 12, 10 ** 12)
    if kind == "float":
        return rng.choice([rng.uniform(-1e6, 1e6), rng.uniform(-1, 1) * 1e-30, 1e300, -0.0])
    return rng.choice([True, False, None])


def random_python_string(rng: random.Random) -> str:
    return "".join(rng.choice('ab "\\/\n\t\x01é中😀\u2028') for _ in range(rng.randint(0, 6)))


def dumps_variants(value) -> list:
    """The forms json.dumps writes; all keep to the bounded whitespace at these depths."""
    return [json.dumps(value, separators=(",", ":")), json.dumps(value),
            json.dumps(value, ensure_ascii=False), json.dumps(value, indent=2),
            json.dumps(value, indent="\t", ensure_ascii=False)]


MUTATION_CHARS = (list("{}[]:,\"\\'0123456789.eE+-tfnu ") + ["\n", "\t", "\r", "\x00", "\x1f",
                                                            "é", "😀", "\u2028", "a"])


def mutate(rng: random.Random, text: str) -> str:
    i = rng.randrange(len(text))
    op = rng.choice(["drop", "insert", "replace"])
    if op == "drop":
        return text[:i] + text[i + 1:]
    c = rng.choice(MUTATION_CHARS)
    return text[:i] + c + text[i + (op == "replace"):]


# (text, expected) written by hand; the expectation is checked against json_truth too.
HAND_CASES = [
    ("{}", True), ("{ }", True), ('{"":""}', True), ('{"a":1,"a":2}', True),
    ('{"a":"\x7f"}', True), ('{"a":"\\ud800"}', True), ('{"a":-0}', True),
    ('{"a":0.5e-0}', True), ('{"a":1E+2}', True), ('{"a":[]}', True),
    ('{\n"a": 1\n}', True), ('{\n' + " " * 20 + '"a": 1}', True),
    ('{\n\t\t"a": 1}', True),
    ('{"a":1,}', False), ('{"a":[1,]}', False), ('{"a":[,1]}', False), ('{,}', False),
    ("{'a':1}", False), ('{"a":\'x\'}', False), ('{"a":01}', False), ('{"a":1.}', False),
    ('{"a":.5}', False), ('{"a":+1}', False), ('{"a":NaN}', False), ('{"a":Infinity}', False),
    ('{"a":-Infinity}', False), ('{"a":"\x01"}', False), ('{"a":"\n"}', False),
    ('{"a":"\\"}', False), ('{"a":"\\x41"}', False), ('{"a":"\\u12"}', False),
    ('{"a":1e}', False), ('{"a":1e+}', False), ('{"a":-}', False), ('{"a":--1}', False),
    ('{"a":1.e5}', False), ('{"a":tru}', False), ('{"a":nulll}', False), ('{"a" 1}', False),
    ('{"a":1}{"b":2}', False), ('{"a":1', False), ('"a"', False), ("[1]", False),
    ("1", False), ("null", False), ("", False),
    # Whitespace json.loads takes but the grammar bounds (see json_truth).
    (" {}", False), ("{}\n", False), ('{  "a":1}', False), ('{"a":\n\n1}', False),
    ('{\r\n"a":1}', False), ('{\n' + " " * 21 + '"a": 1}', False), ('{\t"a":1}', False),
]


def json_corpus():
    """(generated valid objects, their mutants + the hand cases)."""
    rng = random.Random(20240611)
    valid = []
    for i in range(180):
        valid.append(random_object(rng, 0, ("compact", "spaced", "bounded")[i % 3]))
    for _ in range(40):
        value = random_python_value(rng)
        value = value if isinstance(value, dict) else {"v": value}
        valid.extend(dumps_variants(value))
    mutants = [mutate(rng, rng.choice(valid)) for _ in range(260)]
    return valid, mutants + [text for text, _ in HAND_CASES]


def test_hand_cases_agree_with_json_loads():
    # Guards the oracle: if json_truth disagreed with these, the corpus test would be moot.
    assert [json_truth(t) for t, _ in HAND_CASES] == [want for _, want in HAND_CASES]


def test_json_gbnf_matches_json_loads():
    valid, others = json_corpus()
    assert all(json_truth(text) for text in valid)      # the generator's own check
    corpus = valid + others
    wrong = [(text, json_truth(text)) for text in corpus
             if accepts(JSON_GBNF, text) != json_truth(text)]
    assert wrong == [], "%d disagreements, first: %r" % (len(wrong), wrong[:5])
    accepted = sum(json_truth(text) for text in corpus)
    assert len(corpus) >= 600 and accepted >= 350 and len(corpus) - accepted >= 150


def test_json_value_gbnf_matches_json_loads():
    rng = random.Random(7)
    corpus = [random_value(rng, 0, "bounded") for _ in range(150)]
    corpus += [mutate(rng, text) for text in corpus if text]
    corpus += ["1", "-0.5e3", '"x"', "true", "null", "[ ]", " 1", "1 ", "01", "nul", "[1,]"]
    wrong = [text for text in corpus
             if accepts(JSON_VALUE_GBNF, text) != json_truth(text, objects_only=False)]
    assert wrong == []
    assert any(json_truth(t, objects_only=False) for t in corpus)


def test_json_gbnf_shape():
    assert JSON_GBNF.startswith("root ::= object\n")
    assert JSON_VALUE_GBNF.startswith("root ::= value\n")
    # A model can never write more than one newline between two tokens.
    assert not accepts(JSON_GBNF, '{"a":' + "\n" * 2 + "1}")


# --- json_schema_to_gbnf: valid and invalid instances by construction --------------------

def texts(value) -> list:
    """Serialisations a model could write for `value`. ensure_ascii=False throughout: keys and
    enum/const strings are matched as json.dumps spells them, non-ASCII literally."""
    return [json.dumps(value, separators=(",", ":"), ensure_ascii=False),
            json.dumps(value, ensure_ascii=False), json.dumps(value, indent=2, ensure_ascii=False)]


def check_schema(schema, valid, invalid):
    grammar = json_schema_to_gbnf(schema)
    for value in valid:
        for text in texts(value):
            assert accepts(grammar, text), "valid instance rejected: %s\n%s" % (text, grammar)
    for value in invalid:
        for text in texts(value) if not isinstance(value, Raw) else [value]:
            assert not accepts(grammar, text), "invalid instance accepted: %s\n%s" % (text, grammar)


class Raw(str):
    """An invalid instance given as JSON text rather than a value (e.g. `1.0`, which json.dumps
    of an int never writes)."""


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string"},
        "address": {"type": "object",
                    "properties": {"street": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["street"]},
    },
    "required": ["name", "age"],
}


def random_person(rng: random.Random) -> dict:
    person = {"name": random_python_string(rng), "age": rng.randint(-5, 120)}
    if rng.random() < 0.5:
        person["email"] = random_python_string(rng)
    if rng.random() < 0.5:
        person["address"] = {"street": random_python_string(rng)}
        if rng.random() < 0.5:
            person["address"]["zip"] = str(rng.randint(0, 99999))
    return person


def test_nested_object_required_and_optional():
    rng = random.Random(1)
    valid = [random_person(rng) for _ in range(30)]
    base = {"name": "Ann", "age": 30, "email": "a@b.c", "address": {"street": "Main"}}
    invalid = [
        {"age": 30}, {"name": "Ann"},                              # required missing
        {"name": "Ann", "age": "30"}, {"name": 5, "age": 30},      # wrong type
        {"name": "Ann", "age": 30.5}, {"name": "Ann", "age": None},
        {**base, "nick": "A"},                                     # extra key, not allowed
        {**base, "address": {"zip": "1"}},                         # nested required missing
        {**base, "address": {"street": "Main", "city": "X"}},      # nested extra key
        # Keys out of schema order: valid JSON Schema, but the grammar fixes the order so a
        # model writes properties as the schema lists them.
        {"age": 30, "name": "Ann"}, {"name": "Ann", "age": 30, "address": {"street": "M"},
                                     "email": "e"},
        [], "Ann", None,
    ]
    check_schema(PERSON, valid, invalid + [Raw('{"name":"Ann","age":30,}'),
                                           Raw('{"name":"Ann",,"age":30}')])


def test_all_optional_properties_any_subset_in_order():
    schema = {"type": "object", "properties": {k: {"type": "boolean"} for k in "abc"}}
    subsets = [{k: True for j, k in enumerate("abc") if mask >> j & 1} for mask in range(8)]
    check_schema(schema, subsets,
                 [{"b": True, "a": True}, {"c": True, "a": True}, {"a": 1}, {"d": True},
                  Raw('{,"a":true}'), Raw('{"a":true,}'), Raw('{"a":true "b":true}')])


def test_array_min_and_max_items():
    schema = {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 4}
    valid = [[1, 2], [0.5, -3, 1e-7], [1, 2, 3, 4], [-0.0, 1e300]]
    invalid = [[], [1], [1, 2, 3, 4, 5], [1, "2"], [1, None], {"0": 1}, Raw("[1,2,]")]
    check_schema(schema, valid, invalid)
    check_schema({"type": "array", "maxItems": 0}, [[]], [[1]])
    check_schema({"type": "array", "items": {"type": "integer"}, "minItems": 1},
                 [[1], list(range(30))], [[], [1.5]])


def test_enum_with_quotes_backslashes_and_unicode():
    values = ["red", 'say "hi"', "back\\slash", "café", "日本", "😀", "tab\there", 42, -1.5,
              None, True]
    schema = {"enum": values}
    check_schema(schema, values, ["blue", "Red", "caf", "cafe", 43, 1.5, False, "", [], {}])
    # Filtered by type: only the strings remain.
    check_schema({"type": "string", "enum": values}, ["red", "😀"], [42, None, True])


def test_const():
    check_schema({"const": "circle"}, ["circle"], ["square", "circle ", None])
    shape = {"type": "object", "properties": {"kind": {"const": "circle"},
                                              "r": {"type": "number"}},
             "required": ["kind", "r"]}
    check_schema(shape, [{"kind": "circle", "r": 1.5}], [{"kind": "square", "r": 1}])
    # A container const matches its compact text only (module doc).
    grammar = json_schema_to_gbnf({"const": {"a": [1, "x"]}})
    assert accepts(grammar, '{"a":[1,"x"]}')
    assert not accepts(grammar, '{"a":[1,"y"]}')


def test_any_of_with_null_and_one_of():
    check_schema({"anyOf": [{"type": "string"}, {"type": "null"}]},
                 ["x", "", None], [1, True, [], {}])
    check_schema({"oneOf": [{"type": "integer"}, {"type": "array", "items": {"type": "string"}}]},
                 [3, [], ["a", "b"]], [1.5, ["a", 1], "a"])
    check_schema({"allOf": [{"type": "boolean"}]}, [True, False], [0, None])


def test_type_lists_and_integers_vs_numbers():
    check_schema({"type": ["integer", "boolean", "null"]},
                 [0, -7, 10 ** 30, True, None], [1.5, "1", [], {}, Raw("1.0"), Raw("1e3")])
    schema = {"type": "object",
              "properties": {"count": {"type": "integer"}, "ratio": {"type": "number"}},
              "required": ["count", "ratio"]}
    check_schema(schema, [{"count": 0, "ratio": 0.5}, {"count": -3, "ratio": 3},
                          {"count": 10 ** 20, "ratio": -2e-300}],
                 [{"count": 1.5, "ratio": 1}, {"count": 1, "ratio": "0.5"},
                  # JSON Schema counts 1.0 as an integer; the grammar wants integers written
                  # without a fraction or exponent.
                  Raw('{"count":1.0,"ratio":1}'), Raw('{"count":1e3,"ratio":1}')])
    grammar = json_schema_to_gbnf({"type": "number"})
    for text in ["0", "-0", "1.25", "2E+10", "3e-2", "-0.0e0"]:
        assert accepts(grammar, text), text
    for text in ["01", "1.", ".5", "+1", "1e", "NaN", "-"]:
        assert not accepts(grammar, text), text


TREE = {
    "$ref": "#/$defs/node",
    "$defs": {"node": {
        "type": "object",
        "properties": {"value": {"type": "integer"},
                       "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
        "required": ["value", "children"]}},
}


def random_tree(rng: random.Random, depth: int = 0) -> dict:
    n = rng.randint(0, 3) if depth < 3 else 0
    return {"value": rng.randint(-9, 99), "children": [random_tree(rng, depth + 1)
                                                       for _ in range(n)]}


def test_recursive_defs_tree():
    rng = random.Random(2)
    leaf = {"value": 1, "children": []}
    invalid = [{"value": 1}, {"value": 1, "children": [{"value": 2}]},
               {"value": 1, "children": [{"value": "x", "children": []}]},
               {"value": 1, "children": [leaf, {"value": 2, "children": [leaf, 3]}]},
               {"value": 1, "children": [], "extra": 0}]
    check_schema(TREE, [random_tree(rng) for _ in range(20)] + [leaf], invalid)
    # The same through draft-07 "definitions" and a schema given as JSON text.
    text = json.dumps(TREE).replace("$defs", "definitions")
    assert accepts(json_schema_to_gbnf(text), json.dumps(random_tree(rng)))


def test_additional_properties_true():
    schema = {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"],
              "additionalProperties": True}
    valid = [{"id": 1}, {"id": 1, "x": [1, {"y": None}], "z": "w", "": 0, "i": 1, "idd": 2}]
    invalid = [{"id": "1"}, {"x": 1},
               # "id" again as an extra key would let a second value bypass its schema.
               Raw('{"id":1,"id":"x"}'), Raw('{"id":1,"x":0,"id":2}'),
               # Listed properties come first (schema order), extra keys after them.
               {"x": 1, "id": 2}]
    check_schema(schema, valid, invalid)


def test_additional_properties_schema():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, 'q"é': {"type": "null"}},
              "additionalProperties": {"type": "string"}}
    valid = [{}, {"a": 1}, {"b": "x"}, {"a": 1, "b": "x", "ab": "y", "": "z", "A": "w"},
             {'q"é': None, "q": "1", 'q"': "2", 'q"éé': "3", "é": "4"}, {"\n": "nl"}]
    invalid = [{"b": 1}, {"a": "x"}, {'q"é': "x"}, {"b": "x", "a": 1},
               Raw('{"a":1,"a":"x"}'), Raw('{"b":"x","q\\"é":"y"}')]
    check_schema(schema, valid, invalid)
    check_schema({"type": "object", "additionalProperties": {"type": "integer"}},
                 [{}, {"x": 1, "y": 2}], [{"x": "1"}])


def test_prefix_items():
    # Without `items` the tuple is closed (module doc), here with one item at least.
    pair = {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}],
            "minItems": 1}
    check_schema(pair, [["a"], ["a", 1]], [[], [1], ["a", "b"], ["a", 1, 2]])
    open_tail = {"type": "array", "prefixItems": [{"type": "string"}],
                 "items": {"type": "boolean"}, "maxItems": 3}
    check_schema(open_tail, [[], ["a"], ["a", True], ["a", True, False]],
                 [[True], ["a", 1], ["a", True, False, True]])
    # Drafts 4-7 spell a tuple as items [list] + additionalItems.
    draft7 = {"type": "array", "items": [{"type": "null"}], "additionalItems": {"type": "integer"},
              "minItems": 2}
    check_schema(draft7, [[None, 1], [None, 1, 2]], [[None], [1, 1], [None, "x"]])


def test_nested_arrays_of_objects_with_enums():
    schema = {"type": "object",
              "properties": {"tags": {"type": "array", "items": {"enum": ["x", "y"]},
                                      "maxItems": 2},
                             "points": {"type": "array", "items": {
                                 "type": "object", "properties": {"x": {"type": "number"},
                                                                  "y": {"type": "number"}},
                                 "required": ["x", "y"]}}},
              "required": ["tags"]}
    check_schema(schema, [{"tags": []}, {"tags": ["x", "y"], "points": [{"x": 1, "y": 2.5}]}],
                 [{"tags": ["z"]}, {"tags": ["x", "x", "y"]}, {"tags": [], "points": [{"x": 1}]}])


def test_any_value_schemas():
    for schema in (True, {}, {"title": "anything"}, "{}", "true"):
        grammar = json_schema_to_gbnf(schema)
        for text in ['{"a":[1,null]}', "1", '"x"', "[]", "null"]:
            assert accepts(grammar, text), (schema, text)
        assert not accepts(grammar, "nul")
    check_schema({"type": "object"}, [{}, {"a": [1]}], [[], 1])


def test_property_names_become_valid_rule_names():
    schema = {"type": "object", "properties": {"na me/ü": {"type": "object", "properties": {
        "x": {"type": "integer"}}}, "na-me-ü": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        "😀": {"enum": [1, 2]}}}
    grammar = json_schema_to_gbnf(schema)
    names = [line.split(" ::= ")[0] for line in grammar.splitlines()]
    assert names[0] == "root" and len(set(names)) == len(names)
    assert all(re.fullmatch(r"[A-Za-z0-9-]+", name) for name in names), names
    check_schema(schema, [{"na me/ü": {"x": 1}, "na-me-ü": None, "😀": 2}],
                 [{"na me/ü": {"x": "1"}}, {"😀": 3}])


# --- errors ------------------------------------------------------------------------------

UNSUPPORTED = [
    ({"type": "string", "pattern": "^a"}, "pattern", "#"),
    ({"type": "object", "properties": {"name": {"type": "string", "pattern": "x"}}},
     "pattern", "#/properties/name"),
    ({"type": "string", "format": "email"}, "format", "#"),
    ({"type": "string", "minLength": 1}, "minLength", "#"),
    ({"type": "string", "maxLength": 9}, "maxLength", "#"),
    ({"type": "integer", "minimum": 0}, "minimum", "#"),
    ({"type": "integer", "maximum": 9}, "maximum", "#"),
    ({"type": "number", "exclusiveMinimum": 0}, "exclusiveMinimum", "#"),
    ({"type": "number", "multipleOf": 2}, "multipleOf", "#"),
    ({"type": "object", "minProperties": 1}, "minProperties", "#"),
    ({"not": {"type": "null"}}, "not", "#"),
    ({"if": {"type": "string"}, "then": {"minLength": 1}}, "if", "#"),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired", "#"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems", "#"),
    ({"type": "object", "patternProperties": {"^x": {}}}, "patternProperties", "#"),
    ({"type": "array", "contains": {"type": "null"}}, "contains", "#"),
    ({"type": "array", "items": {"type": "integer", "minimum": 0}}, "minimum", "#/items"),
    ({"type": "array", "prefixItems": [{}, {"format": "date"}]}, "format", "#/prefixItems/1"),
    ({"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 3}]}, "maxLength",
     "#/anyOf/1"),
    ({"$ref": "#/$defs/A", "$defs": {"A": {"type": "string", "format": "uri"}}}, "format",
     "#/$defs/A"),
    ({"properties": {"a/b~c": {"const": 1, "multipleOf": 1}}}, "multipleOf",
     "#/properties/a~1b~0c"),
    ({"type": "object", "additionalProperties": {"pattern": "x"}}, "pattern",
     "#/additionalProperties"),
]


@pytest.mark.parametrize("schema, keyword, path", UNSUPPORTED)
def test_unsupported_keyword_names_keyword_and_path(schema, keyword, path):
    with pytest.raises(ValueError) as info:
        json_schema_to_gbnf(schema)
    assert str(info.value) == "unsupported JSON Schema keyword %r at %s" % (keyword, path)


@pytest.mark.parametrize("ref", ["http://example.com/s.json", "other.json#/$defs/A",
                                 "#/properties/a", "#/$defs/Missing", "#", 3])
def test_bad_ref(ref):
    schema = {"type": "object", "properties": {"a": {"$ref": ref}}, "$defs": {"A": {}}}
    with pytest.raises(ValueError, match=r"\$ref .* at #/properties/a"):
        json_schema_to_gbnf(schema)


@pytest.mark.parametrize("schema, message", [
    (False, "schema false at #"),
    ({"type": "array", "items": False, "minItems": 1}, "minItems"),
    ({"properties": {"a": False}}, "schema false at #/properties/a"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be an object or a boolean"),
    ({"type": "strin"}, "invalid type 'strin' at #"),
    ({"allOf": [{"type": "string"}, {"type": "null"}]}, "allOf with 2 subschemas"),
    ({"type": "string", "anyOf": [{}]}, "'anyOf' cannot be combined with 'type' at #"),
    ({"type": "string", "enum": [1, 2]}, "no value satisfies"),
    ({"type": "array", "minItems": 3, "maxItems": 2}, "minItems 3 > maxItems 2"),
    ({"$ref": "#/$defs/A", "$defs": {"A": {"anyOf": [{"$ref": "#/$defs/A"}, {}]}}},
     "cycle #/\\$defs/A -> #/\\$defs/A"),
])
def test_invalid_schemas(schema, message):
    with pytest.raises(ValueError, match=message):
        json_schema_to_gbnf(schema)


# --- a pydantic-style schema ---------------------------------------------------------------

# What pydantic 2 writes for a User model with an Enum, a nested Optional model and Optional
# scalars (annotations, $defs/$ref, anyOf with null), copied as data so no pydantic is needed.
PYDANTIC_USER = {
    "$defs": {
        "Address": {"properties": {"street": {"title": "Street", "type": "string"},
                                   "city": {"title": "City", "type": "string"},
                                   "postcode": {"anyOf": [{"type": "string"}, {"type": "null"}],
                                                "default": None, "title": "Postcode"}},
                    "required": ["street", "city"], "title": "Address", "type": "object"},
        "Role": {"enum": ["admin", "user", "guest"], "title": "Role", "type": "string"},
    },
    "description": "A user account.",
    "properties": {
        "id": {"title": "Id", "type": "integer"},
        "name": {"description": "Full name", "title": "Name", "type": "string"},
        "role": {"$ref": "#/$defs/Role"},
        "address": {"anyOf": [{"$ref": "#/$defs/Address"}, {"type": "null"}], "default": None},
        "tags": {"items": {"type": "string"}, "title": "Tags", "type": "array"},
        "score": {"anyOf": [{"type": "number"}, {"type": "null"}], "default": None,
                  "title": "Score"},
    },
    "required": ["id", "name", "role", "tags"],
    "title": "User",
    "type": "object",
}


def test_pydantic_style_schema():
    full = {"id": 7, "name": "Zoë", "role": "admin",
            "address": {"street": "1 Main St", "city": "Oslo", "postcode": None},
            "tags": ["a", "b"], "score": 0.75}
    minimal = {"id": 1, "name": "", "role": "guest", "tags": []}
    no_address = {"id": 1, "name": "", "role": "guest", "address": None, "tags": []}
    check_schema(PYDANTIC_USER, [full, minimal, no_address],
                 [{**minimal, "role": "root"}, {**minimal, "address": {"street": "x"}},
                  {"id": 1, "name": "", "role": "guest"}, {**full, "score": "high"}])
    # The same schema as JSON text, the way a response_format carries it.
    assert accepts(json_schema_to_gbnf(json.dumps(PYDANTIC_USER)),
                   json.dumps(full, indent=2, ensure_ascii=False))
