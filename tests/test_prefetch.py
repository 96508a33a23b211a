"""Teacher prefetch: the look-ahead hands over the right batches and keeps the loader's resume state
exact; on CUDA (skipped without it) the side stream gives identical outputs, overlaps the
student's work and keeps memory flat."""

from __future__ import annotations

import pytest
import torch

from ted_scale.data.loader import DistributedBatchLoader, open_split
from ted_scale.distill.modules import FrozenTapper
from ted_scale.model import GPT, GPTConfig
from ted_scale.train.prefetch import TeacherFeed


def _teacher(device: str = "cpu") -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=512, n_positions=64, n_embd=64, n_layer=4, n_head=4, dropout=0.0)
    return GPT(config).to(device)


def _loader(tiny_data, micro_batch_size: int = 4) -> DistributedBatchLoader:
    return DistributedBatchLoader(open_split(tiny_data, "train"), micro_batch_size, seed=3)


def test_lookahead_feed_hands_over_the_same_batches_and_outputs_as_the_inline_feed(tiny_data):
    teacher = _teacher()
    tapper = FrozenTapper(teacher, [0, 3], with_top=True)
    inline = TeacherFeed(_loader(tiny_data), tapper, torch.device("cpu"), prefetch=False)
    ahead = TeacherFeed(_loader(tiny_data), tapper, torch.device("cpu"), prefetch=True)
    for _ in range(5):
        a, b = inline.next(), ahead.next()
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
        for x, y in zip(a.tapped.layer_states, b.tapped.layer_states, strict=True):
            assert torch.equal(x, y)
        assert torch.equal(a.tapped.last_hidden, b.tapped.last_hidden)
        assert a.loader_state == b.loader_state


def test_prefetched_batch_is_not_counted_as_consumed(tiny_data):
    loader = _loader(tiny_data)
    feed = TeacherFeed(loader, FrozenTapper(_teacher(), [1]), torch.device("cpu"), prefetch=True)
    for _ in range(3):
        feed.next()
    # The loader itself has served four batches (one is waiting in the feed); a checkpoint must
    # record three, so that a resumed run starts with the waiting one.
    assert loader.state_dict()["samples_consumed"] == 4 * 4
    assert feed.consumed_state()["samples_consumed"] == 3 * 4
    resumed = _loader(tiny_data)
    resumed.load_state_dict(feed.consumed_state())
    assert torch.equal(next(iter(resumed))[0], feed.next().input_ids)


def test_lookahead_crosses_the_end_of_an_epoch(tiny_data):
    loader = _loader(tiny_data, micro_batch_size=64)
    per_epoch = loader.batches_per_epoch
    feed = TeacherFeed(loader, FrozenTapper(_teacher(), [1]), torch.device("cpu"), prefetch=True)
    states = [feed.next().loader_state for _ in range(per_epoch + 1)]
    assert states[per_epoch - 1] == {**states[per_epoch - 1], "epoch": 1, "samples_consumed": 0}
    assert states[per_epoch]["epoch"] == 1 and states[per_epoch]["samples_consumed"] == 64


@pytest.mark.cuda
def test_side_stream_prefetch_gives_identical_teacher_outputs_on_cuda(tiny_data):
    teacher = _teacher("cuda")
    tapper = FrozenTapper(teacher, [0, 3], with_top=True)
    inline = TeacherFeed(_loader(tiny_data), tapper, torch.device("cuda"), prefetch=False)
    ahead = TeacherFeed(_loader(tiny_data), tapper, torch.device("cuda"), prefetch=True)
    for _ in range(8):
        a, b = inline.next(), ahead.next()
        for x, y in zip(a.tapped.layer_states, b.tapped.layer_states, strict=True):
            assert torch.equal(x, y)
    timing = ahead.timing()
    assert timing["teacher_ms"] > 0 and 0.0 <= timing["teacher_hidden_fraction"] <= 1.0


@pytest.mark.cuda
def test_side_stream_prefetch_keeps_peak_memory_flat_over_many_steps(tiny_data):
    teacher = _teacher("cuda")
    student = _teacher("cuda").train()
    feed = TeacherFeed(
        _loader(tiny_data),
        FrozenTapper(teacher, [0, 3], with_top=True),
        torch.device("cuda"),
        prefetch=True,
    )
    peaks = []
    for step in range(60):
        item = feed.next()
        out = student(item.input_ids, output_layers=[0, 3], return_logits=False)
        loss = sum(
            (s - t).square().mean()
            for s, t in zip(
                (out.hidden_states[0], out.hidden_states[3]), item.tapped.layer_states, strict=True
            )
        )
        loss.backward()
        if step in (10, 59):
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated())
    assert peaks[1] <= peaks[0] * 1.01


@pytest.mark.cuda
def test_teacher_kernels_overlap_student_kernels_on_cuda(tiny_data):
    from torch.profiler import ProfilerActivity, profile

    big = GPTConfig(vocab_size=512, n_positions=64, n_embd=512, n_layer=8, n_head=8, dropout=0.0)
    teacher, student = GPT(big).cuda().eval(), GPT(big).cuda().train()
    feed = TeacherFeed(
        _loader(tiny_data, 32),
        FrozenTapper(teacher, [7], with_top=True),
        torch.device("cuda"),
        prefetch=True,
    )
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(6):
            item = feed.next()
            student(item.input_ids).logits.float().square().mean().backward()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    side = feed.side_stream.cuda_stream
    teacher_spans = [
        (e.time_range.start, e.time_range.end)
        for e in kernels
        if getattr(e, "stream", None) == side
    ]
    student_spans = [
        (e.time_range.start, e.time_range.end)
        for e in kernels
        if getattr(e, "stream", None) != side
    ]
    overlaps = sum(1 for a, b in teacher_spans if any(c < b and a < d for c, d in student_spans))
    assert teacher_spans and overlaps > 0


def test_every_tapped_tensor_is_handed_to_the_consumer_stream_once():
    from ted_scale.distill.methods.cr_ild import MixedTapped
    from ted_scale.train.prefetch import _tensors

    state, top, q, k, v, attention = (torch.zeros(1) for _ in range(6))
    tapped = MixedTapped([state], top, None, attention_log_probs=attention, relations=(q, k, v))
    got = _tensors(tapped)
    assert len(got) == 6 and {id(t) for t in got} == {
        id(t) for t in (state, top, q, k, v, attention)
    }
