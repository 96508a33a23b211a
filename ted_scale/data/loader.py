"""Memory-mapped packed-token samples and a resumable data-parallel micro-batch loader.

Labels are already shifted: for a sample window w of seq_len + 1 tokens, input_ids = w[:-1] and
labels = w[1:], so the model must not shift again. Padding rows (evaluation tail) have
labels == -100 everywhere.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ted_scale.data import DataError
from ted_scale.data.manifest import DTYPES, Manifest, load_manifest, manifest_path
from ted_scale.io import atomic_write_text, file_sha256

IGNORE_INDEX = -100


class PackedTokens:
    """One split of a prepared data directory; shards are memory-mapped, never read whole.

    Sample i is the window tokens[i * seq_len : i * seq_len + seq_len + 1] of the split's token
    stream; windows may cross shard boundaries. ``subset`` gives a view of a range of samples.
    """

    def __init__(self, data_dir: str | Path, split: str, manifest: Manifest):
        if split not in manifest.splits:
            raise DataError(f"{data_dir}: no split {split!r} (has {sorted(manifest.splits)})")
        self.data_dir = Path(data_dir)
        self.split = split
        self.manifest = manifest
        self.seq_len = manifest.seq_len
        self.eos_id = manifest.tokenizer.eos_id
        self.vocab_size = manifest.tokenizer.vocab_size
        info = manifest.splits[split]
        self.num_samples = info.num_samples
        self.first_sample = 0  # of the split: a subset's sample i is the split's first_sample + i
        dtype = np.dtype(DTYPES[manifest.dtype])
        self.shards: list[np.memmap] = []
        for sh in info.shards:
            path = self.data_dir / sh.path
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise DataError(f"{path}: shard missing") from None
            if size != sh.num_tokens * dtype.itemsize:
                raise DataError(
                    f"{path}: shard truncated or wrong size ({size} bytes, manifest says "
                    f"{sh.num_tokens} tokens of {manifest.dtype})"
                )
            self.shards.append(np.memmap(path, dtype=dtype, mode="r", shape=(sh.num_tokens,)))
        # offsets[k] = position of shard k's first token in the split's stream.
        self.offsets = np.cumsum([0] + [sh.num_tokens for sh in info.shards])

    def __len__(self) -> int:
        return self.num_samples

    def subset(self, samples: slice) -> PackedTokens:
        """A view of the samples ``samples`` (a slice of step 1, negative bounds from the end,
        as on a list), renumbered from 0; ``len`` and ``sample`` see only them. Neighbouring
        windows share one token, so the last sample before the range labels its first token."""
        start, stop, step = samples.indices(self.num_samples)
        if step != 1 or stop <= start:
            raise DataError(
                f"{self.data_dir} [{self.split}]: samples [{samples.start}:{samples.stop}] of "
                f"{self.num_samples} are not a non-empty contiguous range"
            )
        view = copy.copy(self)
        view.first_sample, view.num_samples = self.first_sample + start, stop - start
        return view

    def tokens(self, start: int, length: int) -> np.ndarray:
        """Tokens [length] of the split's stream from global position `start`, as int64."""
        out = np.empty(length, dtype=np.int64)
        k = int(np.searchsorted(self.offsets, start, side="right")) - 1
        done = 0
        while done < length:
            lo = start + done - int(self.offsets[k])
            n = min(length - done, len(self.shards[k]) - lo)
            out[done : done + n] = self.shards[k][lo : lo + n]
            done += n
            k += 1
        return out

    def sample(self, i: int) -> np.ndarray:
        """Window [seq_len + 1] (int64) of sample i: input_ids = w[:-1], labels = w[1:]."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        start = (self.first_sample + i) * self.seq_len
        window = self.tokens(start, self.seq_len + 1)
        if window.max(initial=0) >= self.vocab_size:
            self._bad_token(start + int(np.argmax(window >= self.vocab_size)))
        return window

    def _bad_token(self, position: int) -> None:
        """Raise naming the shard, offset and id of an out-of-vocabulary token."""
        k = int(np.searchsorted(self.offsets, position, side="right")) - 1
        offset = position - int(self.offsets[k])
        path = self.data_dir / self.manifest.splits[self.split].shards[k].path
        raise DataError(
            f"{path}: token id {int(self.shards[k][offset])} at offset {offset} is outside the "
            f"vocabulary of {self.vocab_size} tokens (corrupted shard, or another tokenizer)"
        )

    def document_starts(self) -> np.ndarray:
        """Global stream positions [num_documents] (int64) where documents begin."""
        parts = [
            np.fromfile(self.data_dir / sh.doc_starts, dtype=np.uint32).astype(np.int64) + off
            for sh, off in zip(self.manifest.splits[self.split].shards, self.offsets, strict=False)
        ]
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def verify_checksums(self) -> None:
        """Hash every shard and compare with the manifest (DataError naming the first mismatch)."""
        for sh in self.manifest.splits[self.split].shards:
            if file_sha256(self.data_dir / sh.path) != sh.sha256:
                raise DataError(f"{self.data_dir / sh.path}: sha256 mismatch (corrupted shard)")


def open_split(
    data_dir: str | Path,
    split: str = "train",
    *,
    expected_vocab_size: int | None = None,
    expected_tokenizer_sha256: str | None = None,
    max_positions: int | None = None,
    verify_checksums: Literal["first", "always", "never"] = "first",
) -> PackedTokens:
    """Open a prepared split after checking it fits the model.

    Checks: manifest format version; tokenizer vocabulary size and fingerprint against the
    model's (ted_scale.data.tokenizer.tokenizer_fingerprint); seq_len <= max_positions; every
    shard present with the right size; sha256 of every shard ("first": only until a
    `.verified-{split}` stamp for this exact manifest exists next to it; "always"; "never").
    """
    manifest = load_manifest(data_dir)
    tok = manifest.tokenizer
    if expected_vocab_size is not None and tok.vocab_size != expected_vocab_size:
        raise DataError(
            f"{data_dir}: tokenizer vocab size {tok.vocab_size} != model's {expected_vocab_size}"
        )
    if expected_tokenizer_sha256 is not None and tok.sha256 != expected_tokenizer_sha256:
        raise DataError(
            f"{data_dir}: prepared with tokenizer {tok.name!r} (sha256 {tok.sha256[:12]}...), "
            f"not the model's (sha256 {expected_tokenizer_sha256[:12]}...)"
        )
    if max_positions is not None and manifest.seq_len > max_positions:
        raise DataError(
            f"{data_dir}: seq_len {manifest.seq_len} exceeds the model's context {max_positions}"
        )
    ds = PackedTokens(data_dir, split, manifest)
    if verify_checksums not in ("first", "always", "never"):
        raise ValueError(f"verify_checksums={verify_checksums!r}")
    stamp = Path(data_dir) / f".verified-{split}"
    key = hashlib.sha256(manifest_path(data_dir).read_bytes()).hexdigest()
    if verify_checksums == "always" or (
        verify_checksums == "first" and not (stamp.exists() and stamp.read_text() == key)
    ):
        ds.verify_checksums()
        with contextlib.suppress(OSError):  # read-only data directory: verify again next time
            atomic_write_text(stamp, key)
    return ds


class DistributedBatchLoader:
    """Serves this rank's micro-batches (input_ids [B, seq_len], labels [B, seq_len]), int64.

    Every epoch draws a global permutation of the samples from (seed, epoch); global batch j is
    perm[j*W*B : (j+1)*W*B] (W = world_size, B = micro_batch_size) and rank r takes its r-th
    B-slice, so ranks are disjoint and together cover the epoch. All ranks yield the same number
    of batches: with drop_last (training) the < W*B tail of each epoch's permutation is dropped
    (other samples each epoch); without (evaluation) every sample is served once and the tail is
    padded with rows of labels -100 (input_ids = EOS).

    Iteration is per epoch: `for x, y in loader` runs the rest of the current epoch and leaves
    `epoch` at the next one, so `for epoch in range(n): for x, y in loader: ...` trains n epochs.
    The position lives in the loader, not in the iterator: `state_dict()` after any batch and
    `load_state_dict()` in a new loader resume with exactly the batches that would have come
    next. The position is a global sample offset, so a run may resume with another world size.
    """

    def __init__(
        self,
        dataset: PackedTokens,
        micro_batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        drop_last: bool = True,
        pin_memory: bool | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.drop_last = drop_last
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.epoch = 0
        self.samples_consumed = 0  # global (all ranks) samples of `epoch` already served
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{dataset.data_dir} [{dataset.split}]: {len(dataset)} samples make no batch of "
                f"{world_size} ranks x {micro_batch_size}"
            )

    @property
    def global_batch(self) -> int:
        return self.world_size * self.micro_batch_size

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches each rank yields in a full epoch."""
        return self._num_batches(0)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _num_batches(self, start: int) -> int:
        n = max(0, len(self.dataset) - start)
        return n // self.global_batch if self.drop_last else -(-n // self.global_batch)

    def epoch_indices(self, epoch: int, start: int = 0) -> np.ndarray:
        """This rank's sample ids [batches, B] for `epoch` from global offset `start`; -1 = pad."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        n = self._num_batches(start)
        ids = np.full(n * self.global_batch, -1, dtype=np.int64)
        served = perm[start : start + len(ids)]
        ids[: len(served)] = served
        ids = ids.reshape(n, self.world_size, self.micro_batch_size)
        return ids[:, self.rank]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        ids = self.epoch_indices(self.epoch, self.samples_consumed)
        for j, row in enumerate(ids):
            batch = self._collate(row)
            if j + 1 == len(ids):  # the state after the last batch is the next epoch's start
                self.epoch, self.samples_consumed = self.epoch + 1, 0
            else:
                self.samples_consumed += self.global_batch
            yield batch
        if len(ids) == 0:
            self.epoch, self.samples_consumed = self.epoch + 1, 0

    def _collate(self, row: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        windows = np.full((len(row), self.dataset.seq_len + 1), IGNORE_INDEX, dtype=np.int64)
        for b, i in enumerate(row):
            if i >= 0:
                windows[b] = self.dataset.sample(int(i))
        w = torch.from_numpy(windows)
        input_ids = w[:, :-1].clone()
        input_ids[row < 0] = self.dataset.eos_id
        labels = w[:, 1:].clone()
        if self.pin_memory:
            input_ids, labels = input_ids.pin_memory(), labels.pin_memory()
        return input_ids, labels

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch yielded (global, so independent of world size)."""
        return {
            "epoch": self.epoch,
            "samples_consumed": self.samples_consumed,
            "seed": self.seed,
            "num_samples": len(self.dataset),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_samples"] != len(self.dataset):
            raise DataError(
                f"loader state is for {state['num_samples']} samples, this split has "
                f"{len(self.dataset)}: not the same data"
            )
        self.epoch = int(state["epoch"])
        self.samples_consumed = int(state["samples_consumed"])
        self.seed = int(state["seed"])
