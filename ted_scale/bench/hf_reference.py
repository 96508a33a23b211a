"""TED Stage II written the way one would straight from the paper with `transformers`.

The yardstick of the throughput benchmark: teacher and student as the HF class of their family
(``GPT2LMHeadModel``, ``LlamaForCausalLM``, ...; the student is the teacher's blocks at the layer
map, so both start from the same weights as this project's models), ``output_hidden_states=True``,
full [B, T, V] logits for both models, ``nn.Linear`` filters, ``F.cross_entropy`` / ``F.kl_div`` /
``F.mse_loss``, the teacher under ``torch.no_grad()`` and ``torch.optim.AdamW`` in a plain loop.
Nothing here is tuned.

One deliberate literalism: ``hidden_states[m + 1]`` is read for teacher block m, as a user of the HF
API would; for the top block HF hands over the state after the final norm rather than the
residual stream. That changes what the top filter sees, not what a step costs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ted_scale.model.gpt import GPT
from ted_scale.model.hf import to_hf_model
from ted_scale.model.student import student_from_teacher

# This project's attention names -> the reference's (`auto` means "what HF picks by default").
HF_ATTENTION = {"auto": "sdpa", "sdpa": "sdpa", "eager": "eager", "flash": "flash_attention_2"}


class ReferenceTED:
    """One TED Stage II step: CE + alpha_kd * KD + alpha_layer * sum_k MSE(g_t^k, g_s^k).

    ``step_parts`` yields after each piece of the step ("teacher", "student_forward" comes from a
    hook, "losses", "backward", "optimizer") so that a timer can stop the clock there.
    """

    def __init__(
        self,
        teacher: GPT,
        layer_map: Sequence[int],
        *,
        alpha_kd: float,
        alpha_layer: float,
        temperature: float,
        attention: str,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        device: torch.device,
    ) -> None:
        d = teacher.config.n_embd
        self.teacher = to_hf_model(teacher).to(device).eval().requires_grad_(False)
        self.student = to_hf_model(student_from_teacher(teacher, layer_map)).to(device).train()
        for model in (self.teacher, self.student):
            model.set_attn_implementation(HF_ATTENTION[attention])
        self.teacher_filters = nn.ModuleList(nn.Linear(d, d) for _ in layer_map).to(device)
        self.teacher_filters.requires_grad_(False)
        self.student_filters = nn.ModuleList(nn.Linear(d, d) for _ in layer_map).to(device)
        self.student_filters.load_state_dict(self.teacher_filters.state_dict())
        self.device = device
        self.layer_map = list(layer_map)
        self.alpha_kd, self.alpha_layer, self.temperature = alpha_kd, alpha_layer, temperature
        params = [*self.student.parameters(), *self.student_filters.parameters()]
        self.optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=0.0)

    def _autocast(self):
        # bf16 on CUDA, as any GPU training script would; fp32 on CPU.
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16)

    @property
    def student_trunk(self) -> nn.Module:
        """The student up to its final norm (its LM head excluded): the timer hooks here."""
        return self.student.base_model

    def step_parts(self, input_ids: Tensor, labels: Tensor) -> Iterator[str]:
        """One training step on ``input_ids``/``labels`` [B, T] (labels already shifted)."""
        input_ids = input_ids.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        with torch.no_grad(), self._autocast():
            t_out = self.teacher(input_ids, output_hidden_states=True)
            t_logits = t_out.logits  # [B, T, V]
            t_states = [
                g(t_out.hidden_states[m + 1])
                for g, m in zip(self.teacher_filters, self.layer_map, strict=True)
            ]
        yield "teacher"
        with self._autocast():
            loss = self._loss(input_ids, labels, t_logits, t_states)
        yield "losses"
        loss.backward()
        yield "backward"
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        yield "optimizer"

    def _loss(
        self, input_ids: Tensor, labels: Tensor, t_logits: Tensor, t_states: list[Tensor]
    ) -> Tensor:
        """Student forward, full logits [B*T, V] and the three terms of the TED objective."""
        T = self.temperature
        s_out = self.student(input_ids, output_hidden_states=True)
        logits = s_out.logits.flatten(0, 1)  # [B*T, V]
        ce = F.cross_entropy(logits, labels.flatten())
        kd = (
            F.kl_div(
                F.log_softmax(logits / T, dim=-1),
                F.softmax(t_logits.flatten(0, 1) / T, dim=-1),
                reduction="batchmean",
            )
            * T**2
        )
        s_states = [
            g(h) for g, h in zip(self.student_filters, s_out.hidden_states[1:], strict=True)
        ]
        d_ted = sum(F.mse_loss(s, t) for s, t in zip(s_states, t_states, strict=True))
        return ce + self.alpha_kd * kd + self.alpha_layer * d_ted
