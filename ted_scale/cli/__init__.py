"""The command-line entries, one module each: ``python -m ted_scale.cli.<name>``.

Each parses its arguments and calls the package; ``launch/<name>.py`` and the ``ted-*`` console
scripts are the same commands. Nothing in the package imports from here.
"""

import os

from ted_scale.process import DIE_WITH_PARENT, die_with_parent

# A command of a study is killed with the study. Taken out of the environment: it names this
# process's parent, not its children's.
if study := os.environ.pop(DIE_WITH_PARENT, ""):
    die_with_parent(int(study))
