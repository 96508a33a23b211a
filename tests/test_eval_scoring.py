"""The fused scoring path (LM head over chunks of rows) against full logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ted_scale.eval.scoring import IGNORE_INDEX, eval_mode, score_tokens


def test_fused_scores_match_full_logits(tiny_gpt):
    torch.manual_seed(1)
    ids = torch.randint(0, tiny_gpt.config.vocab_size, (3, 20))
    targets = torch.randint(0, tiny_gpt.config.vocab_size, (3, 20))
    targets[0, :5] = IGNORE_INDEX
    targets[2, 12:] = IGNORE_INDEX
    fused = score_tokens(tiny_gpt, ids, targets, chunk_rows=7)  # chunks that split rows
    full = score_tokens(tiny_gpt, ids, targets, fused=False)
    torch.testing.assert_close(fused.nll, full.nll, rtol=1e-5, atol=1e-5)
    assert torch.equal(fused.correct, full.correct)

    logits = tiny_gpt(ids).logits.detach()
    expected = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    torch.testing.assert_close(fused.nll, expected, rtol=1e-5, atol=1e-5)
    mask = targets != IGNORE_INDEX
    assert torch.equal(fused.correct, (logits.argmax(-1) == targets) & mask)


def test_eval_mode_disables_dropout_and_restores_training(tiny_config):
    from ted_scale.model import GPT

    tiny_config.dropout = 0.5
    model = GPT(tiny_config).train()
    ids = torch.randint(0, tiny_config.vocab_size, (2, 10))
    with eval_mode(model):
        assert not model.training
        a = score_tokens(model, ids, ids).nll
        b = score_tokens(model, ids, ids).nll
    assert torch.equal(a, b) and model.training
