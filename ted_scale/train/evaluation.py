"""Evaluation every ``eval.interval`` steps: held-out perplexity on the first batches of the test
split and LAMBADA on a fixed subset. Rank 0 evaluates (with a tensor-parallel model, the ranks of
its group together); the other ranks wait at the barrier.

Every input is read when the evaluator is built, at start-up, so a bad LAMBADA file or test split
stops the run before step 1 rather than after hours of training.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from ted_scale.config.schema import RunConfig
from ted_scale.data.loader import DistributedBatchLoader, PackedTokens
from ted_scale.eval.heldout import heldout_perplexity
from ted_scale.eval.lambada import evaluate_lambada, load_lambada
from ted_scale.eval.scoring import eval_mode
from ted_scale.model import GPT
from ted_scale.parallel import agreed, barrier, gathered_state


class InTrainingEval:
    """Scores a phase's ``evaluated`` model at the ``eval.interval`` cadence."""

    def __init__(
        self,
        config: RunConfig,
        tokenizer: PreTrainedTokenizerBase,
        heldout: PackedTokens,
        *,
        is_main: bool,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.heldout = heldout
        self.is_main = is_main
        self.interval = config.eval.interval
        self.passages = load_lambada(config.eval.lambada_path)[: config.eval.lambada_examples]

    def due(self, step: int) -> bool:
        return step % self.interval == 0

    def __call__(self, model: GPT, device: torch.device) -> dict[str, float]:
        """Metrics of ``model`` (empty on ranks other than 0).

        A model sharded by tensor parallelism is scored as it is, by every rank of its group
        (vocabulary-parallel scoring; every group scores the same batches). Otherwise rank 0
        evaluates a plain copy: under ZeRO-3 the engine's own module holds only this rank's
        partition of each weight, and its hooks would release gathered weights mid-eval.
        """
        # Nothing drawn here may move the training's generators: a run resumed from the
        # checkpoint saved just before this evaluation continues from the state saved with it.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if model.tensor_parallel is not None:
                with eval_mode(model):
                    results = self._evaluate(model, device)
                barrier()
                return results if self.is_main else {}
            state = gathered_state(model)  # a collective under ZeRO-3: every rank takes part
            results: dict[str, float] = {}
            with agreed():  # an evaluation error on rank 0 stops the waiting ranks too
                if self.is_main:
                    copy = GPT(model.config, attention=model.blocks[0].attn.implementation)
                    copy.load_state_dict(state)
                    copy.vocab_in_use = model.vocab_in_use
                    results = self._evaluate(copy.to(device).eval(), device)
            return results

    def _evaluate(self, model: GPT, device: torch.device) -> dict[str, float]:
        results = {}
        # Always the same first batches: a fixed seed and one rank's view of the split (a run
        # whose split is empty is refused before step 1).
        loader = DistributedBatchLoader(
            self.heldout, self.config.batch.micro_batch_size, seed=0, drop_last=False
        )
        heldout = heldout_perplexity(
            model, loader, device=device, max_batches=self.config.eval.heldout_batches
        )
        results["eval_heldout_ppl"] = heldout["perplexity"]
        lambada = evaluate_lambada(
            model,
            self.tokenizer,
            self.passages,
            batch_size=self.config.batch.micro_batch_size,
            device=device,
            fused=self.config.fused_loss,
        )
        results["eval_lambada_acc"] = lambada["accuracy"]
        results["eval_lambada_ppl"] = lambada["perplexity"]
        return results
