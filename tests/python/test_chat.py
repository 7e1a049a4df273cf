"""Chat templates (clusterkv_local/chat.py) and Llama.create_chat_completion.

The rendering tests need only jinja2; SMOLLM2_TEMPLATE is the `tokenizer.chat_template` string
of SmolLM2-135M-Instruct.Q4_1.gguf, copied verbatim (the model test checks it still matches).
"""
import json

import pytest

from clusterkv_local.chat import (CHATML_TEMPLATE, ChatFormatter, resolve_chat_format)
from conftest import require_native

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MESSAGES = [{"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"}]

SMOLLM2_EXPECTED = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n4<|im_end|>\n"
    "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def test_smollm2_template_exact():
    fmt = ChatFormatter(SMOLLM2_TEMPLATE, bos_token="<|im_start|>", eos_token="<|im_end|>")
    assert fmt.render(MESSAGES) == SMOLLM2_EXPECTED
    with_system = [{"role": "system", "content": "Be terse."}] + MESSAGES[:1]
    assert fmt.render(with_system) == ("<|im_start|>system\nBe terse.<|im_end|>\n"
                                       "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                                       "<|im_start|>assistant\n")


def test_no_generation_prompt():
    fmt = ChatFormatter(SMOLLM2_TEMPLATE, add_generation_prompt=False)
    assert fmt.render(MESSAGES) == SMOLLM2_EXPECTED[:-len("<|im_start|>assistant\n")]


def test_fallback_is_chatml():
    fmt = resolve_chat_format(None, {"general.architecture": "gemma3"})
    assert fmt.name == "chatml" and fmt.stop == ["<|im_end|>"]
    assert ChatFormatter(fmt.template).render(MESSAGES[:1]) == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_resolve_named_formats():
    meta = {"tokenizer.chat_template": SMOLLM2_TEMPLATE,
            "tokenizer.chat_template.tool_use": "{{ 'tools' }}"}
    assert resolve_chat_format(None, meta).name == "chat_template.default"
    assert resolve_chat_format(None, meta).template == SMOLLM2_TEMPLATE
    assert resolve_chat_format("chat_template.tool_use", meta).template == "{{ 'tools' }}"
    assert resolve_chat_format("chatml", meta).template == CHATML_TEMPLATE
    with pytest.raises(ValueError, match="unknown chat_format 'llama-9'.*chatml"):
        resolve_chat_format("llama-9", meta)


def test_template_environment_features():
    template = (
        "{{ bos_token }}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{% generation %}[{{ m['content'] }}]{% endgeneration %}{% endfor %}"
        "{{ tools | tojson }}{{ strftime_now('%Y') | length }}{{ eos_token }}")
    fmt = ChatFormatter(template, bos_token="<s>", eos_token="</s>")
    out = fmt.render(MESSAGES, tools=[{"name": "café"}])
    assert out == "<s>[What is 2+2?]" + json.dumps([{"name": "café"}], ensure_ascii=False) \
        + "4</s>"


def test_trim_and_lstrip_blocks():
    fmt = ChatFormatter("{% for m in messages %}\n  {% if m['role'] %}{{ m['role'] }};"
                        "{% endif %}\n{% endfor %}")
    assert fmt.render(MESSAGES[:2]) == "user;assistant;"


def test_raise_exception_and_bad_messages():
    fmt = ChatFormatter("{% if messages[0]['role'] != 'user' %}"
                        "{{ raise_exception('first message must be from the user') }}{% endif %}")
    with pytest.raises(ValueError, match="first message must be from the user"):
        fmt.render([{"role": "assistant", "content": "hi"}])
    with pytest.raises(TypeError):
        fmt.render("hello")
    with pytest.raises(ValueError, match="messages\\[0\\]"):
        fmt.render([{"content": "no role"}])


def test_sandbox_blocks_attribute_escape():
    fmt = ChatFormatter("{{ messages.__class__.__mro__ }}")
    with pytest.raises(Exception):
        fmt.render(MESSAGES)


# ---------------------------------------------------------------------------------------------
# With the model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_llm(llm):
    require_native()
    return llm


def test_model_template_matches_and_renders(chat_llm):
    assert chat_llm.metadata["tokenizer.chat_template"] == SMOLLM2_TEMPLATE
    assert chat_llm.render_chat(MESSAGES) == SMOLLM2_EXPECTED


def test_create_chat_completion_shape(chat_llm):
    out = chat_llm.create_chat_completion(MESSAGES, max_tokens=16, temperature=0.0)
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    choice = out["choices"][0]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    assert "<|im_end|>" not in choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    n_prompt = len(chat_llm.tokenize(SMOLLM2_EXPECTED.encode(), add_bos=False, special=True))
    assert out["usage"]["prompt_tokens"] == n_prompt
    assert out["usage"]["total_tokens"] == n_prompt + out["usage"]["completion_tokens"]


def test_chat_stream_matches_non_stream(chat_llm):
    full = chat_llm.create_chat_completion(MESSAGES, max_tokens=24, temperature=0.0)
    chunks = list(chat_llm.create_chat_completion(MESSAGES, max_tokens=24, temperature=0.0,
                                                  stream=True))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == full["choices"][0]["message"]["content"]


def test_chat_stops_at_end_of_turn(chat_llm):
    out = chat_llm.create_chat_completion(
        [{"role": "user", "content": "Say hello."}], max_tokens=200, temperature=0.0)
    # SmolLM2-Instruct ends a short answer with <|im_end|> (an end-of-generation token)
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] < 200


def test_earlier_tool_call_arguments_render_as_objects():
    """OpenAI messages carry a call's arguments as JSON text; templates write them with tojson
    (Qwen 2.5 / Hermes), so they are parsed first (as llama.cpp does), in a copy. Text that is
    not JSON stays text."""
    template = ("{% for m in messages %}{% for c in m.tool_calls or [] %}"
                "{{ c.function.name }}={{ c.function.arguments | tojson }};{% endfor %}{% endfor %}")
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    odd = {"id": "call_2", "type": "function", "function": {"name": "f", "arguments": "not json"}}
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [call, odd]},
                {"role": "tool", "tool_call_id": "call_1", "content": "14 C"}]
    out = ChatFormatter(template).render(messages)
    assert out == 'get_weather={"city": "Paris"};f="not json";'
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'
