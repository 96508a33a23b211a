"""The command-line entries, one module each: ``python -m ted_scale.cli.<name>``.

Each parses its arguments and calls the package; ``launch/<name>.py`` and the ``ted-*`` console
scripts are the same commands. Nothing in the package imports from here.
"""
