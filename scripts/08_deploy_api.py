#!/usr/bin/env python3
"""Phase 8: start the API on the fine-tuned model and validate every endpoint.

Starts `python -m medvl.http.server` in a subprocess on a free loopback port (the model loads in
the background; /health answers 503 until it is ready), calls every endpoint with a
phase-3 document plus two bad inputs, /extract on all five phase-3 documents (each answer must
be JSON valid against the record's schema), checks that the server serves the model and form
phase 7 evaluated and runs with this run's settings (its --set overrides are passed on), sends
the test split's record pages to /extract and scores the answers against phase 7's, paired
(medvl/http/parity.py: served parity), writes benchmarks/api_validation.json (per-endpoint
status and latency, the parity figures) and stops the server.
"""

import time
from pathlib import Path

import httpx

from medvl.core.io import append_build_log, atomic_write_json, read_json
from medvl.core.settings import SERVED_SETTINGS, Settings
from medvl.core.workdir import Workdir
from medvl.http.parity import served_parity
from medvl.http.validate import running_server, validate
from medvl.pipeline.gates import PHASES
from medvl.pipeline.runner import PhaseError, log, run_phase

PHASE = PHASES[8]
PARITY_CHECK = "POST /extract on the test split scores what phase 7 scored (served parity)"


def served_as_evaluated(base: str, evaluated: dict, wd: Workdir) -> dict:
    """The server's model and form (its /health) against phase 7's: the quality the report
    states must be the quality served."""
    health = httpx.get(f"{base}/health", timeout=10).json()
    want = (str(wd.root / evaluated["merge"]["served_dir"]), evaluated["served_form"])
    got = (health["model_path"], health["weights"])
    return {"status": 200, "expected": 200, "ok": Path(got[0]).resolve() == Path(want[0]).resolve() and got[1] == want[1],
            "latency_s": 0.0, "detail": f"served {got[0]} as {got[1]}; phase 7 evaluated {want[0]} as {want[1]}"}


def served_with_run_settings(base: str, settings: Settings) -> dict:
    """The server's settings (its /health fingerprint) against this run's profile and --set."""
    got = httpx.get(f"{base}/health", timeout=10).json()["settings_hash"]
    want = settings.fingerprint(SERVED_SETTINGS)
    return {"status": 200, "expected": 200, "ok": got == want, "latency_s": 0.0,
            "detail": f"server settings {got}, run settings {want} (profile {settings.profile}, "
                      f"--set {' '.join(settings.overrides) or 'none'})"}


def main(settings: Settings, wd: Workdir) -> dict:
    pages = sorted(wd.test_images.glob("*.png"))
    evaluated = read_json(wd.bench("evaluation_finetuned"))
    try:
        with running_server(wd.root, settings.profile, [f"--set={item}" for item in settings.overrides]) as base:
            checks = validate(base, pages)
            checks["served model and form = phase 7's"] = served_as_evaluated(base, evaluated, wd)
            checks["server settings = the run's (profile and --set)"] = served_with_run_settings(base, settings)
            started = time.perf_counter()
            parity = served_parity(base, wd.root, PHASES[7].output(wd, "eval_cases.jsonl"),
                                   PHASES[7].output(wd, "eval_answers_finetuned.jsonl"))
            checks[PARITY_CHECK] = {"status": 200, "expected": 200, "ok": parity["ok"],
                                    "latency_s": time.perf_counter() - started, "detail": parity["detail"]}
    except (RuntimeError, TimeoutError) as exc:
        raise PhaseError(f"the API did not start: {exc}") from None
    health = checks["GET /health"]
    record = {**settings.record(PHASE.sections), "model": health.get("detail") or "see /health",
              "all_ok": all(c["ok"] for c in checks.values()), "endpoints": checks, "served_parity": parity}
    atomic_write_json(PHASE.output(wd, "api_validation.json"), record)
    for name, check in checks.items():
        log.info("%-40s %s %s %.3f s", name, "ok  " if check["ok"] else "FAIL", check["status"], check["latency_s"])
    append_build_log(wd.build_log, PHASE.number, "API validation", [
        f"Served `{record['model']}`; {sum(c['ok'] for c in checks.values())}/{len(checks)} endpoint checks passed.",
        *(f"{name}: {c['status']} in {c['latency_s']:.3f} s" for name, c in checks.items()),
    ])
    return record


if __name__ == "__main__":
    run_phase(PHASE.number, main, __doc__)
