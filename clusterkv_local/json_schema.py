"""GBNF grammars for JSON output: any JSON object (JSON_GBNF), any JSON value
(JSON_VALUE_GBNF), and json_schema_to_gbnf(), which turns a JSON Schema into a grammar.

The grammars are for the GBNF engine in clusterkv_local.grammar (LlamaGrammar.from_string) and
keep to the subset of the format that it parses. They describe what a model should *write*, so
they accept a subset of the texts a JSON Schema validator would, never more (oneOf aside):

- Whitespace between two tokens is bounded: nothing, one space, or one newline plus up to 20
  spaces or tabs. A small model allowed unbounded whitespace can spend its whole budget on
  newlines. Nothing before or after the root value.
- Object properties come in the order the schema lists them; required ones must be there.
  Without `additionalProperties` an object with `properties` has no other keys (a validator
  would allow any); with it, extra keys follow the listed ones and never repeat a listed name.
- `prefixItems` without `items` is a closed tuple; an integer has no fraction or exponent
  (a validator takes 1.0). Keys, enum and const values match only their compact json.dumps
  text with non-ASCII written as is (not "\\u00e9"); keys beyond the listed ones may not use
  \\u escapes for printable characters, so that they cannot spell a listed key another way.
- With no `type`, object keywords (properties, required, ...) mean an object and array
  keywords an array; a validator would also take any value of another type.
- oneOf is read as anyOf: "exactly one" cannot be said in a context-free grammar.

A keyword that would constrain the value but is not implemented raises ValueError naming it
and its place, rather than letting unconstrained output through.
"""
import json
import re
import urllib.parse
from typing import Any, Dict, List, Optional, Set, Tuple, Union

_KEY_ESCAPE = r'"\\" ( ["\\bfnrt] | "u00" ( "0" [0-7bef] | "1" [0-9a-f] ) )'

# Rules every grammar may reference, in output order. Rule names derived from a schema never
# take these names. `ws` is the bounded whitespace described above.
_PRIMITIVES = {
    "ws": r'( " " | "\n" [ \t]{0,20} )?',
    "value": r'object | array | string | number | "true" | "false" | "null"',
    "object": r'"{" ws ( member ( "," ws member )* )? "}"',
    "member": r'string ws ":" ws value ws',
    "array": r'"[" ws ( value ws ( "," ws value ws )* )? "]"',
    "string": r'"\"" char* "\""',
    "char": r'[^"\\\x00-\x1F] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} )',
    "number": r'integer ( "." [0-9]+ )? ( [eE] [-+]? [0-9]+ )?',
    "integer": r'"-"? ( "0" | [1-9] [0-9]* )',
    "boolean": r'"true" | "false"',
    # One character of a key as json.dumps(ensure_ascii=False) spells it: each key then has a
    # single spelling, so "not one of the listed keys" can be said character by character.
    "key-char": r'[^"\\\x00-\x1F] | ' + _KEY_ESCAPE,
}

# Keys that never constrain a value. $defs and definitions are only reached through $ref;
# pydantic writes `discriminator` beside a oneOf whose branches already pin the tag with const.
_IGNORED = frozenset({
    "title", "description", "examples", "default", "$schema", "$id", "$comment", "readOnly",
    "writeOnly", "deprecated", "$defs", "definitions", "discriminator",
})
_COMBINATORS = ("$ref", "anyOf", "oneOf", "allOf")
_OBJECT_KEYWORDS = frozenset({"properties", "required", "additionalProperties"})
_ARRAY_KEYWORDS = frozenset({"items", "prefixItems", "additionalItems", "minItems", "maxItems"})
_SUPPORTED = (frozenset(_COMBINATORS) | _OBJECT_KEYWORDS | _ARRAY_KEYWORDS
              | {"type", "enum", "const"})
_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")

# A body that can stand inside a sequence as it is: a rule name or one string literal.
_ATOM = re.compile(r'[A-Za-z0-9-]+|"(?:[^"\\]|\\.)*"')
_LITERAL_OR_CLASS = re.compile(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]')
_NAME = re.compile(r'[A-Za-z][A-Za-z0-9-]*')
_KEY_UNIT = re.compile(r'\\u[0-9a-f]{4}|\\.|.', re.DOTALL)
_KEY_ESCAPES = (['\\"', "\\\\", "\\b", "\\f", "\\n", "\\r", "\\t"]
                + ["\\u%04x" % c for c in range(0x20) if c not in (8, 9, 10, 12, 13)])
_GBNF_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}

Schema = Union[Dict[str, Any], bool]


def _grammar(rules: Dict[str, str]) -> str:
    """Grammar text: `rules` in order, then the primitives they reach, one rule a line."""
    needed: Set[str] = set()
    pending = list(rules.values())
    while pending:
        for name in _references(pending.pop()):
            if name in _PRIMITIVES and name not in needed:
                needed.add(name)
                pending.append(_PRIMITIVES[name])
    lines = ["%s ::= %s" % item for item in rules.items()]
    lines += ["%s ::= %s" % (n, body) for n, body in _PRIMITIVES.items() if n in needed]
    return "\n".join(lines) + "\n"


def _references(body: str) -> List[str]:
    return _NAME.findall(_LITERAL_OR_CLASS.sub(" ", body))


JSON_GBNF = _grammar({"root": "object"})
JSON_VALUE_GBNF = _grammar({"root": "value"})


def json_schema_to_gbnf(schema: Union[Schema, str]) -> str:
    """A GBNF grammar whose `root` matches JSON texts valid under `schema` (see module doc).

    `schema` is a dict, a boolean schema, or the JSON text of one. Raises ValueError for
    invalid JSON text, the schema `false`, a $ref that is not #/$defs/Name or
    #/definitions/Name, and any keyword the converter does not enforce.

    Example:
        >>> print(json_schema_to_gbnf({"enum": ["a", 1]}), end="")
        root ::= "\\"a\\"" | "1"
    """
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError("JSON Schema text is not valid JSON: %s" % e) from e
    return _Converter(schema).grammar()


class _Converter:
    """One schema -> rules. Bodies are GBNF expressions that may hold a top-level `|`; a body
    used inside a sequence goes through atom(), which names it as a rule unless it is one
    name or one literal."""

    def __init__(self, schema: Any):
        self.schema = schema
        self.rules: Dict[str, str] = {}
        self.names: Set[str] = set(_PRIMITIVES) | {"root"}
        self.refs: Dict[str, str] = {}                # "#/$defs/Name" -> rule name
        # Definitions a definition can start with: a cycle here is left recursion, which
        # the engine cannot run.
        self.head_refs: Dict[str, Set[str]] = {}
        self.head_owner: Optional[str] = None          # definition whose start we are at

    def grammar(self) -> str:
        root = self.schema_body(self.schema, "#", "root")
        self.check_left_recursion()
        return _grammar({"root": root, **self.rules})

    # --- names ---------------------------------------------------------------------------

    def unique(self, name: str) -> str:
        candidate, n = name, 2
        while candidate in self.names:
            candidate, n = "%s-%d" % (name, n), n + 1
        self.names.add(candidate)
        return candidate

    def define(self, name: str, body: str) -> str:
        name = self.unique(name)
        self.rules[name] = body
        return name

    def atom(self, body: str, name: str) -> str:
        return body if _ATOM.fullmatch(body) else self.define(name, body)

    # --- schemas -------------------------------------------------------------------------

    def schema_body(self, schema: Any, path: str, name: str) -> str:
        if schema is True:
            return "value"
        if schema is False:
            raise ValueError("schema false at %s accepts no value" % path)
        if not isinstance(schema, dict):
            raise ValueError("schema at %s must be an object or a boolean, not %s"
                             % (path, type(schema).__name__))
        keywords = _constraints(schema, path)
        for combinator in _COMBINATORS:
            if combinator in keywords:
                _alone(combinator, keywords, set(), path)
                return self.combinator_body(combinator, schema[combinator], path, name)
        if "enum" in keywords or "const" in keywords:
            _alone("enum" if "enum" in keywords else "const", keywords,
                   {"enum", "const", "type"}, path)
            return self.values_body(schema, path)
        return self.typed_body(schema, keywords, path, name)

    def combinator_body(self, keyword: str, arg: Any, path: str, name: str) -> str:
        if keyword == "$ref":
            return self.ref(arg, path)
        if not isinstance(arg, list) or not arg:
            raise ValueError("%s at %s must be a non-empty list of schemas" % (keyword, path))
        if keyword == "allOf":
            if len(arg) != 1:
                raise ValueError("allOf with %d subschemas at %s is unsupported (only one)"
                                 % (len(arg), path))
            return self.schema_body(arg[0], path + "/allOf/0", name)
        bodies = [self.schema_body(sub, "%s/%s/%d" % (path, keyword, i), name)
                  for i, sub in enumerate(arg)]
        return " | ".join(dict.fromkeys(bodies))

    def ref(self, ref: Any, path: str) -> str:
        match = re.fullmatch(r"#/(\$defs|definitions)/([^/]+)", ref if isinstance(ref, str) else "")
        if not match:
            raise ValueError("unsupported $ref %r at %s (only #/$defs/Name and "
                             "#/definitions/Name)" % (ref, path))
        section = match.group(1)
        key = _unescape_pointer(urllib.parse.unquote(match.group(2)))
        defs = self.schema.get(section) if isinstance(self.schema, dict) else None
        if not isinstance(defs, dict) or key not in defs:
            raise ValueError("$ref %r at %s names no definition" % (ref, path))
        target = "#/%s/%s" % (section, _escape_pointer(key))
        if self.head_owner is not None:
            self.head_refs.setdefault(self.head_owner, set()).add(target)
        if target not in self.refs:
            # Named before its body is built, so a recursive reference finds it.
            rule = self.refs[target] = self.unique(_sanitize(key))
            outer, self.head_owner = self.head_owner, target
            self.rules[rule] = self.schema_body(defs[key], target, rule)
            self.head_owner = outer
        return self.refs[target]

    def check_left_recursion(self) -> None:
        def visit(node: str, trail: List[str]) -> None:
            if node in trail:
                cycle = " -> ".join(trail[trail.index(node):] + [node])
                raise ValueError("$ref cycle %s refers back to itself before any character; "
                                 "put the recursion inside an object or array" % cycle)
            for nxt in sorted(self.head_refs.get(node, ())):
                visit(nxt, trail + [node])

        for start in sorted(self.head_refs):
            visit(start, [])

    def values_body(self, schema: Dict[str, Any], path: str) -> str:
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list):
                raise ValueError("enum at %s must be a list" % path)
            if "const" in schema:
                values = [v for v in values if _json_equal(v, schema["const"])]
        else:
            values = [schema["const"]]
        if "type" in schema:
            types = _type_list(schema["type"], path)
            values = [v for v in values if _json_type(v) in types
                      or (_json_type(v) == "integer" and "number" in types)]
        if not values:
            raise ValueError("no value satisfies enum/const/type at %s" % path)
        return " | ".join(dict.fromkeys(_literal(_dump(v, path)) for v in values))

    def typed_body(self, schema: Dict[str, Any], keywords: Set[str], path: str,
                   name: str) -> str:
        if "type" in schema:
            types = _type_list(schema["type"], path)
        else:
            # Object or array keywords say which type is meant; a generated value of another
            # type would satisfy the schema only vacuously.
            types = [t for t, family in (("object", _OBJECT_KEYWORDS), ("array", _ARRAY_KEYWORDS))
                     if keywords & family]
            if not types:
                return "value"
        if "number" in types and "integer" in types:
            types.remove("integer")         # number already covers it; no ambiguity
        bodies = []
        for t in types:
            if t == "object":
                bodies.append(self.object_body(schema, path, name))
            elif t == "array":
                bodies.append(self.array_body(schema, path, name))
            elif t == "null":
                bodies.append('"null"')
            else:
                bodies.append(t)
        return " | ".join(bodies)

    # --- objects -------------------------------------------------------------------------

    def object_body(self, schema: Dict[str, Any], path: str, name: str) -> str:
        props = schema.get("properties", {})
        required = schema.get("required", [])
        if not isinstance(props, dict):
            raise ValueError("properties at %s must be an object" % path)
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise ValueError("required at %s must be a list of strings" % path)
        if not props and not required and "additionalProperties" not in schema:
            return "object"
        extra = schema.get("additionalProperties", False)
        listed = [(key, sub, "%s/properties/%s" % (path, _escape_pointer(key)))
                  for key, sub in props.items()]
        for key in dict.fromkeys(r for r in required if r not in props):
            if "additionalProperties" in schema and extra is False:
                raise ValueError("required property %r at %s is not in properties and "
                                 "additionalProperties is false" % (key, path))
            listed.append((key, True if extra is False else extra,
                           path + "/additionalProperties"))
        outer, self.head_owner = self.head_owner, None
        kvs = [(self.key_value(name, key, sub, sub_path), key in required)
               for key, sub, sub_path in listed]
        extra_kv = None
        if extra is not False:
            extra_kv = self.extra_key_value(name, [key for key, _, _ in listed], extra,
                                            path + "/additionalProperties")
        self.head_owner = outer
        members = _members(kvs, extra_kv)
        return '"{" ws %s "}"' % members if members else '"{" ws "}"'

    def key_value(self, name: str, key: str, sub: Schema, path: str) -> str:
        hint = "%s-%s" % (name, _sanitize(key))
        value = self.atom(self.schema_body(sub, path, hint), hint)
        return self.define(hint + "-kv", '%s ws ":" ws %s' % (_literal(_dump(key, path)), value))

    def extra_key_value(self, name: str, listed: List[str], sub: Schema, path: str) -> str:
        hint = name + "-extra"
        value = self.atom(self.schema_body(sub, path, hint + "-value"), hint + "-value")
        key = self.define(hint + "-key", _key_not_in(listed)) if listed else "string"
        return self.define(hint + "-kv", '%s ws ":" ws %s' % (key, value))

    # --- arrays --------------------------------------------------------------------------

    def array_body(self, schema: Dict[str, Any], path: str, name: str) -> str:
        prefix, rest, rest_path, prefix_path = self.array_parts(schema, path)
        low, high = _item_bounds(schema, path)
        if prefix is None and rest is True and low == 0 and high is None:
            return "array"
        prefix = (prefix or [])[:high]
        if rest is False and low > len(prefix):
            raise ValueError("minItems %d at %s needs more items than prefixItems allow and "
                             "no items schema follows them" % (low, path))
        outer, self.head_owner = self.head_owner, None
        atoms = []
        for i, sub in enumerate(prefix):
            hint = "%s-item-%d" % (name, i + 1)
            atoms.append(self.atom(self.schema_body(sub, "%s/%d" % (prefix_path, i), hint), hint))
        rest_atom = None
        if rest is not False and (high is None or high > len(atoms)):
            rest_atom = self.atom(self.schema_body(rest, rest_path, name + "-item"),
                                  name + "-item")
        self.head_owner = outer
        inner = _items(atoms, rest_atom, low, high)
        return '"[" ws %s "]"' % inner if inner else '"[" ws "]"'

    @staticmethod
    def array_parts(schema: Dict[str, Any], path: str):
        """(prefix schemas or None, schema of the items after them, their paths).

        Draft 2020-12 writes a tuple as prefixItems + items, drafts 4-7 as items [list] +
        additionalItems; both read the same here. A missing rest closes a tuple (module doc).
        """
        items = schema.get("items")
        if isinstance(items, list):
            if "prefixItems" in schema:
                raise ValueError("items as a list together with prefixItems at %s" % path)
            return (items, schema.get("additionalItems", False), path + "/additionalItems",
                    path + "/items")
        if "additionalItems" in schema:
            raise ValueError("additionalItems at %s needs items to be a list" % path)
        prefix = schema.get("prefixItems")
        if prefix is not None and not isinstance(prefix, list):
            raise ValueError("prefixItems at %s must be a list" % path)
        default_rest = True if prefix is None else False
        return (prefix, schema.get("items", default_rest), path + "/items",
                path + "/prefixItems")


# --- helpers -----------------------------------------------------------------------------

def _constraints(schema: Dict[str, Any], path: str) -> Set[str]:
    """The keywords of `schema` that constrain its value; raises for any it cannot enforce."""
    found = set()
    for key in schema:
        if key in _IGNORED:
            continue
        if key not in _SUPPORTED:
            raise ValueError("unsupported JSON Schema keyword %r at %s" % (key, path))
        found.add(key)
    return found


def _alone(keyword: str, keywords: Set[str], allowed: Set[str], path: str) -> None:
    """Raises unless `keyword` is combined only with `allowed`: the other combinations need an
    intersection of two languages, which a grammar built this way cannot express."""
    others = sorted(keywords - allowed - {keyword})
    if others:
        raise ValueError("JSON Schema keyword %r cannot be combined with %r at %s"
                         % (keyword, others[0], path))


def _type_list(value: Any, path: str) -> List[str]:
    types = [value] if isinstance(value, str) else value
    if not isinstance(types, list) or not types or any(t not in _TYPES for t in types):
        raise ValueError("invalid type %r at %s" % (value, path))
    return list(dict.fromkeys(types))


def _item_bounds(schema: Dict[str, Any], path: str) -> Tuple[int, Optional[int]]:
    low, high = schema.get("minItems", 0), schema.get("maxItems")
    for keyword, n in (("minItems", low), ("maxItems", high)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ValueError("%s at %s must be a non-negative integer" % (keyword, path))
    if high is not None and low > high:
        raise ValueError("minItems %d > maxItems %d at %s" % (low, high, path))
    return low, high


def _members(kvs: List[Tuple[str, bool]], extra_kv: Optional[str]) -> str:
    """The members between "{" ws and "}": each kv rule followed by ws, commas only between.

    Once a required member is placed every later one is preceded by a comma; before that the
    object may start with any optional member, hence one alternative per possible first.
    """
    def after(start: int) -> List[str]:
        parts = ['"," ws %s ws' % kv if req else '( "," ws %s ws )?' % kv
                 for kv, req in kvs[start:]]
        if extra_kv:
            parts.append('( "," ws %s ws )*' % extra_kv)
        return parts

    firsts = []
    for i, (kv, req) in enumerate(kvs):
        firsts.append(" ".join(["%s ws" % kv] + after(i + 1)))
        if req:
            return firsts[0] if len(firsts) == 1 else "( %s )" % " | ".join(firsts)
    if extra_kv:
        firsts.append(" ".join(["%s ws" % extra_kv] + after(len(kvs))))
    return "( %s )?" % " | ".join(firsts) if firsts else ""


def _items(atoms: List[str], rest: Optional[str], low: int, high: Optional[int]) -> str:
    """The items between "[" ws and "]": the prefix atoms in order, then `rest` repeated, with
    between `low` and `high` items in all. Items past `low` are optional, nested so that a
    later one is only there if the earlier ones are."""
    count = len(atoms)

    def rest_repeat(before: int) -> str:
        if rest is None:
            return ""
        return _repeat('( "," ws %s ws )' % rest, max(0, low - before),
                       None if high is None else high - before)

    def from_index(i: int) -> str:
        if i == count:
            return rest_repeat(count)
        comma = '"," ws ' if i else ""
        body = ("%s%s ws %s" % (comma, atoms[i], from_index(i + 1))).rstrip()
        return body if i < low else "( %s )?" % body

    if count:
        return from_index(0)
    if rest is None or high == 0:
        return ""
    body = ("%s ws %s" % (rest, rest_repeat(1))).rstrip()
    return body if low else "( %s )?" % body


def _repeat(group: str, low: int, high: Optional[int]) -> str:
    if high == 0:
        return ""
    if high is None:
        return group + {0: "*", 1: "+"}.get(low, "{%d,}" % low)
    if low == high:
        return group if low == 1 else "%s{%d}" % (group, low)
    return group + "?" if (low, high) == (0, 1) else "%s{%d,%d}" % (group, low, high)


def _key_not_in(listed: List[str]) -> str:
    """A key (with its quotes) spelled as json.dumps spells keys, and none of `listed`: walks
    a trie of the listed spellings, leaving it at the first unit that matches no branch."""
    trie: Dict[str, Any] = {}
    for key in listed:
        if _has_surrogate(key):
            continue        # no extra key can spell it: key-char has no \ud800-style escape
        node = trie
        for unit in _KEY_UNIT.findall(_dump(key, "#")[1:-1]):
            node = node.setdefault(unit, {})
        node[""] = {}       # "" marks the end of a listed key

    def branch(node: Dict[str, Any]) -> str:
        alternatives = [] if "" in node else ['"\\""']
        units = [u for u in node if u]
        alternatives += ["%s %s" % (_literal(u), branch(node[u])) for u in units]
        if units:
            alternatives.append('%s key-char* "\\""' % _other_unit(units))
        else:
            alternatives.append('key-char+ "\\""')
        return "( %s )" % " | ".join(alternatives)

    return '"\\"" %s' % branch(trie)


def _other_unit(units: List[str]) -> str:
    """One key character (key-char) that is none of `units` (not empty)."""
    plain = "".join(_escape_char(u, "]-^[") for u in units if len(u) == 1)
    escapes = [u for u in units if len(u) > 1]
    char_class = '[^"\\\\\\x00-\\x1F%s]' % plain
    if not escapes:
        return "( %s | %s )" % (char_class, _KEY_ESCAPE)
    rest = [_literal(e) for e in _KEY_ESCAPES if e not in escapes]
    return "( %s )" % " | ".join([char_class] + rest)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, (list, tuple)) else "object"


def _json_equal(a: Any, b: Any) -> bool:
    """JSON equality: 1 == 1.0 but true != 1, as JSON Schema compares enum and const."""
    kinds = {_json_type(a), _json_type(b)}
    if kinds <= {"integer", "number"}:
        return a == b
    if len(kinds) > 1:
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    return a == b


def _dump(value: Any, path: str) -> str:
    """The compact JSON text of `value`; non-ASCII stays literal unless it holds a lone
    surrogate, which UTF-8 text can only carry as a \\u escape."""
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError("value at %s is not JSON: %s" % (path, e)) from e
    return json.dumps(value, separators=(",", ":")) if _has_surrogate(text) else text


def _has_surrogate(text: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in text)


def _literal(text: str) -> str:
    return '"%s"' % "".join(_escape_char(c) for c in text)


def _escape_char(c: str, special: str = "") -> str:
    """`c` inside a GBNF literal or class; `special` are the characters a class must escape."""
    if c in _GBNF_ESCAPES:
        return _GBNF_ESCAPES[c]
    if c in special:
        return "\\" + c
    code = ord(c)
    if code < 0x20 or code == 0x7F:
        return "\\x%02X" % code
    if code < 0x80 or c.isprintable() or code > 0xFFFF:
        return c            # printable text stays readable; astral needs no \U escape
    return "\\u%04X" % code


def _sanitize(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:40] or "x"


def _escape_pointer(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _unescape_pointer(segment: str) -> str:
    return segment.replace("~1", "/").replace("~0", "~")
