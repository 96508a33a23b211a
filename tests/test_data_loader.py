"""Memory-mapped samples and the distributed, resumable batch loader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ted_scale.data import DataError
from ted_scale.data.loader import DistributedBatchLoader, open_split
from ted_scale.data.prepare import PrepareConfig, prepare
from ted_scale.eval.datafiles import asset_text

WIKITEXT = "wikitext-2-test.txt.gz"
SEQ = 16


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loader")
    src = root / "wiki.txt"
    src.write_text(asset_text(WIKITEXT, 20_000), encoding="utf-8")
    cfg = PrepareConfig(input=str(src), out=str(root / "data"), train_tokenizer=350, seq_len=SEQ,
                        shard_tokens=700, test_fraction=0.1, num_workers=0, verbose=False)  # fmt: skip
    prepare(cfg)
    return root / "data"


@pytest.fixture
def copy_dir(data_dir, tmp_path) -> Path:
    """A private copy of the prepared data, without the checksum stamps of earlier opens."""
    return Path(
        shutil.copytree(data_dir, tmp_path / "data", ignore=shutil.ignore_patterns(".verified-*"))
    )


def _stream(d: Path, split: str = "train") -> np.ndarray:
    m = json.loads((d / "manifest.json").read_text())
    return np.concatenate(
        [np.fromfile(d / sh["path"], np.uint16) for sh in m["splits"][split]["shards"]]
    )


def test_samples_are_stream_windows_including_across_shard_boundaries(data_dir):
    ds = open_split(data_dir, "train")
    stream = _stream(data_dir)
    assert len(ds) == (len(stream) - 1) // SEQ
    crossing = 0
    for i in range(len(ds)):
        np.testing.assert_array_equal(ds.sample(i), stream[i * SEQ : i * SEQ + SEQ + 1])
        crossing += (i * SEQ) // 700 != (i * SEQ + SEQ) // 700
    assert crossing > 0


def test_batches_are_shifted_windows_of_this_ranks_indices(data_dir):
    ds = open_split(data_dir, "train")
    loader = DistributedBatchLoader(ds, 3, rank=1, world_size=2, seed=5)
    ids = loader.epoch_indices(0)
    batches = list(loader)
    assert len(batches) == len(ids) == loader.batches_per_epoch and loader.epoch == 1
    for (x, y), row in zip(batches, ids, strict=True):
        assert x.shape == y.shape == (3, SEQ) and x.dtype == y.dtype == torch.int64
        w = torch.from_numpy(np.stack([ds.sample(int(i)) for i in row]))
        assert torch.equal(x, w[:, :-1]) and torch.equal(y, w[:, 1:])


def test_two_ranks_see_disjoint_samples_that_cover_the_epoch(data_dir):
    ds = open_split(data_dir, "train")
    B, W = 4, 2
    ranks = [DistributedBatchLoader(ds, B, rank=r, world_size=W, seed=1) for r in range(W)]
    tails = []
    for epoch in range(2):
        seen = [r.epoch_indices(epoch).ravel() for r in ranks]
        assert len(seen[0]) == len(seen[1])
        assert not set(seen[0]) & set(seen[1])
        served = set(np.concatenate(seen))
        assert len(served) == len(ds) // (B * W) * B * W
        tails.append(set(range(len(ds))) - served)
    assert tails[0] != tails[1] and len(tails[0]) == len(ds) % (B * W)


def test_eval_mode_serves_every_sample_once_and_pads_the_tail(data_dir):
    ds = open_split(data_dir, "test")
    B, W = 3, 2
    assert len(ds) % (B * W) != 0
    ranks = [DistributedBatchLoader(ds, B, rank=r, world_size=W, drop_last=False) for r in range(W)]
    ids = [r.epoch_indices(0) for r in ranks]
    assert ids[0].shape == ids[1].shape
    flat = np.concatenate([i.ravel() for i in ids])
    assert sorted(flat[flat >= 0]) == list(range(len(ds)))
    pad_rows = 0
    for r, rank_ids in zip(ranks, ids, strict=True):
        for (_, y), row in zip(r, rank_ids, strict=True):
            pad = torch.from_numpy(row < 0)
            assert (y[pad] == -100).all() and (y[~pad] != -100).all()
            pad_rows += int(pad.sum())
    assert pad_rows == len(flat) - len(ds) > 0


def _take(loader: DistributedBatchLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    while len(out) < n:
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
    return out


def test_resume_from_state_gives_the_same_batches(data_dir):
    ds = open_split(data_dir, "train")
    a = DistributedBatchLoader(ds, 4, seed=3)
    n = a.batches_per_epoch
    _take(a, n - 2)
    state = a.state_dict()
    expected = _take(a, 5)  # crosses into the next epoch
    b = DistributedBatchLoader(ds, 4, seed=0)
    b.load_state_dict(state)
    got = _take(b, 5)
    assert b.epoch == a.epoch == 1
    for (x1, y1), (x2, y2) in zip(expected, got, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_resume_with_another_world_size_continues_at_the_global_offset(data_dir):
    ds = open_split(data_dir, "train")
    two = [DistributedBatchLoader(ds, 2, rank=r, world_size=2, seed=9) for r in range(2)]
    for r in two:
        _take(r, 3)
    seen = set(np.concatenate([r.epoch_indices(0)[:3].ravel() for r in two]))
    one = DistributedBatchLoader(ds, 2, seed=0)
    one.load_state_dict(two[0].state_dict())
    rest = one.epoch_indices(one.epoch, one.samples_consumed).ravel()
    assert not seen & set(rest)
    assert len(seen) + len(rest) == len(ds) // 2 * 2


def test_open_split_rejects_data_that_does_not_fit_the_model(data_dir):
    with pytest.raises(DataError, match="vocab size 350 != model's 50257"):
        open_split(data_dir, expected_vocab_size=50257)
    with pytest.raises(DataError, match="not the model's"):
        open_split(data_dir, expected_tokenizer_sha256="0" * 64)
    with pytest.raises(DataError, match="exceeds the model's context 8"):
        open_split(data_dir, max_positions=8)


def test_missing_or_truncated_shard_is_named(copy_dir):
    shard = copy_dir / "train" / "shard_00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"shard_00001\.bin: shard truncated"):
        open_split(copy_dir)
    shard.unlink()
    with pytest.raises(DataError, match=r"shard_00001\.bin: shard missing"):
        open_split(copy_dir)


def test_checksums_are_verified_on_first_open_and_on_request(copy_dir):
    shard = copy_dir / "train" / "shard_00002.bin"
    good = shard.read_bytes()
    shard.write_bytes(bytes([good[0] ^ 1]) + good[1:])
    with pytest.raises(DataError, match=r"shard_00002\.bin: sha256 mismatch"):
        open_split(copy_dir)  # first open: no stamp yet
    shard.write_bytes(good)
    open_split(copy_dir)  # verifies and stamps
    shard.write_bytes(bytes([good[0] ^ 1]) + good[1:])
    open_split(copy_dir)  # stamped: not re-hashed
    with pytest.raises(DataError, match="sha256 mismatch"):
        open_split(copy_dir, verify_checksums="always")


def test_other_format_version_is_refused(copy_dir):
    m = json.loads((copy_dir / "manifest.json").read_text())
    m["format_version"] = 99
    (copy_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="format_version 99 is not supported"):
        open_split(copy_dir)
