"""Grammars that constrain what a completion may say, as llama-cpp-python's `LlamaGrammar`.

A grammar is text in llama.cpp's GBNF format; the native library compiles it (syntax errors
raise ValueError with line and column) and, during generation, masks the tokens that cannot
continue the text. `from_json_schema` turns a JSON Schema into such a grammar.

Example:
    >>> g = LlamaGrammar.from_string('root ::= "yes" | "no"')
    >>> llm("Is water wet? Answer: ", grammar=g, max_tokens=4)["choices"][0]["text"]
    'yes'
"""
import json
import os
from typing import Any, Optional, Union

from ._internals import _Grammar
from .json_schema import json_schema_to_gbnf

LLAMA_GRAMMAR_DEFAULT_ROOT = "root"


class LlamaGrammar:
    """A compiled-once GBNF grammar. It holds no model: each generation makes its own native
    state for the model it runs on, so one grammar serves several models and calls."""

    def __init__(self, *args: Any, _grammar: str, root: str = LLAMA_GRAMMAR_DEFAULT_ROOT,
                 **kwargs: Any):
        if not isinstance(_grammar, str):
            raise TypeError("grammar text must be a str, not %s" % type(_grammar).__name__)
        self._grammar = _grammar
        self._root = root
        self._text_state = _Grammar(None, _grammar, root)  # compiles now: errors surface here

    @classmethod
    def from_string(cls, grammar: str, verbose: bool = True) -> "LlamaGrammar":
        return cls(_grammar=grammar)

    @classmethod
    def from_file(cls, file: Union[str, "os.PathLike[str]"],
                  verbose: bool = True) -> "LlamaGrammar":
        with open(file, encoding="utf-8") as f:
            return cls.from_string(f.read(), verbose)

    @classmethod
    def from_json_schema(cls, json_schema: Union[str, dict],
                         verbose: bool = True) -> "LlamaGrammar":
        return cls.from_string(json_schema_to_gbnf(json_schema), verbose)

    @property
    def grammar(self) -> str:
        return self._grammar

    @property
    def root(self) -> str:
        return self._root

    def accepts(self, text: Union[str, bytes]) -> bool:
        """True when the whole text is a complete sentence of the grammar."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        state = self._text_state
        state.reset()
        return state.accept_text(data) and state.is_complete()

    def _state_for(self, model: Any) -> _Grammar:
        """A fresh native state over model's vocabulary, at the start of the text."""
        return _Grammar(model, self._grammar, self._root)

    def __repr__(self) -> str:
        return "LlamaGrammar(%s)" % json.dumps(self._grammar[:60])


def as_grammar(grammar: Optional[Union[LlamaGrammar, str]]) -> Optional[LlamaGrammar]:
    """The `grammar=` argument of the completion calls: a LlamaGrammar, GBNF text or None."""
    if grammar is None or isinstance(grammar, LlamaGrammar):
        return grammar
    if isinstance(grammar, str):
        return LlamaGrammar.from_string(grammar)
    raise TypeError("grammar must be a LlamaGrammar or GBNF text, not %s" % type(grammar).__name__)
