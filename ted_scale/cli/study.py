"""The method study: a teacher, then students by every method over several seeds, on 2 CPU cores.

    python launch/study.py --config configs/study-cpu.yaml [a.b=value ...]

Writes OUTPUT_DIR/results.md, results.json and figures/; re-running skips finished runs.
"""

from __future__ import annotations

import argparse
import sys
import time

from ted_scale.config import ConfigError
from ted_scale.data import DataError
from ted_scale.study.config import load_study_config
from ted_scale.study.results import write_report
from ted_scale.study.runner import StudyError, run_study


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True, help="study YAML (see configs/study-cpu.yaml)")
    p.add_argument("overrides", nargs="*", help="config overrides as key.subkey=value")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        study = load_study_config(args.config, args.overrides)
        outcome = run_study(study)
        report = write_report(study, outcome, time.perf_counter() - start)
    except (ConfigError, DataError, StudyError, OSError) as e:
        print(f"study: error: {e}", file=sys.stderr)
        return 2
    print(report.read_text())
    print(f"wrote {report} in {(time.perf_counter() - start) / 60:.1f} min")
    return 0 if not outcome["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
