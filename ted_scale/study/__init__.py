"""The method study behind `launch/study.py`: one teacher, many students, several seeds.

- `config`: the study's YAML (`configs/study-cpu.yaml`) as typed dataclasses.
- `plan`: the runs it implies (teacher, student init, one run per row and seed) and their configs.
- `runner`: runs them as subprocesses of the public entries, in parallel, skipping finished ones.
- `aggregate`: mean +- std per row, paired differences against TED over seeds.
- `report`: `results.md`, `results.json` and the figures.
"""
