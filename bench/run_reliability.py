#!/usr/bin/env python3
"""Reliability figures for a finished run: fuzzing, hostile uploads, load, crash-and-resume.

    python bench/run_reliability.py [--workdir DIR] [--fuzz-examples 300] [--load-clients 16]
                                  [--load-seconds 60] [--crash-phases 1-9]

Starts the real API (tiny profile by default) on a free loopback port, fuzzes it from its
own OpenAPI schema with schemathesis, sends a corpus of hostile uploads and requests, holds
a sustained load, stops it, then kills every listed phase with SIGKILL partway and checks
that run_pipeline.sh resumes it with no half-written JSON. Writes
benchmarks/reliability.json; phase 9's report shows it. CI runs a shorter version of the
same (tests/test_reliability.py); this command with its defaults is the long run.
"""

import argparse
import logging

import reliability  # a sibling: bench/ is not installed, scripts here run as files

from medvl.core.io import atomic_write_json
from medvl.core.settings import load_settings
from medvl.core.workdir import Workdir
from medvl.http.validate import running_server

log = logging.getLogger("medvl.reliability")


def phase_list(text: str) -> list[int]:
    if "-" in text:
        low, high = (int(x) for x in text.split("-"))
        return list(range(low, high + 1))
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--fuzz-examples", type=int, default=300)
    parser.add_argument("--load-clients", type=int, default=16)
    parser.add_argument("--load-seconds", type=float, default=60.0)
    parser.add_argument("--max-rss-growth-mb", type=float, default=300.0)
    parser.add_argument("--crash-phases", default="1-9", help="e.g. 1-9, 2,6 or '' for none")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    wd = Workdir.at(args.workdir)
    settings = load_settings(args.profile)
    page = sorted(wd.test_images.glob("*.png"))[0]

    log.info("starting the API for fuzzing and load")
    with running_server(wd.root, args.profile, ["--max-new-tokens", "8"]) as base:
        pid = _server_pid(base)
        fuzz = reliability.fuzz_schema(base, args.fuzz_examples)
        log.info("fuzz: %d cases, %d server errors", fuzz["cases"], fuzz["server_errors"])
        hostile = reliability.run_hostile(base)
        log.info("hostile: %d requests, %d server errors, %d undocumented", hostile["requests"],
                 hostile["server_errors"], hostile["undocumented"])
        load = reliability.load_test(base, args.load_clients, args.load_seconds, page.read_bytes(), pid)
        log.info("load: %d clients x %.0f s: %d sent, %d answered, %d failed, RSS growth %s MB", load["clients"],
                 load["duration_s"], load["sent"], load["answered"], load["failed"], load["server_rss_mb"]["growth"])
    crash = reliability.crash_resume_all(wd.root, phase_list(args.crash_phases)) if args.crash_phases else None
    if crash:
        for result in crash["phases"]:
            log.info("phase %d killed after %.1f s -> resumed: %s", result["phase"], result["killed_after_s"], result["ok"])
    growth = load["server_rss_mb"]["growth"]
    record = {
        "profile": settings.profile,
        "fuzz": fuzz, "hostile": hostile, "load": load, "crash_resume": crash,
        "memory_bound_mb": args.max_rss_growth_mb,
        "summary": {
            "fuzz_cases": fuzz["cases"], "hostile_requests": hostile["requests"],
            "server_errors": fuzz["server_errors"] + hostile["server_errors"],
            "undocumented_answers": len(fuzz["problems"]) + hostile["undocumented"],
            "load_lost": load["lost"] + load["failed"],
            "memory_growth_within_bound": growth is not None and growth <= args.max_rss_growth_mb,
            "crash_resume_all_ok": crash["all_ok"] if crash else None,
        },
    }
    atomic_write_json(wd.bench("reliability"), record)
    log.info("summary: %s", record["summary"])
    return record


def _server_pid(base: str) -> int:
    """The server's process id, from the port it listens on."""
    import psutil

    port = int(base.rsplit(":", 1)[1])
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            return conn.pid
    raise RuntimeError(f"no process listens on {port}")


if __name__ == "__main__":
    main()
