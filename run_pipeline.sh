#!/usr/bin/env bash
# Run the medvl pipeline: resume at the first phase whose gate fails and run on to phase 9.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
  cat <<'TXT'
Usage: ./run_pipeline.sh [options]

Runs the nine phases in order. Without --from/--only it asks the gates for the first
phase whose outputs are missing, broken or stale and resumes there, then runs every later
phase, stopping at the first phase whose gate fails.

Options:
  --profile NAME     settings profile: tiny (default, CPU), small (a model that learns, GPU),
                     7b (real model, GPU), 7b-random (real shapes, random weights, GPU)
  --set K=V          override a setting, e.g. --set train.lora_r=16 (repeatable)
  --workdir DIR      where models/ datasets/ benchmarks/ docs/ logs/ go (default: repo root)
  --from N           start at phase N (even if its gate passes)
  --only N           run phase N alone
  --to N             stop after phase N (with the resume or --from start)
  --gpus N           train phase 6 data-parallel on N GPUs (accelerate launch; default 1)
  --force            with neither --from nor --only: rerun everything from phase 1
  -h, --help         this help

Environment: MEDVL_PYTHON=/path/to/python uses that interpreter instead of ./.venv.
TXT
}

profile=tiny; workdir=""; from=""; only=""; to=9; force=0; gpus=1; sets=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --profile) profile="${2:?--profile needs a value}"; shift 2 ;;
    --set) sets+=(--set "${2:?--set needs K=V}"); shift 2 ;;
    --workdir) workdir="${2:?--workdir needs a folder}"; shift 2 ;;
    --from) from="${2:?--from needs a phase number}"; shift 2 ;;
    --only) only="${2:?--only needs a phase number}"; shift 2 ;;
    --to) to="${2:?--to needs a phase number}"; shift 2 ;;
    --gpus) gpus="${2:?--gpus needs a number}"; shift 2 ;;
    --force) force=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
for n in "$from" "$only" "$to"; do
  [[ -z "$n" || "$n" =~ ^[1-9]$ ]] || { echo "error: phase numbers are 1..9, got '$n'" >&2; exit 2; }
done
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || { echo "error: --gpus needs a positive number, got '$gpus'" >&2; exit 2; }

py="$("$root/scripts/ensure_venv.sh")"
# .venv has the package installed (editable); an interpreter of one's own gets it from here.
[[ -n "${MEDVL_PYTHON:-}" ]] && export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
[[ -n "$workdir" ]] && workdir="$(realpath -m "$workdir")"
cd "$root"
common=(--profile "$profile" "${sets[@]}")
[[ -n "$workdir" ]] && common+=(--workdir "$workdir")

if [[ -n "$only" ]]; then
  start="$only"; stop="$only"
elif [[ -n "$from" ]]; then
  start="$from"; stop="$to"
elif [[ "$force" == 1 ]]; then
  start=1; stop="$to"
else
  start="$("$py" -m medvl.cli.gates --first-failing "${common[@]}")"
  stop="$to"
  if [[ "$start" == 0 || "$start" -gt "$stop" ]]; then
    echo "All gates up to phase $stop pass for profile $profile: nothing to do (--force reruns everything)."
    exit 0
  fi
  echo "First failing gate: phase $start. Running phases $start..$stop."
fi

for ((n = start; n <= stop; n++)); do
  script=("$root"/scripts/0"$n"_*.py)
  if [[ ! -f "${script[0]}" ]]; then
    echo "Phase $n is not implemented yet (no scripts/0${n}_*.py): stopping here." >&2
    exit 1
  fi
  echo "=== phase $n: $(basename "${script[0]}") ==="
  launcher=("$py")
  if [[ $n == 6 && "$gpus" -gt 1 ]]; then
    launcher=("$py" -m accelerate.commands.launch --multi_gpu --num_processes "$gpus" --num_machines 1
              --mixed_precision no)
  fi
  if ! "${launcher[@]}" "${script[0]}" "${common[@]}"; then
    echo "Phase $n failed (see logs/phase$n.log). Fix it and rerun ./run_pipeline.sh: it resumes here." >&2
    exit 1
  fi
done
echo "Pipeline finished phases $start..$stop for profile $profile."
