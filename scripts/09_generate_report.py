#!/usr/bin/env python3
"""Phase 9: the final report, from the benchmark files alone.

Writes benchmarks/FINAL_REPORT.json, docs/BENCHMARK_REPORT.md with charts under
docs/figures/, docs/CONTENT_DRAFT.md (a LinkedIn post and a short post), and the results
table between the markers in README.md (when the workdir has one). A phase that has not
run is reported as missing. Its gate is the final sweep: every expected file present and
valid, a build-log entry for every phase, the README's sections in place.
"""



from medvl.core.io import append_build_log, atomic_write_json, atomic_write_text
from medvl.core.settings import Settings
from medvl.core.workdir import Workdir
from medvl.evaluation import report
from medvl.pipeline.gates import PHASES, benchmark_outputs
from medvl.pipeline.runner import log, run_phase

PHASE = PHASES[9]


def main(settings: Settings, wd: Workdir) -> dict:
    benchmarks, missing = report.load_benchmarks(wd.benchmarks, benchmark_outputs(before=PHASE.number))
    final = {**settings.record(PHASE.sections), **report.build_final_report(benchmarks, missing)}

    figures = report.charts(final, wd.docs / "figures")
    atomic_write_text(wd.docs / "BENCHMARK_REPORT.md", report.benchmark_markdown(final, figures))
    long_post, short_post = report.content_draft(final)
    atomic_write_text(wd.docs / "CONTENT_DRAFT.md",
                      f"# Content draft\n\n## LinkedIn ({len(long_post.split())} words)\n\n{long_post}\n\n"
                      f"## Short post ({len(short_post)} characters)\n\n{short_post}\n")
    readme = wd.root / "README.md"
    updated = report.readme_with_results(readme.read_text(), final) if readme.is_file() else None
    if updated is not None:
        atomic_write_text(readme, updated)
    else:
        log.info("no README.md with results markers in %s: README table not written", wd.root)

    for finding in report.findings(final):
        log.info("finding: %s", finding)
    if missing:
        log.warning("missing benchmark files: %s", ", ".join(missing))
    append_build_log(wd.build_log, PHASE.number, "report", [
        f"Wrote FINAL_REPORT.json, BENCHMARK_REPORT.md ({len(figures)} charts), CONTENT_DRAFT.md"
        + ("; README results table." if updated is not None else "."),
        f"Missing: {', '.join(missing)}." if missing else "Every benchmark file was present.",
    ])
    atomic_write_json(PHASE.output(wd, "FINAL_REPORT.json"), final)  # last: its presence means phase 9 finished
    return final


if __name__ == "__main__":
    run_phase(PHASE.number, main, __doc__)
