"""Tool calls in chat replies (OpenAI's `tools` / `tool_choice`, legacy `functions`).

Two ways a reply becomes a call:
- forced (tool_choice names a tool or is "required"; legacy function_call names one): a grammar
  makes the reply the call's JSON, so it always parses (unless max_tokens cuts it);
- "auto" (the default when tools are given): the model writes a call on its own, in the format
  its chat template taught it, and the reply is scanned for one (parse_tool_calls). Only calls
  that name one of the given tools, with an object of arguments, count; anything else stays
  text.

Either way the chat response carries `message.tool_calls` (legacy: `function_call`) and
finish_reason "tool_calls" ("function_call"). Streamed, text before a call goes out as content
deltas as usual; from where a call may begin, the text is held back and sent at the end as one
tool_calls delta (or as content, when it is not a call after all).
"""
import json
import re
import uuid
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from .grammar import LlamaGrammar

Call = Dict[str, str]                                   # {"name", "arguments" (JSON text)}
Parsed = Optional[Tuple[Optional[str], List[Call]]]     # (content besides the calls, calls)

# Where a call written in a known format begins: Hermes / Qwen 2.5 tags, Mistral's marker,
# Llama 3.1's python tag. A reply that is only JSON (optionally fenced) is a call too.
CALL_MARKERS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>")
_TAGGED = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)


# --- tools and what tool_choice forces ------------------------------------------------------

def tool_spec(tool: Any, legacy: bool) -> Dict[str, Any]:
    """{"name", "parameters"} of one entry of `tools` ({"type": "function", "function": {...}})
    or of the legacy `functions` list."""
    spec = tool if legacy else (tool.get("function") if isinstance(tool, dict) else None)
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ValueError("each tool needs {'type': 'function', 'function': {'name': ..., "
                         "'parameters': {...}}}" if not legacy else
                         "each function needs {'name': ..., 'parameters': {...}}")
    return {"name": spec["name"], "parameters": spec.get("parameters", {"type": "object"})}


class ForcedCall:
    """A reply constrained to a call of one of `tools` ([{"name", "parameters"}]): one named
    tool (the reply is its arguments object) or the choices of "required" (the reply is
    {"name": ..., "arguments": {...}})."""

    def __init__(self, tools: List[Dict[str, Any]]):
        self.tools = tools
        if len(tools) == 1:
            self.grammar = LlamaGrammar.from_json_schema(tools[0]["parameters"])
        else:
            self.grammar = LlamaGrammar.from_json_schema({"anyOf": [
                {"type": "object", "properties": {"name": {"const": t["name"]},
                                                  "arguments": t["parameters"]},
                 "required": ["name", "arguments"]} for t in tools]})

    def parse(self, text: str) -> Parsed:
        try:
            value = json.loads(text)
        except ValueError:
            return None   # cut by max_tokens
        if len(self.tools) == 1:
            return None, [{"name": self.tools[0]["name"], "arguments": text}]
        return None, [{"name": value["name"],
                       "arguments": json.dumps(value["arguments"], ensure_ascii=False)}]


def is_legacy(tools: Optional[List[Dict[str, Any]]], tool_choice: Any,
              functions: Optional[List[Dict[str, Any]]], function_call: Any) -> bool:
    """Whether the request uses the legacy API (functions / function_call, no tool_choice)."""
    return tool_choice is None and (function_call is not None or (not tools and bool(functions)))


def forced_call(tools: Optional[List[Dict[str, Any]]], tool_choice: Any,
                functions: Optional[List[Dict[str, Any]]], function_call: Any
                ) -> Optional[ForcedCall]:
    """The call tool_choice / function_call force, or None ("auto", "none" or nothing given)."""
    legacy = is_legacy(tools, tool_choice, functions, function_call)
    choice = function_call if legacy else tool_choice
    if choice is None or choice in ("auto", "none"):
        return None
    specs = [tool_spec(t, legacy) for t in ((functions if legacy else tools) or [])]
    if choice == "required" and not legacy:
        if not specs:
            raise ValueError("tool_choice 'required' needs tools")
        return ForcedCall(specs)
    name = (choice.get("name") if legacy else (choice.get("function") or {}).get("name")) \
        if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise ValueError("%s must be 'auto', 'none'%s or a named %s, got %r"
                         % ("function_call" if legacy else "tool_choice",
                            "" if legacy else ", 'required'",
                            "function {'name': ...}" if legacy else
                            "function {'type': 'function', 'function': {'name': ...}}", choice))
    chosen = [s for s in specs if s["name"] == name]
    if not chosen:
        raise ValueError("%s names %r, which is not among the %s given"
                         % ("function_call" if legacy else "tool_choice", name,
                            "functions" if legacy else "tools"))
    return ForcedCall(chosen[:1])


def auto_tool_names(tools: Optional[List[Dict[str, Any]]], tool_choice: Any,
                    functions: Optional[List[Dict[str, Any]]], function_call: Any
                    ) -> Optional[List[str]]:
    """The names a reply may call on its own: the tools (or legacy functions) when the choice
    is "auto" or not given; None when the reply is text only ("none", or no tools)."""
    legacy = is_legacy(tools, tool_choice, functions, function_call)
    choice = function_call if legacy else tool_choice
    if choice not in (None, "auto"):
        return None
    return [tool_spec(t, legacy)["name"] for t in ((functions if legacy else tools) or [])] or None


# --- calls a reply writes on its own --------------------------------------------------------

def _as_call(value: Any, names: Sequence[str]) -> Optional[Call]:
    """{"name", "arguments"} of one call object ({"name", "arguments" | "parameters"}, also
    wrapped as {"type": "function", "function": {...}}), if it calls one of names."""
    if isinstance(value, dict) and isinstance(value.get("function"), dict):
        value = value["function"]
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):   # some formats give the arguments as JSON text
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return {"name": value["name"], "arguments": json.dumps(args, ensure_ascii=False)}


def _json_calls(text: str, names: Sequence[str]) -> Optional[List[Call]]:
    """The calls of a JSON object or list of objects (optionally in a ```json fence); None
    unless every one calls a named tool."""
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    try:
        value = json.loads(text)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = [_as_call(v, names) for v in items]
    return calls if calls and all(calls) else None


def parse_tool_calls(text: str, names: Sequence[str]) -> Parsed:
    """The calls a reply makes of the tools `names`, with the text besides them (None if
    there is none), or None when it makes no call in a known format:
    - Hermes / Qwen 2.5: <tool_call>{"name": ..., "arguments": {...}}</tool_call>, repeated;
    - Mistral: [TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...];
    - Llama 3.x: <|python_tag|> (optional), then {"name": ..., "parameters": {...}};
    - the reply only a JSON call object or list of them (small models answer the Hermes
      prompt without the tags), optionally in a ```json fence."""
    if "<tool_call>" in text:
        blocks = _TAGGED.findall(text)
        calls = [_json_calls(b, names) for b in blocks]
        if not all(calls):
            return None
        content = _TAGGED.sub("", text).strip()
        return content or None, [c for group in calls for c in group]
    for marker in ("[TOOL_CALLS]", "<|python_tag|>"):
        if marker in text:
            before, after = text.split(marker, 1)
            calls = _json_calls(after, names)
            return (before.strip() or None, calls) if calls else None
    calls = _json_calls(text, names)
    return (None, calls) if calls else None


# --- the chat response and its stream --------------------------------------------------------

def _message(content: Optional[str], calls: List[Call], legacy: bool) -> Dict[str, Any]:
    if legacy:   # the legacy API has one call per reply
        return {"role": "assistant", "content": content, "function_call": calls[0]}
    return {"role": "assistant", "content": content,
            "tool_calls": [{"id": "call_%s" % uuid.uuid4().hex[:24], "type": "function",
                            "function": call} for call in calls]}


def response_with_calls(response: Dict[str, Any], parse: Callable[[str], Parsed],
                        legacy: bool) -> Dict[str, Any]:
    """A chat response whose finished reply `parse` reads as calls, rewritten as them."""
    choice = response["choices"][0]
    parsed = parse(choice["message"]["content"]) if choice["finish_reason"] == "stop" else None
    if parsed is not None:   # else text (also a call cut by max_tokens)
        choice["message"] = _message(parsed[0], parsed[1], legacy)
        choice["finish_reason"] = "function_call" if legacy else "tool_calls"
    return response


def _call_start(text: str, sent_text: bool, hold_all: bool) -> Optional[int]:
    """Where in the held text a call may begin (so nothing from there is sent yet)."""
    if hold_all or (not sent_text and text.lstrip()[:1] in ("{", "[", "`")):
        return 0
    found = [i for i in (text.find(m) for m in CALL_MARKERS) if i >= 0]
    return min(found) if found else None


def _marker_tail(text: str) -> int:
    """Characters at the end of text that may begin a call marker."""
    for n in range(min(len(text), max(map(len, CALL_MARKERS)) - 1), 0, -1):
        if any(m.startswith(text[-n:]) for m in CALL_MARKERS):
            return n
    return 0


def chunks_with_calls(chunks: Iterator[Dict[str, Any]], parse: Callable[[str], Parsed],
                      legacy: bool, hold_all: bool = False) -> Iterator[Dict[str, Any]]:
    """Chat chunks with the reply's calls sent as one tool_calls (function_call) delta at the
    end. Text before a possible call streams as usual; hold_all (a forced call) holds all."""
    whole, held, sent_text, holding = "", "", False, False
    for chunk in chunks:
        choice = chunk["choices"][0]
        delta, finish = choice["delta"], choice["finish_reason"]
        if finish is None and "content" in delta:
            whole += delta["content"]
            held += delta["content"]
            if not holding:
                start = _call_start(held, sent_text, hold_all)
                holding = start is not None
                cut = start if holding else len(held) - _marker_tail(held)
                if not sent_text and not holding and not held[:cut].strip():
                    cut = 0    # only whitespace so far: the reply may still be JSON
                if cut > 0:
                    sent_text = True
                    yield dict(chunk, choices=[dict(choice, delta={"content": held[:cut]})])
                    held = held[cut:]
            continue
        if finish is None:
            yield chunk   # the role chunk
            continue
        parsed = parse(whole) if finish == "stop" else None
        head = dict(chunk, choices=[dict(choice, finish_reason=None, logprobs=None)])
        if parsed is not None:
            message = _message(parsed[0] if not sent_text else None, parsed[1], legacy)
            delta = {k: v for k, v in message.items() if k not in ("role", "content")}
            if "tool_calls" in delta:
                delta["tool_calls"] = [dict(c, index=i) for i, c in enumerate(delta["tool_calls"])]
            if message["content"]:
                delta["content"] = message["content"]
            yield dict(head, choices=[dict(head["choices"][0], delta=delta)])
            finish = "function_call" if legacy else "tool_calls"
        elif held:
            yield dict(head, choices=[dict(head["choices"][0], delta={"content": held})])
        yield dict(chunk, choices=[dict(choice, finish_reason=finish)])
