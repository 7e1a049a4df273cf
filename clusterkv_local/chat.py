"""Chat prompt rendering: GGUF `tokenizer.chat_template` Jinja2 templates and built-in formats.

Data flow: Llama.create_chat_completion -> resolve_chat_format() picks a template (the name
given by `chat_format`, else the GGUF's own template, else the ChatML fallback) ->
ChatFormatter.render(messages) -> prompt text, tokenized with special-token parsing.

Rendering follows llama-cpp-python's Jinja2ChatFormatter (the de-facto spec, itself modelled on
transformers): an ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks and
loopcontrols; `raise_exception`, `strftime_now`, `bos_token`, `eos_token`,
`add_generation_prompt=True`; a `tojson` that keeps non-ASCII; HF's `{% generation %}` tag is
a pass-through. No native code is needed here.
"""
import datetime
import json
from typing import Any, Dict, List, NamedTuple, Optional

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

# ChatML, used when a model has no template (e.g. Gemma-3 270M base) and for chat_format="chatml".
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


class ChatFormat(NamedTuple):
    """A resolved chat format: the template, where it came from and extra stop strings."""

    name: str            # "chat_template.default" (from the GGUF), "chatml", ...
    template: str
    stop: List[str]      # stop strings besides the model's end-of-generation tokens


# name -> (template, stop strings). The stops matter when the model's vocabulary does not have
# the turn-end marker as a control token (e.g. ChatML on a base model).
BUILTIN_FORMATS = {
    "chatml": (CHATML_TEMPLATE, ["<|im_end|>"]),
    "llama-3": (LLAMA3_TEMPLATE, ["<|eot_id|>"]),
    "gemma": (GEMMA_TEMPLATE, ["<end_of_turn>"]),
}

GGUF_TEMPLATE_NAME = "chat_template.default"


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (HF assistant masks): render the body as is."""

    tags = {"generation"}

    def parse(self, parser) -> List[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Optional[int] = None,
            separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class ChatFormatter:
    """Renders a list of OpenAI-style messages with one Jinja2 chat template.

    Example:
        >>> fmt = ChatFormatter(CHATML_TEMPLATE)
        >>> fmt.render([{"role": "user", "content": "Hi"}])
        '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
    """

    def __init__(self, template: str, *, bos_token: str = "", eos_token: str = "",
                 add_generation_prompt: bool = True):
        env = ImmutableSandboxedEnvironment(
            loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
            extensions=["jinja2.ext.loopcontrols", _GenerationTag])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self.template_text = template
        self.template = env.from_string(template)
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.add_generation_prompt = add_generation_prompt

    def render(self, messages: List[Dict[str, Any]], **variables: Any) -> str:
        """The prompt text for `messages`; extra variables (tools, ...) go to the template.

        A template's raise_exception() surfaces as ValueError.
        """
        _check_messages(messages)
        context = dict(messages=_object_arguments(messages), bos_token=self.bos_token,
                       eos_token=self.eos_token,
                       add_generation_prompt=self.add_generation_prompt)
        context.update({k: v for k, v in variables.items() if v is not None})
        try:
            return self.template.render(**context)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError("chat template error: %s" % e) from e


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, (list, tuple)):
        raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError("messages[%d] must be a dict with a 'role' key" % i)


def _object_arguments(messages: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The messages with the arguments of earlier tool calls as objects: OpenAI sends them as
    JSON text, but templates write them with `| tojson` (Qwen, Hermes, Llama 3), which would
    quote the text again and teach the model a string of escaped JSON. Copies; arguments that
    are not JSON text stay as they are."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            message = dict(message, tool_calls=[_with_object_arguments(c) for c in calls])
        out.append(message)
    return out


def _with_object_arguments(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:
        return call
    return dict(call, function=dict(function, arguments=arguments))


def resolve_chat_format(chat_format: Optional[str], metadata: Dict[str, str]) -> ChatFormat:
    """Picks the template: a named format, else the GGUF's template, else ChatML.

    `chat_format` may be a built-in name ("chatml", "llama-3", "gemma"),
    "chat_template.default" (the GGUF's `tokenizer.chat_template`) or a named GGUF template
    "chat_template.<name>" (`tokenizer.chat_template.<name>`).

    Example:
        >>> resolve_chat_format(None, {}).name
        'chatml'
    """
    gguf_templates = {GGUF_TEMPLATE_NAME: metadata.get("tokenizer.chat_template")}
    prefix = "tokenizer.chat_template."
    for key, value in metadata.items():
        if key.startswith(prefix):
            gguf_templates["chat_template." + key[len(prefix):]] = value
    if chat_format is None:
        if gguf_templates[GGUF_TEMPLATE_NAME]:
            return ChatFormat(GGUF_TEMPLATE_NAME, gguf_templates[GGUF_TEMPLATE_NAME], [])
        template, stop = BUILTIN_FORMATS["chatml"]
        return ChatFormat("chatml", template, list(stop))
    if chat_format in BUILTIN_FORMATS:
        template, stop = BUILTIN_FORMATS[chat_format]
        return ChatFormat(chat_format, template, list(stop))
    if gguf_templates.get(chat_format):
        return ChatFormat(chat_format, gguf_templates[chat_format], [])
    known = sorted(BUILTIN_FORMATS) + sorted(k for k, v in gguf_templates.items() if v)
    raise ValueError("unknown chat_format %r; available: %s" % (chat_format, ", ".join(known)))
