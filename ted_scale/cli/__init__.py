"""The command-line entries, one module each: ``python -m ted_scale.cli.<name>``.

Each parses its arguments and calls the package; ``launch/<name>.py`` and the ``ted-*`` console
scripts are the same commands. Nothing in the package imports from here.
"""

import os

from ted_scale.process import DIE_WITH_PARENT, die_with_parent

# Transparent huge pages for torch's large CPU tensors (read by torch at its first large
# allocation): each step's fresh [V, d] gradients and logits buffers are otherwise page-faulted
# in 4 KiB at a time (a 51 MB zero-fill: 22 ms, 5.8 on huge pages; docs/throughput.md, "Huge
# pages"). THP_MEM_ALLOC_ENABLE=0 in the environment keeps torch's default.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

# A command of a study is killed with the study. Taken out of the environment: it names this
# process's parent, not its children's.
if study := os.environ.pop(DIE_WITH_PARENT, ""):
    die_with_parent(int(study))
