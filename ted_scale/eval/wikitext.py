"""WikiText: token-level perplexity with a sliding window, and word-level perplexity.

The text is one token stream, preceded by EOS so that its first token is scored too. Windows of
the model's context length move by `stride` tokens: each token is scored exactly once, in the
first window that reaches it, with at least `window - stride` tokens of left context once the
stream is longer than a window (HF's "perplexity of fixed-length models" recipe). Word-level
perplexity divides the total NLL by the number of whitespace-separated words of the original
(tokenised-release) text, as lm-evaluation-harness's `word_perplexity` does.
"""

from __future__ import annotations

import os
import re

import torch
from transformers import PreTrainedTokenizerBase

from ted_scale.eval import EvalError
from ted_scale.eval.datafiles import asset, read_lines
from ted_scale.eval.models import encode
from ted_scale.eval.scoring import IGNORE_INDEX, model_device, perplexity, score_sequences
from ted_scale.model import GPT

BUNDLED = {"test": "wikitext-2-test.txt.gz", "valid": "wikitext-2-valid.txt.gz"}
HF_DATASET = ("Salesforce/wikitext", "wikitext-103-raw-v1")
_ARTICLE_TITLE = re.compile(r"^ = [^=].* = $")  # " = Title = "; sections are " = = Sub = = "

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
    for old, new in _DETOKENIZE_REPLACE:
        text = text.replace(old, new)
    for pattern, repl in _DETOKENIZE_BRACKETS:
        text = pattern.sub(repl, text)
    for old, new in _DETOKENIZE_MISC:
        text = text.replace(old, new)
    return text


def split_articles(text: str) -> list[str]:
    """Split WikiText at its article titles (` = Title = ` lines); each article keeps its lines."""
    articles: list[str] = []
    for line in text.splitlines(keepends=True):
        # A title starts an article; blank lines before the first title belong to it.
        if not articles or (_ARTICLE_TITLE.match(line.rstrip("\n")) and articles[-1].strip()):
            articles.append("")
        articles[-1] += line
    return articles


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
    return text if max_articles is None else "".join(split_articles(text)[:max_articles])


def load_wikitext_hf(split: str = "test", *, max_articles: int | None = None) -> str:
    """WikiText-103 (raw) `split` from the HF hub, its rows concatenated (needs hub or cache)."""
    from datasets import load_dataset  # heavy import, only for this path

    try:
        rows = load_dataset(*HF_DATASET, split=split)["text"]
    except Exception as e:  # the hub raises many types (connection, missing config, ...)
        raise EvalError(f"cannot load {'/'.join(HF_DATASET)}: {e}") from None
    text = "".join(rows)
    return text if max_articles is None else "".join(split_articles(text)[:max_articles])


def sliding_windows(num_targets: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a stream of 1 prefix token + `num_targets` tokens.

    Returns (begin, end, new) per window: its inputs are stream[begin:end] (at most `window`),
    predicting stream[begin + 1 : end + 1], of which the last `new` are scored. The first window
    scores all it predicts; each later one moves by `stride` and scores the `stride` new tokens.
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
    stride: int | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    detokenize_text: bool = True,
    fused: bool = True,
    progress: bool = False,
) -> dict:
    """Token- and word-level perplexity of `model` on WikiText `text` (the tokenised release).

    stride: window step in tokens (default half the model's context). Returns
    {"token_perplexity", "word_perplexity", "num_tokens", "num_words", "stride", "detokenized"}.
    """
    window = model.config.n_positions
    stride = window // 2 if stride is None else stride
    num_words = len(text.split())
    if not num_words:
        raise EvalError("WikiText: no text to evaluate")
    scored_text = detokenize(text) if detokenize_text else text
    ids = encode(tokenizer, scored_text, vocab_size=model.config.vocab_size, where="WikiText")
    stream = [tokenizer.eos_token_id, *ids]
    examples = []
    for begin, end, new in sliding_windows(len(ids), window, stride):
        targets = stream[begin + 1 : end + 1]
        examples.append((stream[begin:end], [IGNORE_INDEX] * (len(targets) - new) + targets[-new:]))
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
    assert sum(s.num_tokens for s in scores) == len(ids)  # every token scored exactly once
    return {
        "token_perplexity": perplexity(total, len(ids)),
        "word_perplexity": perplexity(total, num_words),
        "num_tokens": len(ids),
        "num_words": num_words,
        "stride": stride,
        "detokenized": detokenize_text,
    }
