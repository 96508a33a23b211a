"""The command-line entries, one module each: ``python -m ted_scale.cli.<name>``.

Each parses its arguments and calls the package; ``launch/<name>.py`` and the ``ted-*`` console
scripts are the same commands. Nothing in the package imports from here.
"""

import os

from ted_scale.process import DIE_WITH_PARENT, die_with_parent

if os.environ.get(DIE_WITH_PARENT) == "1":  # a command of a study: killed with the study
    die_with_parent()
