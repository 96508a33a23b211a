"""Data preparation: round trip, splits, resume after SIGKILL, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ted_scale.data import DataError
from ted_scale.data.loader import open_split
from ted_scale.data.manifest import token_dtype
from ted_scale.data.prepare import KILL_AFTER_SHARDS_ENV, PrepareConfig, prepare
from ted_scale.data.tokenizer import load_tokenizer
from ted_scale.eval.datafiles import asset_text

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = "wikitext-2-valid.txt.gz"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    """A 40 kB WikiText slice and its documents (blank-line separated blocks), parsed here."""
    path = tmp_path_factory.mktemp("corpus") / "wiki.txt"
    text = asset_text(WIKITEXT, 40_000)
    text = text[: text.rfind("\n") + 1]
    path.write_text(text, encoding="utf-8")
    docs, block = [], []
    for line in text.split("\n"):
        if line.strip():
            block.append(line)
        elif block:
            docs.append("\n".join(block))
            block = []
    assert not block
    return path, docs


def _prepare(src: Path, out: Path, **kw) -> dict:
    kw = {"train_tokenizer": 400, "seq_len": 32, "shard_tokens": 1500, "num_workers": 0} | kw
    prepare(PrepareConfig(input=str(src), out=str(out), verbose=False, **kw))
    return json.loads((out / "manifest.json").read_text())


def _split_documents(out: Path, split: str) -> list[str]:
    """Decode a split's stream into documents using the recorded starts; each must end in EOS."""
    ds = open_split(out, split, verify_checksums="always")
    stream = ds.tokens(0, int(ds.offsets[-1]))
    starts = ds.document_starts()
    tok = load_tokenizer(str(out / "tokenizer"))
    eos = tok.eos_token_id
    docs = []
    for a, b in zip(starts, [*starts[1:], len(stream)], strict=True):
        piece = stream[a:b]
        assert piece[-1] == eos and eos not in piece[:-1]
        docs.append(tok.decode(piece[:-1].tolist()))
    return docs


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_shards_decode_back_to_documents_in_order_with_one_eos_after_each(corpus, tmp_path):
    src, docs = corpus
    m = _prepare(src, tmp_path / "d", test_fraction=0.0)
    assert m["format_version"] == 1 and m["seq_len"] == 32 and m["dtype"] == "uint16"
    assert set(m["tokenizer"]) >= {"name", "vocab_size", "eos_id", "sha256"}
    train = m["splits"]["train"]
    assert len(train["shards"]) > 2  # documents cross shard boundaries
    assert train["num_documents"] == len(docs)
    assert train["num_samples"] == (train["num_tokens"] - 1) // 32
    assert m["splits"]["test"] == {
        "num_documents": 0,
        "num_tokens": 0,
        "num_samples": 0,
        "shards": [],
    }
    assert _split_documents(tmp_path / "d", "train") == docs


def test_train_and_test_splits_are_disjoint_and_cover_every_nonempty_document(corpus, tmp_path):
    src, docs = corpus
    m = _prepare(src, tmp_path / "d", test_fraction=0.3, seed=7)
    train, test = (
        _split_documents(tmp_path / "d", "train"),
        _split_documents(tmp_path / "d", "test"),
    )
    assert train and test
    assert not set(train) & set(test)
    assert sorted(train + test) == sorted(docs)
    assert [m["splits"][s]["num_documents"] for s in ("train", "test")] == [len(train), len(test)]


def test_worker_processes_give_the_same_bytes_as_in_process(corpus, tmp_path):
    src, _ = corpus
    _prepare(src, tmp_path / "a", num_workers=0)
    _prepare(src, tmp_path / "b", num_workers=2)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")


def _run_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / "prepare_data.py"), *args, "--quiet"],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120,
    )  # fmt: skip


def test_killed_preparation_resumes_to_identical_bytes(corpus, tmp_path):
    src, _ = corpus
    ref = tmp_path / "ref"
    _prepare(src, ref, test_fraction=0.2)
    out = tmp_path / "killed"
    args = ["--input", str(src), "--out", str(out), "--train-tokenizer", "400", "--seq-len", "32",
            "--shard-tokens", "1500", "--test-fraction", "0.2", "--num-workers", "0"]  # fmt: skip
    killed = _run_cli(args, env={KILL_AFTER_SHARDS_ENV: "2"})
    assert killed.returncode == -9
    assert not (out / "manifest.json").exists()
    finished = sorted(p.name for p in out.rglob("shard_*.bin") if ".docs" not in p.name)
    assert len(finished) == 2
    first = out / "train" / "shard_00000.bin"
    inode = first.stat().st_ino

    resumed = _run_cli(args)
    assert resumed.returncode == 0, resumed.stderr
    assert first.stat().st_ino == inode  # kept, not rewritten
    assert _tree(out) == _tree(ref)


def test_rerun_with_other_settings_is_refused(corpus, tmp_path):
    src, _ = corpus
    _prepare(src, tmp_path / "d")
    with pytest.raises(DataError, match="seq_len: 32 -> 64"):
        _prepare(src, tmp_path / "d", seq_len=64)


def test_empty_documents_are_skipped_and_counted(tmp_path):
    src = tmp_path / "lines.txt"
    src.write_text("first document\n\n   \nsecond document\nthird one\n\n", encoding="utf-8")
    m = _prepare(src, tmp_path / "d", one_doc_per_line=True, test_fraction=0.0, seq_len=2)
    assert m["stats"]["empty_skipped"] == 3
    assert m["splits"]["train"]["num_documents"] == 3
    assert _split_documents(tmp_path / "d", "train") == [
        "first document",
        "second document",
        "third one",
    ]


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    src = tmp_path / "bad.txt"
    src.write_bytes(b"caf\xc3\xa9 ok\n\nbroken \xff\xfe bytes\n\nfine again\n")
    m = _prepare(src, tmp_path / "d", test_fraction=0.0, seq_len=2)
    assert m["stats"]["invalid_utf8_replaced"] == 1
    assert _split_documents(tmp_path / "d", "train") == [
        "café ok",
        "broken \ufffd\ufffd bytes",
        "fine again",
    ]


BAD_LINES = [
    ("{not json", "not JSON"),
    ('{"body": "no text field"}', "no field 'text'"),
    ('{"text": 42}', "field 'text' is int"),
    ('["a list"]', "not a JSON object"),
]


@pytest.mark.parametrize(("line", "reason"), BAD_LINES)
def test_bad_jsonl_line_stops_with_file_line_and_reason(tmp_path, line, reason):
    src = tmp_path / "c.jsonl"
    src.write_text(f'{{"text": "good one"}}\n{{"text": "good two"}}\n{line}\n', encoding="utf-8")
    with pytest.raises(DataError, match=f"c.jsonl:3: {reason}"):
        _prepare(src, tmp_path / "d", seq_len=2)


def test_skip_bad_counts_every_bad_line(tmp_path):
    src = tmp_path / "c.jsonl"
    good = [json.dumps({"text": f"document number {i}"}) for i in range(3)]
    src.write_text("\n".join([good[0], *(b for b, _ in BAD_LINES), *good[1:]]) + "\n")
    m = _prepare(src, tmp_path / "d", seq_len=2, skip_bad=True, test_fraction=0.0)
    assert m["stats"]["bad_records_skipped"] == len(BAD_LINES)
    assert m["splits"]["train"]["num_documents"] == 3


def test_source_without_documents_is_an_error(tmp_path):
    src = tmp_path / "empty.jsonl"
    src.write_text('{"text": ""}\n{"text": "  "}\n')
    with pytest.raises(DataError, match=r"no documents in .*2 empty documents"):
        _prepare(src, tmp_path / "d")


def test_launch_script_prints_data_errors_without_traceback(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "ok"}\nnot json\n')
    r = _run_cli(["--input", str(src), "--out", str(tmp_path / "d"), "--train-tokenizer", "300"])
    assert r.returncode == 2
    assert "prepare_data: error:" in r.stderr and "c.jsonl:2: not JSON" in r.stderr
    assert "Traceback" not in r.stderr


def test_directory_source_reads_txt_jsonl_and_parquet_in_path_order(tmp_path):
    src = tmp_path / "src"
    (src / "b").mkdir(parents=True)
    (src / "a.txt").write_text("alpha one\n\nalpha two\n")
    (src / "b" / "c.jsonl").write_text('{"text": "gamma"}\n')
    pq.write_table(pa.table({"text": ["beta one", "beta two"]}), src / "b" / "b.parquet")
    (src / "notes.md").write_text("not a corpus file")
    m = _prepare(src, tmp_path / "d", seq_len=2, test_fraction=0.0)
    assert m["stats"]["files"] == 3 and m["stats"]["files_ignored"] == 1
    assert _split_documents(tmp_path / "d", "train") == [
        "alpha one", "alpha two", "beta one", "beta two", "gamma"
    ]  # fmt: skip


def test_shard_dtype_is_uint16_up_to_65536_tokens_then_uint32():
    assert token_dtype(50257) == "uint16" and token_dtype(65536) == "uint16"
    assert token_dtype(65537) == "uint32"
