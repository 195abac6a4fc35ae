#!/usr/bin/env bash
# Run a list of jobs on the visible GPUs, one job per GPU at a time. See usage() or run with -h.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: bash scripts/run_on_gpus.sh [--dry-run] [--log-dir DIR] JOB_FILE

Runs the jobs of JOB_FILE on the GPUs, one job per GPU at a time, and waits for all.
Each job gets CUDA_VISIBLE_DEVICES set to its GPU and a log file of its own.
The exit status is 1 when a job failed; the failed jobs are listed at the end.

JOB_FILE: one job per line, "DATASET MODEL METHOD [extra arguments]".
Empty lines and lines starting with # are ignored. Arguments are split at spaces
(no quotes). METHOD is one of:
  per_prompt avg max weighted_avg weighted_max   python generate.py --method METHOD
  flex_attention | flex_logits                   python flex_attention_generate.py --fusion attention | logits
  paraphrase | confidence                        python paraphrase.py | confidence.py
  experiment                                     bash scripts/run_experiment.sh DATASET MODEL
  report | diversity                             python analysis/report_accuracy.py | report_diversity.py
DATASET and MODEL are passed as --dataset/--model (positional for experiment).

Example line:  webqa qwen2.5_3b_it avg --num-ensemble 3

GPUs: $GPUS (like "0 1 2" or "0,1,2"), else $CUDA_VISIBLE_DEVICES, else nvidia-smi.

Options:
  --dry-run      print the command of each job and its GPU; run nothing
  --log-dir DIR  folder of the log files (default: logs/gpus-<date>-<time>)
  -h, --help     show this help
Environment: POLL_SECONDS (default 2): how often to look for a free GPU.
EOF
}

# shellcheck source=common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

job_command() {  # job_command DATASET MODEL METHOD [EXTRA...]: the command, one word per line
    local dataset=$1 model=$2 method=$3
    shift 3
    local -a cmd
    case $method in
        per_prompt | avg | max | weighted_avg | weighted_max)
            cmd=(python generate.py --dataset "$dataset" --model "$model" --method "$method") ;;
        flex_attention) cmd=(python flex_attention_generate.py --dataset "$dataset" --model "$model" --fusion attention) ;;
        flex_logits) cmd=(python flex_attention_generate.py --dataset "$dataset" --model "$model" --fusion logits) ;;
        paraphrase) cmd=(python paraphrase.py --dataset "$dataset" --model "$model") ;;
        confidence) cmd=(python confidence.py --dataset "$dataset" --model "$model") ;;
        experiment) cmd=(bash scripts/run_experiment.sh "$dataset" "$model") ;;
        report) cmd=(python analysis/report_accuracy.py --dataset "$dataset" --model "$model") ;;
        diversity) cmd=(python analysis/report_diversity.py --dataset "$dataset" --model "$model") ;;
        *) return 1 ;;
    esac
    printf '%s\n' "${cmd[@]}" "$@"
}

list_gpus() {  # GPU ids, one per line
    local list=${GPUS:-${CUDA_VISIBLE_DEVICES:-}}
    if [[ -n $list ]]; then
        local -a ids
        read -r -a ids <<<"${list//,/ }"
        printf '%s\n' "${ids[@]}"
    elif command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=index --format=csv,noheader
    fi
}

# --- arguments ----------------------------------------------------------------

DRY_RUN=0 LOG_DIR="" JOB_FILE=""
while (($# > 0)); do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --dry-run) DRY_RUN=1; shift ;;
        --log-dir) LOG_DIR=${2:?--log-dir needs a value}; shift 2 ;;
        -*) die "unknown option $1" ;;
        *) [[ -z $JOB_FILE ]] || die "give one JOB_FILE"; JOB_FILE=$1; shift ;;
    esac
done
[[ -n $JOB_FILE ]] || die "give a JOB_FILE"
[[ -f $JOB_FILE ]] || die "job file $JOB_FILE does not exist"
POLL_SECONDS=${POLL_SECONDS:-2}

mapfile -t gpus < <(list_gpus)
((${#gpus[@]} > 0)) || die "no GPU found (nvidia-smi). Set GPUS, for example GPUS=\"0 1\""

# Read and check every job before starting any.
jobs_line=() jobs_cmd=()
line_no=0
while IFS= read -r line || [[ -n $line ]]; do
    line_no=$((line_no + 1))
    read -r -a words <<<"$line"
    ((${#words[@]} > 0)) || continue
    [[ ${words[0]} == \#* ]] && continue
    ((${#words[@]} >= 3)) || die "$JOB_FILE line $line_no: need DATASET MODEL METHOD, got: $line"
    cmd_text=$(job_command "${words[@]}") || die "$JOB_FILE line $line_no: unknown METHOD '${words[2]}'"
    jobs_line+=("${words[*]}")
    jobs_cmd+=("$cmd_text")
done <"$JOB_FILE"
((${#jobs_line[@]} > 0)) || die "$JOB_FILE has no jobs"

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
LOG_DIR=$(realpath -m -- "${LOG_DIR:-$ROOT/logs/gpus-$(date +%Y%m%d-%H%M%S)}")
cd "$ROOT"

log_file() {  # log_file INDEX: the log path of job INDEX
    local -a words
    read -r -a words <<<"${jobs_line[$1]}"
    local name
    name=$(printf 'job%02d_%s_%s_%s' $(($1 + 1)) "${words[0]}" "${words[1]}" "${words[2]}")
    echo "$LOG_DIR/${name//\//__}.log"
}

echo "${#jobs_line[@]} jobs on ${#gpus[@]} GPUs (${gpus[*]}); logs in $LOG_DIR"

if ((DRY_RUN)); then
    for i in "${!jobs_line[@]}"; do
        mapfile -t cmd <<<"${jobs_cmd[$i]}"
        gpu=${gpus[$((i % ${#gpus[@]}))]}
        echo "[gpu $gpu] CUDA_VISIBLE_DEVICES=$gpu $(quote "${cmd[@]}") > $(log_file "$i")"
    done
    exit 0
fi

mkdir -p "$LOG_DIR"

# --- run ------------------------------------------------------------------------

declare -A slot_job  # GPU -> index of its running job
start_job() {  # start_job INDEX GPU
    local i=$1 gpu=$2 log status
    local -a cmd
    mapfile -t cmd <<<"${jobs_cmd[$i]}"
    log=$(log_file "$i")
    status=${log%.log}.status
    rm -f "$status" "${log%.log}.pid"
    echo "start job $((i + 1)) on GPU $gpu: ${jobs_line[$i]}"
    (
        set +e
        {
            echo "# job $((i + 1)): ${jobs_line[$i]}"
            echo "# command: CUDA_VISIBLE_DEVICES=$gpu $(quote "${cmd[@]}")"
            echo "# start: $(date +%s.%N)"
        } >"$log"
        CUDA_VISIBLE_DEVICES=$gpu "${cmd[@]}" >>"$log" 2>&1 </dev/null &
        echo $! >"${log%.log}.pid"
        wait $!
        rc=$?
        echo "# end: $(date +%s.%N) exit $rc" >>"$log"
        echo "$rc" >"$status"
    ) &
    slot_job[$gpu]=$i
}

job_done() {  # job_done INDEX: true when the job wrote its exit status
    local log
    log=$(log_file "$1")
    [[ -s ${log%.log}.status ]]
}

stop_all() {  # Ctrl-C: stop the running jobs (the ones this script started), then exit
    echo "Stopping the running jobs ..." >&2
    local gpu log
    for gpu in "${!slot_job[@]}"; do
        log=$(log_file "${slot_job[$gpu]}")
        if ! job_done "${slot_job[$gpu]}" && [[ -s ${log%.log}.pid ]]; then
            kill "$(cat "${log%.log}.pid")" 2>/dev/null || true
        fi
    done
    wait || true
    exit 130
}
trap stop_all INT TERM

next=0
while ((next < ${#jobs_line[@]})); do
    free=""
    for gpu in "${gpus[@]}"; do
        if [[ -z ${slot_job[$gpu]:-} ]] || job_done "${slot_job[$gpu]}"; then
            free=$gpu
            break
        fi
    done
    if [[ -z $free ]]; then
        sleep "$POLL_SECONDS"
        continue
    fi
    start_job "$next" "$free"
    next=$((next + 1))
done
wait

# --- summary --------------------------------------------------------------------

failed=0
for i in "${!jobs_line[@]}"; do
    log=$(log_file "$i")
    rc=$(cat "${log%.log}.status" 2>/dev/null || echo "?")
    rm -f "${log%.log}.status" "${log%.log}.pid"
    if [[ $rc != 0 ]]; then
        failed=$((failed + 1))
        echo "FAILED (exit $rc): job $((i + 1)): ${jobs_line[$i]}  (log: $log)" >&2
    fi
done
echo "Done: ${#jobs_line[@]} jobs, $((${#jobs_line[@]} - failed)) ok, $failed failed. Logs in $LOG_DIR"
((failed == 0))
