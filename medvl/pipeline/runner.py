"""The shared life of a phase script: parse, validate, check upstream gates, run, gate.

Every ``scripts/0N_*.py`` is ``main(settings, workdir) -> results`` plus
``run_phase(N, main, __doc__)``. This module owns the rest, so each phase behaves the same:

1. ``--profile/--set/--workdir`` are parsed and the settings validated before any heavy work;
2. the gates of the phases it depends on are checked, naming the script to run if one fails;
3. ``main`` runs; an expected failure (:class:`PhaseError`) ends in one line, not a traceback;
4. the phase's own gate runs and decides the exit status.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from medvl.core.settings import DEFAULT_PROFILE, Settings, SettingsError, available_profiles, load_settings
from medvl.core.workdir import Workdir
from medvl.pipeline.gates import PHASES, check_phase

log = logging.getLogger("medvl")

PhaseMain = Callable[[Settings, Workdir], dict[str, Any]]


class PhaseError(RuntimeError):
    """An expected failure (no GPU, hub unreachable ...): reported in one line."""


EXIT_FAILED, EXIT_SETTINGS, EXIT_UPSTREAM = 1, 2, 3


def phase_parser(description: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default=DEFAULT_PROFILE,
                        help=f"settings profile: {', '.join(available_profiles())} (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one setting, e.g. --set train.lora_r=16 (repeatable)")
    parser.add_argument("--workdir", default=None,
                        help="folder for models/, datasets/, benchmarks/, docs/, logs/ "
                        "(default: the repository root)")
    return parser


def setup_logging(wd: Workdir, name: str) -> None:
    """Console at INFO plus a per-phase file under logs/."""
    wd.logs.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    file_handler = logging.FileHandler(wd.logs / f"{name}.log")
    file_handler.setFormatter(fmt)
    root.addHandler(console)
    root.addHandler(file_handler)
    for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_phase(number: int, main: PhaseMain, description: str | None = None,
              argv: list[str] | None = None) -> None:
    """Run phase ``number`` from the command line and exit with its gate's verdict."""
    args = phase_parser(description).parse_args(argv)
    wd = Workdir.at(args.workdir)
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(wd, f"phase{number}" if rank == 0 else f"phase{number}.rank{rank}")
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)  # data-parallel ranks: only problems
    phase = PHASES[number]
    try:
        settings = load_settings(args.profile, args.set)
    except SettingsError as exc:
        log.error("%s", exc)
        sys.exit(EXIT_SETTINGS)

    for upstream in phase.depends_on:
        problems = check_phase(upstream, wd, settings)
        if problems:
            log.error("phase %d needs phase %d (%s) first: %s. Run: python scripts/%s --profile %s",
                      number, upstream, PHASES[upstream].name, "; ".join(problems),
                      PHASES[upstream].script, settings.profile)
            sys.exit(EXIT_UPSTREAM)

    wd.ensure()
    log.info("phase %d (%s), profile %s, settings %s", number, phase.name, settings.profile,
             settings.fingerprint(phase.sections))
    started = time.perf_counter()
    try:
        main(settings, wd)
    except PhaseError as exc:
        log.error("phase %d failed: %s", number, exc)
        sys.exit(EXIT_FAILED)
    except KeyboardInterrupt:
        log.error("phase %d interrupted; rerun to resume", number)
        sys.exit(130)

    if rank != 0:
        return  # data-parallel ranks other than 0 neither write outputs nor judge them
    problems = check_phase(number, wd, settings)
    elapsed = time.perf_counter() - started
    if problems:
        log.error("phase %d gate FAILED after %.1f s:\n  - %s", number, elapsed, "\n  - ".join(problems))
        sys.exit(EXIT_FAILED)
    log.info("phase %d gate passed (%.1f s)", number, elapsed)


def run_tool(name: str, needs: tuple[int, ...], main: Callable[[Settings, Workdir, argparse.Namespace], Any],
             description: str | None = None, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
             argv: list[str] | None = None) -> None:
    """Run a script that is not a phase (a benchmark, say) with a phase's checks: the same
    options, settings validated first, and the phases it reads from checked by their gates."""
    parser = phase_parser(description)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    wd = Workdir.at(args.workdir)
    setup_logging(wd, name)
    try:
        settings = load_settings(args.profile, args.set)
    except SettingsError as exc:
        log.error("%s", exc)
        sys.exit(EXIT_SETTINGS)
    for upstream in needs:
        problems = check_phase(upstream, wd, settings)
        if problems:
            log.error("%s needs phase %d (%s) first: %s. Run: python scripts/%s --profile %s", name, upstream,
                      PHASES[upstream].name, "; ".join(problems), PHASES[upstream].script, settings.profile)
            sys.exit(EXIT_UPSTREAM)
    try:
        main(settings, wd, args)
    except PhaseError as exc:
        log.error("%s failed: %s", name, exc)
        sys.exit(EXIT_FAILED)
