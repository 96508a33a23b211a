"""Training on DeepSpeed.

- `distributed`: process group under deepspeed / torchrun / plain python; ZeRO-3 state gathering.
- `models`: teacher, student and tokenizer from the config, checked against each other.
- `engine`: the DeepSpeed config and engine; `optim`: AdamW and the warm-up/decay schedule.
- `prefetch`: the teacher one micro-batch ahead on a side CUDA stream.
- `trainer`: the stages, the loop, checkpoints (`checkpoint`), metrics (`metrics`, `flops`) and
  in-training evaluation (`evaluation`). The command line is `ted_scale.cli.pretrain_ted`.
"""
