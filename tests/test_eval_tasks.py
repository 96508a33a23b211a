"""LAMBADA, WikiText and held-out numbers against a straightforward `transformers` computation.

The model is a tiny GPT trained for 150 steps on a slice of WikiText-2 valid with a tiny BPE
tokenizer, exported as an HF folder, so the reference below loads it with AutoModelForCausalLM
and scores with full logits, independently of ted_scale.eval.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ted_scale.data.prepare import PrepareConfig, prepare
from ted_scale.data.tokenizer import train_bpe_tokenizer
from ted_scale.eval import EvalError
from ted_scale.eval.heldout import evaluate_heldout
from ted_scale.eval.lambada import evaluate_lambada, load_lambada
from ted_scale.eval.model_loading import load_model
from ted_scale.eval.wikitext import (
    count_words,
    detokenize,
    evaluate_wikitext,
    load_wikitext,
    sliding_windows,
    split_articles,
)
from ted_scale.model import GPT, GPTConfig, export_hf

WINDOW = 32
RTOL = 1e-4


def _train_text() -> str:
    """The text the tiny model learns (about 2,200 tokens of the tiny tokenizer)."""
    return load_wikitext(split="valid")[:4000]


def _train_tiny_gpt(ids: list[int], vocab_size: int, steps: int = 150) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=vocab_size, n_positions=WINDOW, n_embd=64, n_layer=2, n_head=2, dropout=0.0
    )
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.tensor(ids)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - WINDOW - 1, (16,), generator=gen)
        batch = torch.stack([data[s : s + WINDOW + 1] for s in starts.tolist()])
        logits = model(batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy 2-core machine OpenMP waits stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(one_thread, tmp_path_factory):
    """HF folder of a tiny GPT that learned some WikiText statistics, with its BPE tokenizer."""
    tok = train_bpe_tokenizer(load_wikitext(split="valid", max_articles=4).splitlines(), 400)
    model = _train_tiny_gpt(tok(_train_text())["input_ids"], len(tok))
    return export_hf(model, tmp_path_factory.mktemp("eval") / "tiny_hf", tok)


@pytest.fixture(scope="module")
def reference(model_dir):
    """(HF model, HF tokenizer) loaded with transformers only."""
    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(
        model_dir
    )


def _log_probs(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), dim=-1)


def _reference_lambada(hf, tok, passages):
    nlls, correct = [], []
    for text in passages:
        context, last = text.rsplit(" ", 1)
        ctx = tok(context, add_special_tokens=False)["input_ids"]
        tgt = tok(" " + last, add_special_tokens=False)["input_ids"]
        ids = (ctx + tgt)[-(WINDOW + 1) :]
        logp = _log_probs(hf, ids[:-1])
        positions = range(len(ids) - 1 - len(tgt), len(ids) - 1)
        nlls.append(-sum(logp[p, ids[p + 1]].item() for p in positions))
        correct.append(all(logp[p].argmax().item() == ids[p + 1] for p in positions))
    return sum(correct) / len(passages), math.exp(sum(nlls) / len(passages))


def _reference_wikitext_nll(hf, tok, text: str, stride: int) -> tuple[float, int]:
    """Total NLL: token t (1..N after an EOS prefix) is scored in the window ending at the first
    of WINDOW, WINDOW + stride, WINDOW + 2 * stride, ... (capped at N) that reaches it."""
    stream = [tok.eos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]
    n = len(stream) - 1
    cache: dict[int, torch.Tensor] = {}
    total = 0.0
    for t in range(1, n + 1):
        end = min(WINDOW if t <= WINDOW else WINDOW + math.ceil((t - WINDOW) / stride) * stride, n)
        begin = max(0, end - WINDOW)
        if begin not in cache:
            cache[begin] = _log_probs(hf, stream[begin:end])
        total -= cache[begin][t - 1 - begin, stream[t]].item()
    return total, n


def test_lambada_matches_transformers(model_dir, reference):
    model, tokenizer, _ = load_model(model_dir)
    passages = load_lambada()[:24]
    got = evaluate_lambada(model, tokenizer, passages, batch_size=5)
    acc, ppl = _reference_lambada(*reference, passages)
    assert got["num_examples"] == 24
    assert got["accuracy"] == pytest.approx(acc, rel=RTOL, abs=1e-12)
    assert got["perplexity"] == pytest.approx(ppl, rel=RTOL)


def test_lambada_accuracy_counts_passages_whose_target_is_greedy(model_dir, reference):
    """Passages built from the model's own greedy continuation are all correct (accuracy 1)."""
    model, tokenizer, _ = load_model(model_dir)
    hf, tok = reference
    passages = []
    for prompt in ("The film was released in", "He said that the", "In the year"):
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        for _ in range(6):  # greedy-extend until a word boundary follows a word
            ids.append(int(_log_probs(hf, ids)[-1].argmax()))
        text = tok.decode(ids)
        if text.rsplit(" ", 1)[-1].strip() and (
            tok(text, add_special_tokens=False)["input_ids"] == ids
        ):
            passages.append(text)
    assert passages
    assert evaluate_lambada(model, tokenizer, passages)["accuracy"] == 1.0


@pytest.mark.parametrize(("stride", "detok"), [(16, True), (32, False), (7, True)])
def test_wikitext_matches_transformers(model_dir, reference, stride, detok):
    model, tokenizer, _ = load_model(model_dir)
    text = load_wikitext(max_articles=1)[:3000]
    got = evaluate_wikitext(
        model,
        tokenizer,
        text,
        protocol="stream",
        stride=stride,
        batch_size=6,
        detokenize_text=detok,
    )
    hf, tok = reference
    total, n = _reference_wikitext_nll(hf, tok, detokenize(text) if detok else text, stride)
    words = len(re.split(r"\s+", text))
    assert (got["num_tokens"], got["num_words"], got["detokenized"]) == (n, words, detok)
    assert got["token_perplexity"] == pytest.approx(math.exp(total / n), rel=RTOL)
    assert got["word_perplexity"] == pytest.approx(math.exp(total / words), rel=RTOL)


def _reference_lm_eval_nll(hf, tok, article: str) -> tuple[float, int]:
    """By hand: the article detokenised, EOS-prefixed, cut into disjoint windows of WINDOW
    targets; target t (1-based) sits in the window ending at min(ceil(t / WINDOW) * WINDOW, n),
    whose inputs are the WINDOW tokens before that end (fewer at the start)."""
    stream = [tok.eos_token_id, *tok(detokenize(article), add_special_tokens=False)["input_ids"]]
    n = len(stream) - 1
    cache: dict[int, torch.Tensor] = {}
    total = 0.0
    for t in range(1, n + 1):
        end = min(math.ceil(t / WINDOW) * WINDOW, n)
        begin = max(0, end - WINDOW)
        if begin not in cache:
            cache[begin] = _log_probs(hf, stream[begin:end])
        total -= cache[begin][t - 1 - begin, stream[t]].item()
    return total, n


def test_wikitext_lm_eval_protocol_matches_hand_computation(model_dir, reference):
    """Per article, EOS first, disjoint windows; words and bytes counted on the text as released."""
    model, tokenizer, _ = load_model(model_dir)
    text = load_wikitext(max_articles=2)
    articles = split_articles(text)
    got = evaluate_wikitext(model, tokenizer, text, batch_size=5)
    parts = [_reference_lm_eval_nll(*reference, a) for a in articles]
    total, n = sum(p[0] for p in parts), sum(p[1] for p in parts)
    words = sum(len(re.split(r"\s+", a)) for a in articles)
    num_bytes = sum(len(a.encode("utf-8")) for a in articles)
    assert len(articles) == 2 and all(n_a > WINDOW for _, n_a in parts)  # several windows each
    assert (got["protocol"], got["num_articles"], got["stride"]) == ("lm-eval", 2, WINDOW)
    assert (got["num_tokens"], got["num_words"], got["num_bytes"]) == (n, words, num_bytes)
    assert got["token_perplexity"] == pytest.approx(math.exp(total / n), rel=RTOL)
    assert got["word_perplexity"] == pytest.approx(math.exp(total / words), rel=RTOL)
    assert got["byte_perplexity"] == pytest.approx(math.exp(total / num_bytes), rel=RTOL)
    assert got["bits_per_byte"] == pytest.approx(total / num_bytes / math.log(2), rel=RTOL)


def test_wikitext_articles_and_words_as_the_harness_counts_them():
    text = " \n = A = \n \n x y \n = = S = = \n z \n = B = \n w \n"
    articles = split_articles(text)
    assert articles == [" = A = \n \n x y \n = = S = = \n z ", " = B = \n w \n"]
    assert [count_words(a) for a in articles] == [13, 6]  # leading/trailing "" count as words
    whole = load_wikitext()
    assert len(split_articles(whole)) == 62
    assert sum(count_words(a) for a in split_articles(whole)) == 241335  # lm-eval's count
    assert split_articles(load_wikitext(max_articles=3)) == split_articles(whole)[:3]


def test_wikitext_protocol_matches_lm_evaluation_harness(model_dir, tmp_path):
    """lm-eval's own wikitext task (its detokenizer, rolling windows and counts) on the same
    model and articles; lm-eval is a dev dependency, pinned."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    text = load_wikitext(max_articles=2)
    with (tmp_path / "pages.jsonl").open("w") as f:
        f.writelines(json.dumps({"page": a}) + "\n" for a in split_articles(text))
    stock = Path(lm_eval.__file__).parent / "tasks" / "wikitext"
    shutil.copy(stock / "preprocess_wikitext.py", tmp_path)
    yaml = (stock / "wikitext.yaml").read_text()
    yaml = yaml.replace("task: wikitext", "task: wikitext_local").replace(
        "dataset_name: wikitext-2-raw-v1",
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'pages.jsonl'}",
    )
    yaml = yaml.replace("dataset_path: EleutherAI/wikitext_document_level", "dataset_path: json")
    yaml = yaml.replace("training_split: train\nvalidation_split: validation\n", "")
    (tmp_path / "wikitext_local.yaml").write_text(yaml)
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=float32",
        tasks=["wikitext_local"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        batch_size=8,
        device="cpu",
    )["results"]["wikitext_local"]
    model, tokenizer, _ = load_model(model_dir)
    got = evaluate_wikitext(model, tokenizer, text)
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert got[metric] == pytest.approx(results[f"{metric},none"], rel=1e-6)


def test_evaluating_twice_gives_identical_numbers(model_dir):
    model, tokenizer, _ = load_model(model_dir)
    passages, text = load_lambada()[:10], load_wikitext(max_articles=1)[:1500]
    runs = [
        (
            evaluate_lambada(model, tokenizer, passages, batch_size=3),
            evaluate_wikitext(model, tokenizer, text, batch_size=4),
        )
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_stride_equal_to_window_gives_non_overlapping_windows():
    windows = sliding_windows(100, window=32, stride=32)
    assert [(b, e) for b, e, _ in windows] == [(0, 32), (32, 64), (64, 96), (68, 100)]
    assert [new for *_, new in windows] == [32, 32, 32, 4]
    for stride in (1, 5, 16, 32):  # every target scored once, windows never exceed 32
        ws = sliding_windows(100, window=32, stride=stride)
        assert sum(new for *_, new in ws) == 100
        assert all(0 < e - b <= 32 and new <= e - b for b, e, new in ws)


def test_smaller_stride_does_not_raise_perplexity(model_dir):
    """On text the model learned, overlapping windows give early tokens more context."""
    model, tokenizer, _ = load_model(model_dir)
    ppl = {
        s: evaluate_wikitext(
            model,
            tokenizer,
            _train_text(),
            protocol="stream",
            stride=s,
            batch_size=16,
            detokenize_text=False,
        )["token_perplexity"]
        for s in (WINDOW, WINDOW // 2, WINDOW // 8)
    }
    assert ppl[WINDOW] < 0.1 * len(tokenizer)  # the model learned the text: far from uniform
    assert ppl[WINDOW // 2] < 0.97 * ppl[WINDOW]
    # Past ~10 tokens of context this tiny model gains nothing more: "keeps", within noise.
    assert ppl[WINDOW // 8] <= ppl[WINDOW]


def test_heldout_matches_transformers(model_dir, reference, tmp_path):
    src = tmp_path / "corpus.jsonl"
    articles = load_wikitext(split="valid", max_articles=6)
    src.write_text("".join(json.dumps({"text": a}) + "\n" for a in articles.split("\n \n")[:40]))
    data = tmp_path / "data"
    manifest = prepare(
        PrepareConfig(
            input=str(src),
            out=str(data),
            tokenizer=str(model_dir),
            seq_len=WINDOW,
            test_fraction=0.3,
            num_workers=0,
            verbose=False,
        )
    )
    model, tokenizer, _ = load_model(model_dir)
    got = evaluate_heldout(model, tokenizer, data, batch_size=7)

    split = manifest.splits["test"]
    stream = np.concatenate(
        [np.fromfile(data / sh.path, dtype=manifest.dtype) for sh in split.shards]
    )
    hf, _ = reference
    total, count = 0.0, 0
    for i in range(split.num_samples):
        w = stream[i * WINDOW : i * WINDOW + WINDOW + 1].astype(np.int64).tolist()
        logp = _log_probs(hf, w[:-1])
        total -= sum(logp[p, w[p + 1]].item() for p in range(WINDOW))
        count += WINDOW
    assert split.num_samples > 7 and got["num_tokens"] == count
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=RTOL)


def test_tokenizer_outside_model_vocabulary_is_refused(model_dir):
    _, tokenizer, _ = load_model(model_dir)
    small = GPT(GPTConfig(vocab_size=64, n_positions=WINDOW, n_embd=16, n_layer=1, n_head=1))
    with pytest.raises(EvalError, match="outside the model's vocabulary of 64"):
        evaluate_lambada(small, tokenizer, load_lambada()[:2])
    with pytest.raises(EvalError, match="outside the model's vocabulary"):
        evaluate_wikitext(small, tokenizer, load_wikitext(max_articles=1)[:500])


def test_tokenizer_that_cannot_encode_the_text_is_refused(model_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<|endoftext|>": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    unk_only = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<|endoftext|>"
    )
    model, _, _ = load_model(model_dir)
    with pytest.raises(EvalError, match="cannot encode"):
        evaluate_lambada(model, unk_only, load_lambada()[:2])
