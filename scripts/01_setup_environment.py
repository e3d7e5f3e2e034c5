#!/usr/bin/env python3
"""Phase 1: check the environment and start the build log.

Checks Python >= 3.10, torch, CUDA (required by the 7b profiles, reported otherwise), GPU
name and VRAM, and that every library a later phase imports can be imported. Writes
benchmarks/environment.json and starts docs/BUILD_LOG.md.
"""



from medvl.core import environment
from medvl.core.io import append_build_log, atomic_write_json
from medvl.core.settings import Settings
from medvl.core.workdir import Workdir
from medvl.pipeline.gates import PHASES
from medvl.pipeline.runner import PhaseError, log, run_phase

PHASE = PHASES[1]


def main(settings: Settings, wd: Workdir) -> dict:
    env = environment.collect()
    env.update(settings.record(PHASE.sections))

    hardware = environment.hardware_label(env)
    errors = env["import_errors"]
    broken = [f"{name} ({errors[name]})" for name in environment.CORE_IMPORTS if name in errors]
    missing_extras = [f"{name} (needed by {environment.EXTRA_IMPORTS[name]})"
                      for name in environment.EXTRA_IMPORTS if name in errors]
    log.info("Python %s, torch %s, hardware: %s", env["python"]["version"],
             env["packages"]["torch"], hardware)
    for name, version in env["packages"].items():
        log.info("  %-18s %s", name, version or "not installed")
    append_build_log(wd.build_log, PHASE.number, "environment", [
        f"Profile `{settings.profile}`; Python {env['python']['version']}; "
        f"torch {env['packages']['torch']}; transformers {env['packages']['transformers']}.",
        f"Hardware: {hardware}; CUDA available: {env['cuda']['available']}.",
        "Core imports: " + ("all import." if not broken else "BROKEN: " + "; ".join(broken)),
        "Optional imports: " + ("all import." if not missing_extras else "missing " + "; ".join(missing_extras)),
    ])
    for item in missing_extras:
        log.warning("not installed: %s", item)
    atomic_write_json(PHASE.output(wd, "environment.json"), env)  # last: its presence means phase 1 finished
    if broken:
        raise PhaseError("cannot import " + "; ".join(broken))
    if settings.model.require_cuda and not env["cuda"]["available"]:
        raise PhaseError(f"profile {settings.profile} needs a CUDA GPU; none found "
                         "(use --profile tiny on a CPU)")
    return env


if __name__ == "__main__":
    run_phase(PHASE.number, main, __doc__)
