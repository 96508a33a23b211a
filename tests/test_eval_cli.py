"""The evaluate / report / plot_metrics commands, end to end on tiny inputs, and bad input."""

from __future__ import annotations

import gzip
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ted_scale.data.tokenizer import train_bpe_tokenizer
from ted_scale.eval import EvalError
from ted_scale.eval.lambada import load_lambada
from ted_scale.eval.models import resolve_model
from ted_scale.eval.plots import read_metrics
from ted_scale.eval.wikitext import detokenize, load_wikitext
from ted_scale.model import GPT, GPTConfig, export_hf

ROOT = Path(__file__).resolve().parent.parent


def _main(script: str):
    return runpy.run_path(str(ROOT / "launch" / script), run_name="launch")["main"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory (config.yaml + student_hf/) holding a tiny random GPT and BPE tokenizer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls; OpenMP waits stall on a busy 2-core machine
    tok = train_bpe_tokenizer(load_wikitext(split="valid", max_articles=2).splitlines(), 300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=1, n_head=2))
    run = tmp_path_factory.mktemp("run")
    (run / "config.yaml").write_text("output_dir: run\n")
    export_hf(model, run / "student_hf", tok)
    yield run
    torch.set_num_threads(threads)


def test_evaluate_writes_contract_keys(run_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = [
        "--model",
        str(run_dir),
        "--tasks",
        "lambada,wikitext",
        "--out",
        str(out),
        "--max-examples",
        "3",
        "--batch-size",
        "2",
        "--wikitext-protocol",
        "stream",
        "--stride",
        "8",
        "--wikitext-source",
        "bundled",
        "--device",
        "cpu",
    ]
    assert _main("evaluate.py")(argv) == 0
    results = json.loads(out.read_text())
    assert set(results["lambada"]) >= {"accuracy", "perplexity", "num_examples"}
    assert set(results["wikitext"]) >= {
        "protocol",
        "source",
        "token_perplexity",
        "word_perplexity",
        "byte_perplexity",
        "bits_per_byte",
        "num_tokens",
        "num_words",
        "num_bytes",
    }
    assert results["wikitext"]["protocol"] == "stream"
    assert results["wikitext"]["source"].startswith("wikitext-2-v1 (bundled")
    assert results["lambada"]["num_examples"] == 3
    assert results["wikitext"]["stride"] == 8 and results["wikitext"]["detokenized"] is True
    assert results["model"] == str(run_dir / "student_hf")
    assert "lambada   accuracy" in capsys.readouterr().out


def test_evaluate_reports_bad_model_cleanly(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch/evaluate.py"),
            "--model",
            str(tmp_path / "nope"),
            "--tasks",
            "lambada",
            "--out",
            str(tmp_path / "r.json"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "no such directory" in proc.stderr and "Traceback" not in proc.stderr


def test_heldout_without_data_dir_is_refused(run_dir, tmp_path, capsys):
    argv = ["--model", str(run_dir), "--tasks", "heldout", "--out", str(tmp_path / "r.json")]
    assert _main("evaluate.py")(argv) == 2
    assert "needs --data" in capsys.readouterr().err


def test_stride_without_stream_protocol_is_refused(run_dir, tmp_path, capsys):
    argv = ["--model", str(run_dir), "--tasks", "wikitext", "--stride", "8"]
    assert _main("evaluate.py")([*argv, "--out", str(tmp_path / "r.json")]) == 2
    assert "--stride applies to --wikitext-protocol stream only" in capsys.readouterr().err


def test_run_directory_without_student_is_refused(tmp_path):
    (tmp_path / "config.yaml").write_text("output_dir: x\n")
    with pytest.raises(EvalError, match="has no student_hf"):
        resolve_model(tmp_path)


def test_malformed_lambada_file_names_file_and_line(tmp_path):
    path = tmp_path / "lambada.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write('{"text": "one two three"}\n{"text": oops}\n')
    with pytest.raises(EvalError, match=rf"{path}:2: expected a JSON object"):
        load_lambada(path)
    with pytest.raises(EvalError, match="no such file"):
        load_lambada(tmp_path / "missing.jsonl")


def test_bundled_data_is_complete():
    assert len(load_lambada()) == 5153
    # WikiText-2 test: 245,569 tokens in the paper's count = 241,211 words + one <eos> per line
    assert len(load_wikitext().split()) == 241211
    assert load_wikitext(split="valid").startswith(" \n = Homarus gammarus = \n")


def test_detokenizer_undoes_wikitext_escapes():
    raw = ' = = Career = = \n In 2000 , the 1 @,@ 000 @-@ seat hall ( built 1 @.@ 5 years ago ) was " great " . Teddy \'s \n'
    assert detokenize(raw) == (
        ' == Career ==\nIn 2000, the 1,000-seat hall (built 1.5 years ago) was "great". Teddy\'s\n'
    )


def _results(accuracy: float, ppl: float) -> dict:
    return {
        "lambada": {"accuracy": accuracy, "perplexity": ppl, "num_examples": 5153},
        "wikitext": {
            "protocol": "lm-eval",
            "source": "wikitext-2-v1 (bundled)",
            "token_perplexity": 30.0,
            "word_perplexity": ppl + 1,
            "num_tokens": 1,
            "num_words": 1,
        },
        "heldout": {"perplexity": ppl - 1, "num_tokens": 1},
    }


def test_report_turns_four_results_into_table(tmp_path, capsys):
    files = []
    for name, acc, ppl in (
        ("teacher", 0.325, 35.1),
        ("KD", 0.2, 50.0),
        ("LWD", 0.21, 49.0),
        ("TED", 0.25, 45.5),
    ):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(_results(acc, ppl)))
        files.append(f"{name}={path}")
    transfer = tmp_path / "ted_ft.json"
    transfer.write_text(json.dumps({"wikitext": {"word_perplexity": 21.25}}))
    out = tmp_path / "table.md"
    assert (
        _main("report.py")(
            ["--results", *files, "--transfer", f"TED={transfer}", "--out", str(out)]
        )
        == 0
    )
    lines = out.read_text().splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:6]] == ["teacher", "KD", "LWD", "TED"]
    assert lines[7] == (
        "WikiText ppl: word perplexity; protocol lm-eval; source wikitext-2-v1 (bundled)."
    )
    assert lines[9] == "WikiText ppl: word perplexity; protocol not recorded; source not recorded."
    assert "LAMBADA acc (%) (zero-shot)" in lines[0] and "WikiText ppl (transfer)" in lines[0]
    assert lines[2] == "| teacher | 34.10 | 36.10 | 35.10 | 32.50 | – | – | – | – |"
    assert lines[5] == "| TED | 44.50 | 46.50 | 45.50 | 25.00 | – | 21.25 | – | – |"


def test_report_refuses_malformed_results(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert _main("report.py")(["--results", f"KD={bad}", "--out", str(tmp_path / "t.md")]) == 2
    assert str(bad) in capsys.readouterr().err


def test_plot_metrics_writes_pngs(tmp_path):
    runs = []
    for name, scale in (("LWD", 1.0), ("TED", 0.8)):
        run = tmp_path / name
        run.mkdir()
        lines = [
            {
                "step": s,
                "stage": "stage2",
                "loss": scale * (5 - s / 10),
                "lr": 1e-4,
                "tokens_per_s": 1e3,
                **{f"loss_layer_{k}": scale / (1 + s + k) for k in range(6)},
            }
            for s in range(0, 20, 2)
        ]
        (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        runs.append(f"{name}={run}")
    out = tmp_path / "fig"
    assert _main("plot_metrics.py")(["--runs", *runs, "--out", str(out)]) == 0
    for png in ("loss.png", "layer_loss.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_malformed_metrics_line_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": \n')
    with pytest.raises(EvalError, match=rf"{path}:2: not a JSON object"):
        read_metrics(path)
