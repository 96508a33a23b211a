"""Process groups and the parallel dimensions of a run (data-parallel x tensor-parallel).

Every component that talks to other ranks asks ``ParallelDims`` which group to use; nothing else
in the project reads the global rank as a data-parallel rank (docs/design.md, "Parallelism").
"""

from ted_scale.parallel.agree import RankRefusedError, agreed
from ted_scale.parallel.dims import ParallelDims, barrier, init_parallel, teacher_dims
from ted_scale.parallel.tensor import gathered_state, parallelize_gpt

__all__ = [
    "ParallelDims",
    "RankRefusedError",
    "agreed",
    "barrier",
    "gathered_state",
    "init_parallel",
    "parallelize_gpt",
    "teacher_dims",
]
