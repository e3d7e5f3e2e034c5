#!/usr/bin/env python3
"""Phase 4's AWQ checkpoint in the served 4-bit layers against compressed-tensors' own
dequantization, as this machine dequantizes them (a GPU's Triton kernel, or torch on a CPU).

Loads the checkpoint unfused, reads each checked layer's weights back as the layer dequantizes them and
compares them with compressed-tensors' dequantization of the saved layer, within the rounding
bound medvl/model/int4.py states (tests/test_int4.py runs the same check on the CPU):

    python bench/check_awq_kernel.py --profile 7b-random --layers 7

Writes benchmarks/awq_kernel_check.json.
"""

import argparse
import shlex
import sys

from medvl.core.io import atomic_write_json
from medvl.core.settings import Settings
from medvl.core.workdir import Workdir
from medvl.model.int4 import dequantization_check, load_awq_model
from medvl.pipeline.runner import PhaseError, log, run_tool


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=0,
                        help="check the first N int4 layers in checkpoint order (default: 0, all of them)")


def main(settings: Settings, wd: Workdir, args: argparse.Namespace) -> dict:
    folder = wd.awq_model_dir(settings)
    if not (folder / "config.json").is_file():
        raise PhaseError(f"no AWQ checkpoint at {folder}: phase 4 did not run AWQ")
    model = load_awq_model(folder, settings, fuse=False)
    check = dequantization_check(folder, model, args.layers or None)
    record = {**settings.record(("model", "quant")), "command": shlex.join(["python", *sys.argv]),
              "device": str(model.get_input_embeddings().weight.device), **check}
    atomic_write_json(wd.bench("awq_kernel_check"), record)
    log.info("%d layers checked on %s: worst error %.3f of the bound (%s)", check["layers"], record["device"],
             check["worst_fraction_of_bound"], "within" if check["within_bound"] else "OUTSIDE")
    if not check["within_bound"]:
        raise PhaseError("the int4 kernel's weights are outside the stated rounding bound")
    return record


if __name__ == "__main__":
    run_tool("check_awq_kernel", (4,), main, __doc__, add_arguments)
