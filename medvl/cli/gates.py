"""``medvl-gates`` (``python -m medvl.cli.gates``): which phase gates pass, and why not.

``run_pipeline.sh`` asks it for the first failing phase (``--first-failing``) to know where to
start; without that flag it prints every phase's verdict with the gate's reasons.
"""

from __future__ import annotations

import argparse
import sys

from medvl.core.settings import DEFAULT_PROFILE, SettingsError, load_settings
from medvl.core.workdir import Workdir
from medvl.pipeline.gates import PHASES, check_phase, first_failing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="medvl-gates",
        description="Check phase gates. Prints the first failing phase with --first-failing "
        "(0 when every gate passes), or each phase's status.")
    parser.add_argument("--profile", default=DEFAULT_PROFILE)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--workdir", default=None, help="run folder (default: repository root)")
    parser.add_argument("--first-failing", action="store_true",
                        help="print only the number of the first failing phase (0 = none)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.profile, args.set)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    wd = Workdir.at(args.workdir)
    if args.first_failing:
        print(first_failing(wd, settings))
        return 0
    failed = False
    for number, phase in PHASES.items():
        problems = check_phase(number, wd, settings)
        failed |= bool(problems)
        print(f"phase {number} ({phase.name}): {'FAIL' if problems else 'pass'}")
        for problem in problems:
            print(f"    - {problem}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
