"""Retrieval cases (passkey, needle-in-a-haystack single and multi-key) built at the token level.

A case is a context (prefilled densely), a query (fed one token per decode step, so the question
itself goes through the KV policy, as in the ClusterKV/Quest harnesses) and the expected answer.
Needles are placed by token count: a needle at depth d starts at the first sentence boundary at
or before d * (haystack tokens), so `Case.needle_at` can be checked exactly.

Two prompt formats: "completion" (plain text ending in "The pass key is") and "chat" (the
model's chat template, the answer prefix written after the assistant header).
"""
import random
import re
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

PASSKEY_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and "
                  "back again. ")
INTRO = ("There is important information hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about it.\n\n")
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key?"
PASSKEY_ANSWER_PREFIX = "The pass key is"
NIAH_NEEDLE = " The special magic number for {key} is: {value}."
NIAH_QUESTION = "What is the special magic number for {key} mentioned in the provided text?"
NIAH_ANSWER_PREFIX = "The special magic number for {key} mentioned in the provided text is"
NIAH_KEYS = ["apple", "river", "lantern", "violet", "granite", "falcon", "harbor", "meadow",
             "copper", "saffron", "glacier", "orchid", "thunder", "willow", "canyon", "ember"]
FORMATS = ("completion", "chat")
TASKS = ("passkey", "niah", "niah_multi")


class Case(NamedTuple):
    task: str             # one of TASKS
    length: int           # tokens of context + query
    depth: float          # requested needle depth in [0, 1]
    context: List[int]    # prefilled densely (BOS, intro, haystack with needles)
    query: List[int]      # question and answer prefix, one decode step per token
    answer: str           # the digits a correct reply contains
    needle_at: int        # index in context of the asked needle's first token
    hay_start: int        # index in context of the first haystack token
    n_hay: int            # haystack tokens in context (needles excluded)
    max_new: int          # greedy tokens to generate


class PromptKit(NamedTuple):
    """What building a case needs from the model: tokenization and the chat template."""

    tokenize: Callable[[str], List[int]]        # text -> ids, no BOS, no special parsing
    piece: Callable[[int], str]                 # id -> its text
    bos: List[int]                              # [] or [bos id]
    chat_wrap: Optional[Callable[[str], Tuple[str, str]]]  # user text -> (before, after) or None


def sentence_start(hay: Sequence[int], index: int, piece: Callable[[int], str],
                   lookback: int = 64) -> int:
    """The largest i <= index whose preceding token ends a sentence ('.', '!', '?', newline), or
    index itself when none is within `lookback` tokens."""
    index = max(0, min(index, len(hay)))
    for i in range(index, max(0, index - lookback) - 1, -1):
        if i == 0:
            return 0
        text = piece(hay[i - 1]).rstrip(" ")
        if text.endswith((".", "!", "?", "\n")):
            return i
    return index


def insert_needles(hay: Sequence[int], needles: Sequence[Tuple[float, List[int]]],
                   piece: Callable[[int], str]) -> Tuple[List[int], List[int]]:
    """Puts each (depth, tokens) needle at the sentence start at or before depth * len(hay).
    Returns (tokens, start index of each needle in the result, in the order given)."""
    spots = [(sentence_start(hay, int(round(d * len(hay))), piece), j)
             for j, (d, _) in enumerate(needles)]
    out, starts, prev = [], [0] * len(needles), 0
    for spot, j in sorted(spots):
        out.extend(hay[prev:spot])
        starts[j] = len(out)
        out.extend(needles[j][1])
        prev = spot
    out.extend(hay[prev:])
    return out, starts


def _frame(kit: PromptKit, fmt: str, question: str, answer_prefix: str) -> Tuple[str, str]:
    """(text before the haystack, text after it) for a prompt format."""
    if fmt == "completion":
        return INTRO, "\n\n%s %s" % (question, answer_prefix)
    if kit.chat_wrap is None:
        raise ValueError("prompt format 'chat' needs a model with a chat template")
    before, after = kit.chat_wrap(INTRO.rstrip("\n") + "\n\n\x00\n\n" + question)
    return before, after + answer_prefix


def _build(kit: PromptKit, fmt: str, hay_tokens: Sequence[int], length: int, question: str,
           answer_prefix: str, needles: List[Tuple[float, str]], ask: int) -> tuple:
    """Context and query of `length` tokens in all with the needles in the haystack."""
    if fmt not in FORMATS:
        raise ValueError("prompt format must be one of %s, got %r" % (", ".join(FORMATS), fmt))
    before, after = _frame(kit, fmt, question, answer_prefix)
    head = kit.bos + kit.tokenize(before)
    query = kit.tokenize(after)
    needle_tokens = [(d, kit.tokenize(text)) for d, text in needles]
    n_hay = length - len(head) - len(query) - sum(len(t) for _, t in needle_tokens)
    if n_hay < 16:
        raise ValueError("length %d is too short for this prompt (%d tokens without haystack)"
                         % (length, length - n_hay))
    if n_hay > len(hay_tokens):
        raise ValueError("the haystack has %d tokens, %d needed" % (len(hay_tokens), n_hay))
    body, starts = insert_needles(hay_tokens[:n_hay], needle_tokens, kit.piece)
    return head + body, query, len(head) + starts[ask], len(head), n_hay


def passkey_case(kit: PromptKit, hay_tokens: Sequence[int], length: int, depth: float,
                 seed: int = 0, fmt: str = "completion", repeat: int = 3) -> Case:
    """The classic passkey test: a 5-digit key in the haystack, asked for at the end. The
    needle sentence is written `repeat` times in a row at the depth: SmolLM2-135M with the full
    cache misses most depths with one copy even at 2k (2/5 at depths .1-.9; 5/5 with three)."""
    if repeat < 1:
        raise ValueError("passkey repeat must be >= 1, got %d" % repeat)
    key = str(random.Random("passkey/%d/%d/%.3f" % (seed, length, depth)).randint(10000, 99999))
    context, query, at, hay_start, n_hay = _build(
        kit, fmt, hay_tokens, length, PASSKEY_QUESTION, PASSKEY_ANSWER_PREFIX,
        [(depth, PASSKEY_NEEDLE.format(key=key) * repeat)], 0)
    return Case("passkey", length, depth, context, query, key, at, hay_start, n_hay, 8)


def niah_case(kit: PromptKit, hay_tokens: Sequence[int], length: int, depth: float,
              n_keys: int = 1, seed: int = 0, fmt: str = "completion") -> Case:
    """RULER-style needles "The special magic number for KEY is: VALUE." with distinct keys
    and 7-digit values; the asked one sits at `depth`, the other n_keys - 1 spread evenly."""
    rng = random.Random("niah/%d/%d/%d/%.3f" % (seed, n_keys, length, depth))
    keys = rng.sample(NIAH_KEYS, n_keys)
    values = [str(rng.randint(1000000, 9999999)) for _ in keys]
    depths = [depth] + [min(0.95, max(0.05, (depth + j / n_keys) % 1.0)) for j in range(1, n_keys)]
    needles = [(d, NIAH_NEEDLE.format(key=k, value=v)) for d, k, v in zip(depths, keys, values)]
    context, query, at, hay_start, n_hay = _build(
        kit, fmt, hay_tokens, length, NIAH_QUESTION.format(key=keys[0]),
        NIAH_ANSWER_PREFIX.format(key=keys[0]), needles, 0)
    task = "niah" if n_keys == 1 else "niah_multi"
    return Case(task, length, depth, context, query, values[0], at, hay_start, n_hay, 12)


def is_correct(case: Case, reply: str) -> bool:
    """passkey: the first number in the reply is the key; niah: the value appears in it."""
    if case.task == "passkey":
        match = re.search(r"\d+", reply)
        return bool(match) and match.group(0) == case.answer
    return case.answer in reply
