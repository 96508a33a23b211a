"""WikiText perplexity: lm-evaluation-harness's `wikitext` protocol, or one sliding-window stream.

Protocol `lm-eval` (the default) reproduces the harness's `wikitext` task (lm-eval 0.4,
`loglikelihood_rolling`): the text is split into articles as `EleutherAI/wikitext_document_level`
splits it; each article is detokenised, encoded, preceded by EOS and scored in disjoint windows of
the model's context (the first window scores every token it holds, each later one the next
`window` tokens, with the tokens before it as context). Words (`re.split(r"\\s+")`) and UTF-8
bytes are counted per article on the text as released, before detokenisation, as the harness
counts them; `word_perplexity`, `byte_perplexity` and `bits_per_byte` divide the summed NLL by
those totals, `token_perplexity` by the number of scored tokens.

Protocol `stream` scores the whole text as one EOS-prefixed stream with windows moving by
`stride` tokens (HF's "perplexity of fixed-length models" recipe): more context per token, so
lower numbers than the harness's, not comparable with published ones.

Sources: `bundled` is WikiText-2 as shipped in `ted_scale/assets/`, the tokenised release (rare
words as `<unk>`; the harness's `wikitext-2-v1`); `hf` is the raw release the harness's stock task
and most published numbers use (`wikitext-2-raw-v1`, needs the HF hub or its cache).
"""

from __future__ import annotations

import math
import os
import re
import socket
import sys
from urllib.parse import urlparse

import torch
from transformers import PreTrainedTokenizerBase

from ted_scale.eval import EvalError
from ted_scale.eval.datafiles import asset, read_lines
from ted_scale.eval.model_loading import encode
from ted_scale.eval.scoring import IGNORE_INDEX, model_device, perplexity, score_sequences
from ted_scale.model import GPT

PROTOCOLS = ("lm-eval", "stream")
SOURCES = ("auto", "hf", "bundled")
BUNDLED = {"test": "wikitext-2-test.txt.gz", "valid": "wikitext-2-valid.txt.gz"}
BUNDLED_SOURCE = "wikitext-2-v1 (bundled tokenised release, <unk> for rare words)"
HF_DATASET = ("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1")  # the harness's task
HF_SOURCE = "wikitext-2-raw-v1 (raw release, HF hub)"
_HF_SPLITS = {"test": "test", "valid": "validation"}

# The tokenised release -> plain text, in order (lm-evaluation-harness `wikitext_detokenizer`).
_DETOKENIZE_REPLACE = (
    ("s '", "s'"),
    (" @-@ ", "-"),
    (" @,@ ", ","),
    (" @.@ ", "."),
    (" : ", ": "),
    (" ; ", "; "),
    (" . ", ". "),
    (" ! ", "! "),
    (" ? ", "? "),
    (" , ", ", "),
)
_DETOKENIZE_SLASH_QUOTE = (re.compile(r"/' [0-9]/"), r"/'[0-9]/")  # the harness's rule, kept as is
_DETOKENIZE_BRACKETS = tuple(
    (re.compile(rf"{re.escape(o)}\s*([^{re.escape(c)}]*?)\s*{re.escape(c)}"), rf"{o}\1{c}")
    for o, c in (("(", ")"), ("[", "]"), ("{", "}"), ('"', '"'), ("'", "'"))
)
_DETOKENIZE_MISC = (
    ("= = = =", "===="),
    ("= = =", "==="),
    ("= =", "=="),
    (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
    (" \n", "\n"),
    ("\n ", "\n"),
    (" N ", " 1 "),
    (" 's", "'s"),
)


def detokenize(text: str) -> str:
    """Undo WikiText's tokenisation: ` @-@ ` -> `-`, ` , ` -> `, `, `( x )` -> `(x)`, `= = h = =`
    -> `== h ==`, ` 's` -> `'s`, ... (the harness's rules, in its order)."""
    text = text.replace(*_DETOKENIZE_REPLACE[0])
    text = _DETOKENIZE_SLASH_QUOTE[0].sub(_DETOKENIZE_SLASH_QUOTE[1], text)
    for old, new in _DETOKENIZE_REPLACE[1:]:
        text = text.replace(old, new)
    for pattern, repl in _DETOKENIZE_BRACKETS:
        text = pattern.sub(repl, text)
    for old, new in _DETOKENIZE_MISC:
        text = text.replace(old, new)
    return text


def _is_title(line: str) -> bool:
    """` = Title = ` (an article) but not ` = = Section = = ` (the dataset script's test)."""
    line = line.replace("= = =", "===").replace("= =", "==").strip()
    return line.startswith("= ") and line.endswith(" =")


def split_articles(text: str) -> list[str]:
    """Split WikiText into articles as `EleutherAI/wikitext_document_level` does.

    Lines are split at "\\n" and each article is its lines joined by "\\n" (no newline after its
    last line), from a title line to the line before the next title; a blank stretch before the
    first title is dropped. "\\n".join(split_articles(t)) is t less that stretch.
    """
    articles: list[str] = []
    lines: list[str] = []
    for line in text.split("\n"):
        if _is_title(line):
            article = "\n".join(lines)
            if article.strip():
                articles.append(article)
            lines = []
        lines.append(line)
    articles.append("\n".join(lines))
    return articles


def count_words(article: str) -> int:
    """The harness's word count: `len(re.split(r"\\s+", article))` (leading/trailing blanks count)."""
    return len(re.split(r"\s+", article))


def load_wikitext(
    path: str | os.PathLike | None = None, *, split: str = "test", max_articles: int | None = None
) -> str:
    """WikiText text from a file (`.gz` allowed), or the bundled WikiText-2 `split` (test, valid).

    max_articles keeps only the first articles (smoke runs and tests).
    """
    if path is None:
        if split not in BUNDLED:
            raise EvalError(f"no bundled WikiText split {split!r} (have {sorted(BUNDLED)})")
        path = asset(BUNDLED[split])
    text = "".join(line for _, line in read_lines(path))
    if not text.strip():
        raise EvalError(f"{path}: no text")
    return text if max_articles is None else "\n".join(split_articles(text)[:max_articles])


def load_wikitext_hf(split: str = "test", *, max_articles: int | None = None) -> str:
    """The raw WikiText-2 `split` (test, valid) from the HF hub, as the harness's task loads it:
    its articles joined by "\\n" (needs the hub or its cache)."""
    from datasets import load_dataset  # heavy import, only for this path

    if split not in _HF_SPLITS:
        raise EvalError(f"no WikiText split {split!r} (have {sorted(_HF_SPLITS)})")
    try:
        pages = list(load_dataset(*HF_DATASET, split=_HF_SPLITS[split])["page"])
    except Exception as e:  # the hub raises many types (connection, missing config, ...)
        raise EvalError(f"cannot load {'/'.join(HF_DATASET)}: {e}") from None
    return "\n".join(pages[:max_articles] if max_articles is not None else pages)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the HF hub answers a TCP connection (quickly: `datasets` retries for ~25 s)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def load_wikitext_source(
    source: str = "auto", *, split: str = "test", max_articles: int | None = None
) -> tuple[str, str]:
    """(text, label of what was loaded) for `source`: `hf` (the raw release), `bundled`, or `auto`
    (hf when the hub answers, else bundled, saying so on stderr)."""
    if source not in SOURCES:
        raise EvalError(f"WikiText source {source!r}: choose from {SOURCES}")
    if source == "auto" and not hub_reachable():
        print(
            f"wikitext: the HF hub is not reachable; scoring the bundled {BUNDLED_SOURCE}, "
            "not the raw release most published numbers use",
            file=sys.stderr,
        )
        source = "bundled"
    if source == "bundled":
        return load_wikitext(split=split, max_articles=max_articles), BUNDLED_SOURCE
    return load_wikitext_hf(split, max_articles=max_articles), HF_SOURCE


def sliding_windows(num_targets: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a stream of 1 prefix token + `num_targets` tokens.

    Returns (begin, end, new) per window: its inputs are stream[begin:end] (at most `window`),
    predicting stream[begin + 1 : end + 1], of which the last `new` are scored. The first window
    scores all it predicts; each later one moves by `stride` and scores the `stride` new tokens.
    stride == window gives the harness's disjoint rolling windows (`get_rolling_token_windows` with
    context_len 1, then `make_disjoint_window`): the last window keeps a full context.
    """
    if not 1 <= stride <= window:
        raise EvalError(f"stride {stride} must be between 1 and the window ({window})")
    windows = []
    done = 0  # targets 1..done are scored
    while done < num_targets:
        end = min(done + stride if windows else window, num_targets)
        windows.append((max(0, end - window), end, end - done))
        done = end
    return windows


def evaluate_wikitext(
    model: GPT,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    *,
    protocol: str = "lm-eval",
    stride: int | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    detokenize_text: bool = True,
    fused: bool = True,
    progress: bool = False,
) -> dict:
    """Perplexities of `model` on WikiText `text` under `protocol` (see the module docstring).

    stride: window step of the `stream` protocol (default half the model's context); the
    `lm-eval` protocol always uses disjoint windows. Returns {"protocol", "token_perplexity",
    "word_perplexity", "byte_perplexity", "bits_per_byte", "num_tokens", "num_words",
    "num_bytes", "num_articles", "window", "stride", "detokenized"}.
    """
    if protocol not in PROTOCOLS:
        raise EvalError(f"WikiText protocol {protocol!r}: choose from {PROTOCOLS}")
    window = model.config.n_positions
    if protocol == "lm-eval":
        if stride is not None:
            raise EvalError("a WikiText stride applies to the 'stream' protocol only")
        stride = window
    elif stride is None:
        stride = window // 2
    if not text.strip():
        raise EvalError("WikiText: no text to evaluate")
    articles = split_articles(text)
    num_words = sum(count_words(a) for a in articles)
    num_bytes = sum(len(a.encode("utf-8")) for a in articles)
    examples = []
    num_tokens = 0
    for piece in articles if protocol == "lm-eval" else [text]:
        ids = encode(
            tokenizer,
            detokenize(piece) if detokenize_text else piece,
            vocab_size=model.config.vocab_size,
            where="WikiText",
        )
        stream = [tokenizer.eos_token_id, *ids]
        for begin, end, new in sliding_windows(len(ids), window, stride):
            targets = stream[begin + 1 : end + 1]
            examples.append(
                (stream[begin:end], [IGNORE_INDEX] * (len(targets) - new) + targets[-new:])
            )
        num_tokens += len(ids)
    scores = score_sequences(
        model,
        examples,
        batch_size=batch_size,
        device=torch.device(device) if device is not None else model_device(model),
        fused=fused,
        desc="wikitext",
        progress=progress,
    )
    total = sum(s.nll for s in scores)
    assert sum(s.num_tokens for s in scores) == num_tokens  # every token scored exactly once
    return {
        "protocol": protocol,
        "token_perplexity": perplexity(total, num_tokens),
        "word_perplexity": perplexity(total, num_words),
        "byte_perplexity": perplexity(total, num_bytes),
        "bits_per_byte": total / num_bytes / math.log(2),
        "num_tokens": num_tokens,
        "num_words": num_words,
        "num_bytes": num_bytes,
        "num_articles": len(articles),
        "window": window,
        "stride": stride,
        "detokenized": detokenize_text,
    }
