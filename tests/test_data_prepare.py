"""Data preparation: round trip, splits, resume after SIGKILL, bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
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


# --------------------------------------------------------------------------- owned files, inputs
def test_foreign_files_in_out_are_refused_by_name_and_never_deleted(corpus, tmp_path):
    src, _ = corpus
    out = tmp_path / "d"
    (out / "train").mkdir(parents=True)
    notes = out / "train" / "notes.txt"
    notes.write_text("my notes")
    (out / "results.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"did not write: results.csv, train/notes.txt"):
        _prepare(src, out)
    assert notes.read_text() == "my notes" and (out / "results.csv").exists()


def test_an_interrupted_preparation_resumes_only_without_foreign_files_and_input_changes(
    corpus, tmp_path
):
    src, _ = corpus
    changed = tmp_path / "wiki.txt"
    changed.write_bytes(src.read_bytes())
    out = tmp_path / "killed"
    args = ["--input", str(changed), "--out", str(out), "--train-tokenizer", "400",
            "--seq-len", "32", "--shard-tokens", "1500", "--num-workers", "0"]  # fmt: skip
    assert _run_cli(args, env={KILL_AFTER_SHARDS_ENV: "2"}).returncode == -9
    mine = out / "train" / "shard_00099.bin"  # looks like a shard, was not written by it
    mine.write_bytes(b"mine")
    with pytest.raises(DataError, match=r"did not write: train/shard_00099.bin"):
        _prepare(changed, out)
    assert mine.read_bytes() == b"mine"
    mine.unlink()

    with changed.open("a") as f:
        f.write("\nA new document appended after the kill.\n")
    with pytest.raises(
        DataError,
        match=rf"the input changed since this preparation was interrupted \({changed.resolve()} size",
    ):
        _prepare(changed, out)
    assert not (out / "manifest.json").exists()


def test_nothing_to_do_only_when_the_input_is_unchanged(corpus, tmp_path):
    src, _ = corpus
    mine = tmp_path / "wiki.txt"
    mine.write_bytes(src.read_bytes())
    _prepare(mine, tmp_path / "d")
    _prepare(mine, tmp_path / "d")  # unchanged: nothing to do
    with mine.open("a") as f:
        f.write("\nOne more document.\n")
    with pytest.raises(DataError, match=r"prepared from another version of the input"):
        _prepare(mine, tmp_path / "d")


def test_old_shards_are_not_reused_when_the_manifest_was_removed(corpus, tmp_path):
    src, _ = corpus
    _prepare(src, tmp_path / "d")
    (tmp_path / "d" / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"did not write: test/shard_00000.bin"):
        _prepare(src, tmp_path / "d")


# --------------------------------------------------------------------------- clear errors
def test_a_seq_len_that_leaves_the_test_split_empty_is_an_error(corpus, tmp_path):
    src, _ = corpus
    with pytest.raises(DataError, match=r"test split has \d+ tokens .*fewer than one sample"):
        _prepare(src, tmp_path / "d", test_fraction=0.01, seq_len=2000)


def test_a_tokenizer_smaller_than_asked_is_recorded_with_its_real_size(tmp_path, capsys):
    src = tmp_path / "small.txt"
    src.write_text("tiny corpus\n\nwith few words\n")
    prepare(
        PrepareConfig(
            input=str(src), out=str(tmp_path / "d"), train_tokenizer=5000, seq_len=2,
            test_fraction=0.0, num_workers=0,
        )
    )  # fmt: skip
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    size = len(load_tokenizer(str(tmp_path / "d" / "tokenizer")))
    assert size < 5000 and m["tokenizer"]["vocab_size"] == size
    assert m["tokenizer"]["name"] == f"bpe-{size}"
    assert f"the corpus yields only {size} tokens" in capsys.readouterr().err


def test_a_manifest_seq_len_that_disagrees_with_the_shards_is_named(corpus, tmp_path):
    src, _ = corpus
    _prepare(src, tmp_path / "d")
    path = tmp_path / "d" / "manifest.json"
    m = json.loads(path.read_text())
    m["seq_len"] = 64
    path.write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"seq_len 64 disagrees with the seq_len 32"):
        open_split(tmp_path / "d", "train")


def test_token_ids_beyond_the_vocabulary_are_named_with_shard_and_offset(corpus, tmp_path):
    src, _ = corpus
    _prepare(src, tmp_path / "d", test_fraction=0.0)
    shard = tmp_path / "d" / "train" / "shard_00000.bin"
    tokens = np.fromfile(shard, dtype=np.uint16)
    tokens[5] = 4000  # vocabulary is 400
    tokens.tofile(shard)
    ds = open_split(tmp_path / "d", "train", verify_checksums="never")
    with pytest.raises(DataError, match=rf"{shard}: token id 4000 at offset 5 is outside"):
        ds.sample(0)


def test_an_out_under_a_file_is_one_line_naming_the_path(corpus, tmp_path):
    src, _ = corpus
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = _run_cli(["--input", str(src), "--out", str(blocker / "d"), "--train-tokenizer", "300"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (
        f"prepare_data: error: {blocker / 'd'}: Not a directory "
        "(ENOTDIR: a part of the path is a file, not a directory)"
    )


def test_a_split_directory_linked_to_a_users_folder_is_refused_and_left_untouched(corpus, tmp_path):
    src, _ = corpus
    user = tmp_path / "user_folder"
    user.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "train").symlink_to(user)
    with pytest.raises(DataError, match=rf"{out / 'train'} -> {user}.*never through links"):
        _prepare(src, out)
    assert list(user.iterdir()) == []


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--seed", str(2**64), r"--seed must be in \[0, 2\*\*64\), got 18446744073709551616"),
        ("--train-tokenizer", str(10**9), r"--train-tokenizer must be in \[257, 1048576\]"),
        ("--train-tokenizer", "100", r"--train-tokenizer must be in \[257, 1048576\]"),
    ],
)
def test_out_of_range_options_are_refused_naming_the_option(
    corpus, tmp_path, capsys, option, value, message
):
    from ted_scale.cli.prepare_data import main

    src, _ = corpus
    argv = ["--input", str(src), "--out", str(tmp_path / "out"), "--quiet", option, value]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("prepare_data: error: ") and re.search(message, err)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_a_full_disk_names_the_shard_being_written(corpus, tmp_path, monkeypatch, capsys):
    from ted_scale.cli.prepare_data import main

    def full(fd):
        raise OSError(28, os.strerror(28))

    src, _ = corpus
    monkeypatch.setattr(os, "fsync", full)
    argv = ["--input", str(src), "--out", str(tmp_path / "out"), "--quiet", "--num-workers", "0"]
    assert main([*argv, "--train-tokenizer", "400", "--seq-len", "32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prepare_data: error: {tmp_path / 'out'}/")
    assert "No space left on device (ENOSPC: the disk is full)" in err
