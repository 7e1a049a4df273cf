"""Draft models for speculative decoding (llama-cpp-python's `draft_model=`).

A draft model guesses the tokens that follow; Llama evaluates the sampled token and the guesses
in one forward pass (reading the weights once for all of them), then samples position by
position and keeps the guesses up to the first one the sampler does not draw. The tokens drawn
are exactly those of decoding one token at a time (same logits, same draws of the seeded
sampler), only fewer forward passes run when the guesses are good.

`LlamaPromptLookupDecoding` guesses from the text itself: the tokens that followed the last
earlier occurrence of the sequence's final n-gram. Repetitive outputs - code edits, quotes,
extraction from the prompt - accept many guesses; free prose few.

    >>> llm = Llama(path, draft_model=LlamaPromptLookupDecoding(num_pred_tokens=8))
"""
import numpy as np


class LlamaDraftModel:
    """A source of guesses: called with the token ids so far (np.intc), returns the ids it
    expects next (any length; Llama uses what fits in the context)."""

    def __call__(self, input_ids: np.ndarray, /, **kwargs) -> np.ndarray:
        raise NotImplementedError


class LlamaPromptLookupDecoding(LlamaDraftModel):
    """Prompt lookup: for n from max_ngram_size down to 1, the last n tokens are searched for
    earlier in the sequence; at the latest earlier match, the up to num_pred_tokens tokens that
    followed it are the guess. No match: no guess."""

    def __init__(self, max_ngram_size: int = 2, num_pred_tokens: int = 10):
        for name, value in (("max_ngram_size", max_ngram_size), ("num_pred_tokens", num_pred_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError("%s must be an int >= 1, got %r" % (name, value))
        self.max_ngram_size = max_ngram_size
        self.num_pred_tokens = num_pred_tokens

    def __call__(self, input_ids: np.ndarray, /, **kwargs) -> np.ndarray:
        ids = np.asarray(input_ids, dtype=np.intc).reshape(-1)
        for n in range(min(self.max_ngram_size, len(ids) - 1), 0, -1):
            tail = ids[-n:]
            # windows[i] = ids[i:i + n] for the starts before the tail's own, so ids[i + n] exists
            windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)
            hits = np.nonzero(np.all(windows == tail, axis=1))[0]
            if len(hits):
                start = int(hits[-1]) + n
                return ids[start:start + self.num_pred_tokens].copy()
        return np.zeros(0, dtype=np.intc)
