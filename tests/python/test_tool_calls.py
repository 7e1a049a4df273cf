"""Tool calls a model writes on its own under tool_choice "auto" (clusterkv_local/tool_calls.py):
the formats chat templates teach, parsed only when every call names a given tool with an object of
arguments; streamed replies send text before a call as content and the call as one delta.

Reference: hand-written replies with their expected calls, and the original text, which every
reply that is not a call must give back unchanged however it was split into chunks. End to end:
Qwen2.5-Coder-0.5B (its template teaches the Hermes <tool_call> format; it often answers with
the bare JSON) when it is in the model cache.
"""
import json
import os
import random

import pytest

from conftest import N_THREADS, model_folders
from clusterkv_local.tool_calls import chunks_with_calls, parse_tool_calls

NAMES = ["get_weather", "get_time"]
PARIS = {"city": "Paris"}


def calls_of(text):
    parsed = parse_tool_calls(text, NAMES)
    if parsed is None:
        return None
    content, calls = parsed
    return content, [(c["name"], json.loads(c["arguments"])) for c in calls]


@pytest.mark.parametrize("text, want", [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     (None, [("get_weather", PARIS)])),
    ('Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
     '\n<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>',
     ("Let me check.", [("get_weather", PARIS), ("get_time", {"zone": "CET"})])),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}',   # cut at its end tag
     (None, [("get_weather", PARIS)])),
    ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "a1b2c3d4e"}]',
     (None, [("get_weather", PARIS)])),
    ('<|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC"}}',
     (None, [("get_time", {"zone": "UTC"})])),
    ('{"name": "get_weather", "arguments": {"city": "Paris"}}', (None, [("get_weather", PARIS)])),
    ('  {"type": "function", "function": {"name": "get_weather", "arguments": "{\\"city\\": '
     '\\"Paris\\"}"}}', (None, [("get_weather", PARIS)])),
    ('```json\n[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
     '{"name": "get_time", "arguments": {}}]\n```',
     (None, [("get_weather", PARIS), ("get_time", {})])),
    ('{"name": "get_weather"}', (None, [("get_weather", {})])),
    # not calls: text, another tool, arguments that are not an object, broken JSON, plain JSON
    ("The weather in Paris is mild.", None),
    ('{"name": "send_mail", "arguments": {"to": "x"}}', None),
    ('{"name": "get_weather", "arguments": ["Paris"]}', None),
    ('{"name": "get_weather", "arguments": "Paris"}', None),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>', None),
    ('<tool_call>{"name": "get_weather", "arguments": {}}</tool_call><tool_call>oops</tool_call>',
     None),
    ('{"city": "Paris"}', None),
    ('[{"name": "get_weather", "arguments": {}}, {"name": "other"}]', None),
    ("Use <tool_call> tags to call tools.", None),
])
def test_parse(text, want):
    assert calls_of(text) == want


def _stream(text, pieces, rng=None):
    """Chat chunks of `text` cut into pieces at random places, as _chat_chunks makes them."""
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m"}
    cuts = sorted(rng.sample(range(1, len(text)), min(pieces, len(text) - 1))) if rng and text else []
    parts = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    yield dict(head, choices=[{"index": 0, "delta": {"role": "assistant"}, "logprobs": None,
                               "finish_reason": None}])
    for part in parts:
        yield dict(head, choices=[{"index": 0, "delta": {"content": part}, "logprobs": None,
                                   "finish_reason": None}])
    yield dict(head, choices=[{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}])


def _collect(chunks):
    content, calls, finish = "", [], None
    for chunk in chunks:
        choice = chunk["choices"][0]
        delta = choice["delta"]
        content += delta.get("content") or ""
        calls += delta.get("tool_calls", [])
        finish = choice["finish_reason"] or finish
    return content, calls, finish


@pytest.mark.parametrize("text", [
    'Let me check.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
    '{"name": "get_weather", "arguments": {"city": "Paris"}}',
    '\n  [TOOL_CALLS][{"name": "get_time", "arguments": {"zone": "CET"}}]',
    "Plain text with a < sign and a [TOOL bracket but no call.",
    "Use <tool_call> tags to call tools.",
    '   {"city": "Paris"} is JSON but not a call',
    "",
])
def test_stream(text):
    """Any split of the reply gives the same content and calls as the whole reply, and the text
    before a call streams before the reply ends."""
    parse = lambda t: parse_tool_calls(t, NAMES)   # noqa: E731
    want = parse(text)
    rng = random.Random(len(text))
    for pieces in (0, 1, 3, 7, 40):
        chunks = list(chunks_with_calls(_stream(text, pieces, rng if pieces else None), parse, False))
        content, calls, finish = _collect(chunks)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
        if want is None:
            assert content == text and calls == [] and finish == "stop"
        else:
            assert [json.loads(c["function"]["arguments"]) for c in calls] == \
                [json.loads(c["arguments"]) for c in want[1]]
            assert [c["index"] for c in calls] == list(range(len(calls)))
            assert content.strip() == (want[0] or "") and finish == "tool_calls"
    if text.startswith("Let me check."):   # streamed before the call was complete
        chunks = list(chunks_with_calls(_stream(text, 40, random.Random(1)), parse, False))
        first_text = next(i for i, c in enumerate(chunks) if c["choices"][0]["delta"].get("content"))
        assert first_text < len(chunks) - 3


def test_legacy_stream_gives_function_call():
    text = '{"name": "get_time", "arguments": {"zone": "CET"}}'
    chunks = list(chunks_with_calls(_stream(text, 3, random.Random(2)),
                                    lambda t: parse_tool_calls(t, NAMES), True))
    call = [c["choices"][0]["delta"]["function_call"] for c in chunks
            if "function_call" in c["choices"][0]["delta"]]
    assert call == [{"name": "get_time", "arguments": '{"zone": "CET"}'}]
    assert chunks[-1]["choices"][0]["finish_reason"] == "function_call"


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


@pytest.fixture(scope="module")
def qwen():
    from conftest import require_native

    require_native()
    from clusterkv_local import Llama

    for folder in model_folders():
        path = os.path.join(folder, "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
        if os.path.exists(path):
            llm = Llama(path, n_ctx=1024, n_threads=N_THREADS, verbose=False)
            yield llm
            llm.close()
            return
    pytest.skip("qwen2.5-coder-0.5b-instruct is not in the model cache")


def test_qwen_calls_a_tool_on_its_own(qwen):
    ask = [{"role": "user", "content": "What's the weather in Paris right now?"}]
    out = qwen.create_chat_completion(ask, tools=[WEATHER], temperature=0, max_tokens=60)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    content, calls, finish = _collect(qwen.create_chat_completion(
        ask, tools=[WEATHER], temperature=0, max_tokens=60, stream=True))
    assert finish == "tool_calls" and calls[0]["function"] == call["function"] and not content
    # "none": the same reply stays text; a question the tool does not serve is answered in text
    text = qwen.create_chat_completion(ask, tools=[WEATHER], tool_choice="none", temperature=0,
                                       max_tokens=60)["choices"][0]
    assert text["finish_reason"] == "stop" and "tool_calls" not in text["message"]
    other = qwen.create_chat_completion([{"role": "user", "content": "Say hello in French."}],
                                        tools=[WEATHER], temperature=0, max_tokens=20)
    assert other["choices"][0]["message"]["content"] and \
        "tool_calls" not in other["choices"][0]["message"]
