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
from ted_scale.eval.model_loading import resolve_model
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
    assert "- WikiText ppl: word perplexity; protocol lm-eval; source wikitext-2-v1 (bundled)." in (
        lines
    )
    assert "- WikiText ppl: word perplexity; protocol not recorded; source not recorded." in lines
    assert "LAMBADA acc (%) (zero-shot)" in lines[0] and "WikiText ppl (transfer)" in lines[0]
    # The transfer columns no model has are left out, and the table says so.
    assert "held-out ppl (transfer)" not in lines[0] and "LAMBADA ppl (transfer)" not in lines[0]
    assert any(line.startswith("- Left out: held-out ppl (transfer)") for line in lines)
    assert lines[2] == "| teacher | 34.10 | 36.10 | 35.10 | 32.50 | – |"
    assert lines[5] == "| TED | 44.50 | 46.50 | 45.50 | 25.00 | 21.25 |"


def test_report_refuses_malformed_results(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert _main("report.py")(["--results", f"KD={bad}", "--out", str(tmp_path / "t.md")]) == 2
    assert str(bad) in capsys.readouterr().err


HELDOUT_TOKENS = 73472


def _demo_results(tmp_path, heldout: dict[str, float], tokens: int = HELDOUT_TOKENS) -> list[str]:
    """The demo's results files: held-out for every model, LAMBADA (all wrong) for the teacher."""
    named = []
    for name, ppl in heldout.items():
        result = {"heldout": {"perplexity": ppl, "num_tokens": tokens}}
        if name == "teacher":
            result["lambada"] = {"accuracy": 0.0, "perplexity": 3e7, "num_examples": 500}
        path = tmp_path / f"{name.replace(' ', '_')}.json"
        path.write_text(json.dumps(result))
        named.append(f"{name}={path}")
    return named


def _study_results(tmp_path) -> Path:
    """A results.json written by the study's own report, from three seeds of fake finished runs."""
    from ted_scale.io import atomic_write_json
    from ted_scale.study.config import StudyConfig
    from ted_scale.study.plan import DONE_FILE, StudyPaths
    from ted_scale.study.results import write_report

    study = StudyConfig(output_dir=str(tmp_path / "study"), methods=["kd", "ted"])
    paths = StudyPaths(tmp_path / "study")

    def done(run: Path, ppl: float) -> None:
        run.mkdir(parents=True, exist_ok=True)
        heldout = {"perplexity": ppl, "num_tokens": HELDOUT_TOKENS}
        atomic_write_json(run / DONE_FILE, {"eval": {"heldout": heldout}, "flops": {"stage2": 1.0}})

    done(paths.teacher, 50.0)
    line = {"step": 10, "stage": "lm", "loss": 4.0, "eval_heldout_ppl": 50.0}
    (paths.teacher / "metrics.jsonl").write_text(json.dumps(line) + "\n")
    for seed in (1, 2, 3):
        for row, ppl in (("alone", 70.0), ("kd", 60.0), ("ted", 58.0)):
            if (row, seed) != ("ted", 3):  # one run not finished: its row says so
                done(paths.run_dir(row, seed), ppl + seed)
    outcome = {"missing": {}, "failures": {}, "lambada": "left out", "lambada_included": False}
    write_report(study, outcome, 1.0)
    return paths.root / "results.json"


def _table(path: Path) -> tuple[list[list[str]], list[str]]:
    """(cells of the header and each row, the lines under the table)."""
    lines = path.read_text().splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line[:1] == "|"]
    return [rows[0], *rows[2:]], [line for line in lines if line.startswith("- ")]


def test_report_puts_the_study_beside_the_demo_and_drops_what_no_model_has(tmp_path):
    named = _demo_results(
        tmp_path, {"teacher": 52.0, "student alone": 75.0, "KD": 63.0, "TED": 61.0}
    )
    out = tmp_path / "table.md"
    args = ["--results", *named, "--study", str(_study_results(tmp_path))]
    args += ["--study-rows", "student alone=alone", "--note", "Demo: one seed.", "--out", str(out)]
    assert _main("report.py")(args) == 0
    (header, *rows), below = _table(out)
    assert header == ["Model", "held-out ppl", "held-out ppl: study"]
    assert rows == [
        ["teacher", "52.00", "50.00"],
        ["student alone", "75.00", "72.00 ± 1.00"],
        ["KD", "63.00", "62.00 ± 1.00"],
        ["TED", "61.00", "59.50 ± 0.71 (2 of 3 seeds)"],
    ]
    for column in zip(*rows, strict=True):  # no column of nothing or of zeros
        assert set(column) - {"–", "0.00"}
    assert below[0].startswith("- held-out ppl: token perplexity on the held-out split")
    assert "- Teacher better than every other row on held-out ppl: yes." in below
    assert any(line.startswith("- held-out ppl: study:") for line in below)
    assert any(
        "LAMBADA left out: no model scored on it (teacher) predicts any answer of its 500" in line
        for line in below
    )
    assert any(line.startswith("- Left out: WikiText ppl") for line in below)
    assert f"- Scored like the study: heldout (num_tokens {HELDOUT_TOKENS})." in below
    assert "seeds [1, 2, 3]" in "\n".join(below) and below[-1] == "- Demo: one seed."


def test_report_says_when_study_results_are_absent_or_scored_other_text(tmp_path):
    named = _demo_results(tmp_path, {"teacher": 52.0, "KD": 63.0})
    out = tmp_path / "table.md"
    missing = tmp_path / "docs" / "study" / "results.json"
    assert (
        _main("report.py")(["--results", *named, "--study", str(missing), "--out", str(out)]) == 0
    )
    (header, *rows), below = _table(out)
    assert header == ["Model", "held-out ppl"] and rows == [["teacher", "52.00"], ["KD", "63.00"]]
    assert f"- Study results not present (run `make study`): no `{missing}`." in below
    beaten = _demo_results(tmp_path, {"teacher": 52.0, "KD": 51.5})
    assert _main("report.py")(["--results", *beaten, "--out", str(out)]) == 0
    assert any(
        line.startswith("- Teacher better than every other row on held-out ppl: NO, KD")
        for line in _table(out)[1]
    )

    other = _demo_results(tmp_path, {"teacher": 52.0, "KD": 63.0}, tokens=1000)
    study = str(_study_results(tmp_path))
    assert _main("report.py")(["--results", *other, "--study", study, "--out", str(out)]) == 0
    (header, *_), below = _table(out)
    assert header == ["Model", "held-out ppl", "held-out ppl: study"]
    assert any(line.startswith("- NOT scored like the study") and "1000" in line for line in below)


def test_report_refuses_a_file_that_is_not_study_results(tmp_path, capsys):
    named = _demo_results(tmp_path, {"teacher": 52.0})
    bad = tmp_path / "results.json"
    bad.write_text(json.dumps({"heldout": {}}))
    args = ["--results", *named, "--study", str(bad), "--out", str(tmp_path / "t.md")]
    assert _main("report.py")(args) == 2
    assert f"{bad}: not a study results file" in capsys.readouterr().err


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


@pytest.mark.parametrize("value", ["-1", "0"])
def test_a_count_below_one_is_refused_naming_the_option(run_dir, tmp_path, capsys, value):
    argv = ["--model", str(run_dir), "--tasks", "lambada", "--out", str(tmp_path / "r.json")]
    with pytest.raises(SystemExit) as info:
        _main("evaluate.py")([*argv, "--max-examples", value])
    assert info.value.code == 2
    assert f"error: --max-examples must be >= 1, got {value}" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_a_full_disk_names_the_results_file(run_dir, tmp_path, capsys, monkeypatch):
    import errno
    import os

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "r.json"
    argv = ["--model", str(run_dir), "--tasks", "lambada", "--max-examples", "2", "--out", str(out)]
    assert _main("evaluate.py")(argv) == 2
    assert f"evaluate: error: {out}: No space left on device (ENOSPC" in capsys.readouterr().err
