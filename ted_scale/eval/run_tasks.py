"""The evaluation suite behind `launch/evaluate.py`: one model, several tasks, one results dict."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import torch

from ted_scale.eval import EvalError
from ted_scale.eval.heldout import evaluate_heldout
from ted_scale.eval.lambada import evaluate_lambada, load_lambada, load_lambada_hf
from ted_scale.eval.model_loading import load_model
from ted_scale.eval.wikitext import PROTOCOLS, evaluate_wikitext, load_wikitext_source

TASKS = ("lambada", "wikitext", "heldout")
SOURCES = ("bundled", "hf")  # LAMBADA's; WikiText adds "auto" (wikitext.SOURCES)


def run_evaluation(
    model_path: str | os.PathLike,
    tasks: Sequence[str],
    *,
    data_dir: str | os.PathLike | None = None,
    batch_size: int = 8,
    stride: int | None = None,
    device: str | None = None,
    detokenize: bool = True,
    lambada_source: str = "bundled",
    wikitext_source: str = "auto",
    wikitext_protocol: str = "lm-eval",
    max_examples: int | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate one model on `tasks` (a subset of TASKS).

    max_examples caps the LAMBADA passages, WikiText articles and held-out batches (smoke runs).
    wikitext_protocol: `lm-eval` (the harness's per-article protocol) or `stream` (with `stride`).
    Returns {"model", "device", task: {...metrics, "source", "seconds"} for each task}.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise EvalError(f"unknown or no tasks {unknown or list(tasks)} (choose from {TASKS})")
    if "heldout" in tasks and data_dir is None:
        raise EvalError("the heldout task needs --data DIR (a prepare_data.py output)")
    if lambada_source not in SOURCES:
        raise EvalError(f"--lambada-source {lambada_source!r}: choose from {SOURCES}")
    if wikitext_protocol not in PROTOCOLS:
        raise EvalError(f"--wikitext-protocol {wikitext_protocol!r}: choose from {PROTOCOLS}")
    if stride is not None and wikitext_protocol != "stream":
        raise EvalError("--stride applies to --wikitext-protocol stream only")
    if batch_size < 1:
        raise EvalError(f"batch size must be >= 1, got {batch_size}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, source = load_model(model_path, device=device)
    results: dict = {"model": source, "device": device}
    for task in dict.fromkeys(tasks):  # in the given order, once each
        start = time.perf_counter()
        if task == "lambada":
            passages = load_lambada_hf() if lambada_source == "hf" else load_lambada()
            out = evaluate_lambada(
                model,
                tokenizer,
                passages,
                batch_size=batch_size,
                max_examples=max_examples,
                progress=progress,
            )
            out["source"] = lambada_source
        elif task == "wikitext":
            text, source = load_wikitext_source(wikitext_source, max_articles=max_examples)
            out = evaluate_wikitext(
                model,
                tokenizer,
                text,
                protocol=wikitext_protocol,
                stride=stride,
                batch_size=batch_size,
                detokenize_text=detokenize,
                progress=progress,
            )
            out["source"] = source
        else:
            out = evaluate_heldout(
                model,
                tokenizer,
                data_dir,
                batch_size=batch_size,
                max_batches=max_examples,
                progress=progress,
            )
        out["seconds"] = round(time.perf_counter() - start, 3)
        results[task] = out
    return results


def format_summary(results: dict) -> str:
    """A few human-readable lines of a `run_evaluation` result."""
    lines = [f"model: {results['model']}"]
    if "lambada" in results:
        r = results["lambada"]
        lines.append(
            f"lambada   accuracy {r['accuracy']:.4f}  perplexity {r['perplexity']:.3f}  "
            f"({r['num_examples']} passages)"
        )
    if "wikitext" in results:
        r = results["wikitext"]
        lines.append(
            f"wikitext  word ppl {r['word_perplexity']:.3f}  byte ppl {r['byte_perplexity']:.4f}  "
            f"bits/byte {r['bits_per_byte']:.4f}  token ppl {r['token_perplexity']:.3f}  "
            f"({r['num_articles']} articles, {r['num_tokens']} tokens, {r['num_words']} words; "
            f"protocol {r['protocol']}, {r['source']})"
        )
    if "heldout" in results:
        r = results["heldout"]
        lines.append(
            f"heldout   perplexity {r['perplexity']:.3f}  accuracy {r['accuracy']:.4f}  "
            f"({r['num_tokens']} tokens)"
        )
    return "\n".join(lines)
