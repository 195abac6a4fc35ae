#!/usr/bin/env bash
# The whole experiment for one dataset and model. See usage() or run with -h.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: bash scripts/run_experiment.sh DATASET MODEL [options]

Runs the whole chain for one dataset (webqa or myriadlama) and one model:
  1. paraphrase.py        WebQA only, unless --paraphrase-file is given
  2. confidence.py        per-paraphrase confidence (for the weighted methods)
  3. generate.py          per_prompt, then avg and max for each size
  4. generate.py          weighted_avg and weighted_max for each size of 2 or more
                          (needs the confidence file)
  5. flex_attention_generate.py  --fusion attention and --fusion logits --combine avg
                          (shared positions) for each flex size
  6. analysis/report_accuracy.py  table, CSV, Markdown and PNG
A step whose output file exists is skipped ("skip: <file> exists"). The script
stops at the first failing step and prints its command.
Existing results are kept: after you change --max-samples or the data, use a new
--cache-dir or delete the old files.

Options:
  --max-samples N        use only the first N questions
  --data-file F          local data file in the hub schema (instead of the hub)
  --cache-dir D          cache root (default: $SELF_ENSEMBLE_CACHE, the cluster folder, ~/.cache/self-ensemble)
  --fewshot-file F       WebQA train file for the few-shot examples
  --paraphrase-file F    WebQA paraphrase file to use (then paraphrase.py is not run)
  --device D             auto, cpu or cuda (default: auto)
  --sizes "1 2 3 5"      numbers of paraphrases to ensemble (default: "1 2 3 5")
  --flex-sizes "3 5"     numbers of paraphrases for FlexAttention (default: the largest size, if 2 or more)
  --confidence-samples N samples per paraphrase for confidence.py (default: its own, 10)
  --confidence-temperature T  sampling temperature of confidence.py (default: its own, 1.0)
  --no-confidence        do not run confidence.py; weighted methods run only if its file exists
  -h, --help             show this help

Offline: with an embedded model (smollm2_135m_it, tiny_llama, tiny_qwen2) and no
--data-file, the test fixtures are used (testing/fixtures/).

Example:
  bash scripts/run_experiment.sh webqa smollm2_135m_it --max-samples 4
EOF
}

# shellcheck source=common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

run_cmd() {  # run a command; on failure print it and stop with its exit code
    local start=$SECONDS rc=0
    echo "+ $(quote "$@")"
    "$@" || rc=$?
    if ((rc != 0)); then
        echo "FAILED (exit $rc): $(quote "$@")" >&2
        exit "$rc"
    fi
    echo "  ($((SECONDS - start)) s)"
}

run_step() {  # run_step OUTPUT COMMAND...: skip when OUTPUT exists
    local output=$1
    shift
    if [[ -e $output ]]; then
        echo "skip: $output exists"
        return 0
    fi
    run_cmd "$@" --output "$output"
}

# --- arguments ----------------------------------------------------------------

DATASET="" MODEL="" MAX_SAMPLES="" DATA_FILE="" CACHE_DIR="" FEWSHOT_FILE="" PARAPHRASE_FILE=""
DEVICE="" SIZES="1 2 3 5" FLEX_SIZES="" CONFIDENCE_SAMPLES="" CONFIDENCE_TEMPERATURE="" RUN_CONFIDENCE=1
positional=()
while (($# > 0)); do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --max-samples) MAX_SAMPLES=${2:?--max-samples needs a value}; shift 2 ;;
        --data-file) DATA_FILE=${2:?--data-file needs a value}; shift 2 ;;
        --cache-dir) CACHE_DIR=${2:?--cache-dir needs a value}; shift 2 ;;
        --fewshot-file) FEWSHOT_FILE=${2:?--fewshot-file needs a value}; shift 2 ;;
        --paraphrase-file) PARAPHRASE_FILE=${2:?--paraphrase-file needs a value}; shift 2 ;;
        --device) DEVICE=${2:?--device needs a value}; shift 2 ;;
        --sizes) SIZES=${2:?--sizes needs a value}; shift 2 ;;
        --flex-sizes) FLEX_SIZES=${2:?--flex-sizes needs a value}; shift 2 ;;
        --confidence-samples) CONFIDENCE_SAMPLES=${2:?--confidence-samples needs a value}; shift 2 ;;
        --confidence-temperature) CONFIDENCE_TEMPERATURE=${2:?--confidence-temperature needs a value}; shift 2 ;;
        --no-confidence) RUN_CONFIDENCE=0; shift ;;
        -*) die "unknown option $1" ;;
        *) positional+=("$1"); shift ;;
    esac
done
((${#positional[@]} == 2)) || die "give DATASET and MODEL (got ${#positional[@]} arguments)"
DATASET=${positional[0]}
MODEL=${positional[1]}
[[ $DATASET == webqa || $DATASET == myriadlama ]] || die "DATASET must be webqa or myriadlama, not '$DATASET'"
read -r -a sizes <<<"$SIZES"
((${#sizes[@]} > 0)) || die "--sizes is empty"
for s in "${sizes[@]}"; do
    [[ $s =~ ^[1-9][0-9]*$ ]] || die "--sizes must be positive integers, not '$s'"
done
max_size=$(printf '%s\n' "${sizes[@]}" | sort -n | tail -n 1)
flex_sizes=()
if [[ -n $FLEX_SIZES ]]; then
    read -r -a flex_sizes <<<"$FLEX_SIZES"
elif ((max_size >= 2)); then
    flex_sizes=("$max_size")
fi
for s in "${flex_sizes[@]}"; do
    [[ $s =~ ^[1-9][0-9]*$ && $s -ge 2 && $s -le $max_size ]] ||
        die "--flex-sizes must be integers from 2 to the largest size ($max_size), not '$s'"
done

# Paths given by the user stay valid after the cd to the project root.
if [[ -d $MODEL ]]; then
    MODEL=$(realpath -- "$MODEL")
fi
for var in DATA_FILE CACHE_DIR FEWSHOT_FILE PARAPHRASE_FILE; do
    if [[ -n ${!var} ]]; then
        printf -v "$var" '%s' "$(realpath -m -- "${!var}")"
    fi
done
ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

# --- output paths (from utils.default_output, not rebuilt here) --------------------

names=("per_prompt_n$max_size")
for s in "${sizes[@]}"; do
    names+=("avg_n$s" "max_n$s" "weighted_avg_n$s" "weighted_max_n$s")
done
for s in "${flex_sizes[@]}"; do
    names+=("flex_attention_shared_n$s" "flex_logits_shared_n${s}_avg")
done
helper_out=$(python - "$DATASET" "$MODEL" "$CACHE_DIR" "${names[@]}" <<'EOF'
import sys

import constants
import dataset
import utils

data, model, cache = sys.argv[1], sys.argv[2], sys.argv[3] or None
print(f"embedded\t{int(model in constants.EMBEDDED_MODELS)}")
print(f"fixture_data\t{constants.FIXTURE_FILES[data]}")
print(f"fixture_train\t{constants.FIXTURE_WEBQA_TRAIN}")
print(f"paraphrase\t{dataset.paraphrase_path(model, cache)}")
print(f"confidence\t{utils.default_output('results', data, model, 'confidence', cache)}")
for name in sys.argv[4:]:
    print(f"{name}\t{utils.default_output('results', data, model, name, cache)}")
EOF
) || {
    echo "FAILED: the python helper that computes the output paths (see the error above)" >&2
    exit 1
}
declare -A OUT
while IFS=$'\t' read -r key value; do
    OUT[$key]=$value
done <<<"$helper_out"

if [[ ${OUT[embedded]} == 1 && -z $DATA_FILE ]]; then
    DATA_FILE=${OUT[fixture_data]}
    echo "offline: $MODEL is an embedded model and no --data-file was given: using the fixture $DATA_FILE"
    if [[ $DATASET == webqa && -z $FEWSHOT_FILE ]]; then
        FEWSHOT_FILE=${OUT[fixture_train]}
        echo "offline: few-shot examples from the fixture $FEWSHOT_FILE"
    fi
fi

# Flags every CLI shares.
common=(--dataset "$DATASET" --model "$MODEL")
[[ -n $MAX_SAMPLES ]] && common+=(--max-samples "$MAX_SAMPLES")
[[ -n $DATA_FILE ]] && common+=(--data-file "$DATA_FILE")
[[ -n $CACHE_DIR ]] && common+=(--cache-dir "$CACHE_DIR")
[[ -n $DEVICE ]] && common+=(--device "$DEVICE")
inputs=()  # data flags of the answer CLIs
[[ -n $FEWSHOT_FILE ]] && inputs+=(--fewshot-file "$FEWSHOT_FILE")

echo "== $DATASET / $MODEL: sizes ${sizes[*]}, flex sizes ${flex_sizes[*]:-none}; results in $(dirname -- "${OUT[per_prompt_n$max_size]}")"

# 1. paraphrases
if [[ $DATASET == webqa ]]; then
    if [[ -z $PARAPHRASE_FILE ]]; then
        PARAPHRASE_FILE=${OUT[paraphrase]}
        run_step "$PARAPHRASE_FILE" python paraphrase.py "${common[@]}" "${inputs[@]}"
    else
        echo "paraphrases: $PARAPHRASE_FILE (given)"
    fi
    inputs+=(--paraphrase-file "$PARAPHRASE_FILE")
fi

# 2. confidence
confidence=${OUT[confidence]}
if ((RUN_CONFIDENCE)); then
    extra=(--num-paraphrases "$max_size")
    [[ -n $CONFIDENCE_SAMPLES ]] && extra+=(--num-samples "$CONFIDENCE_SAMPLES")
    [[ -n $CONFIDENCE_TEMPERATURE ]] && extra+=(--temperature "$CONFIDENCE_TEMPERATURE")
    run_step "$confidence" python confidence.py "${common[@]}" "${inputs[@]}" "${extra[@]}"
fi

# 3. per_prompt, avg, max
run_step "${OUT[per_prompt_n$max_size]}" python generate.py "${common[@]}" "${inputs[@]}" \
    --method per_prompt --num-ensemble "$max_size"
for s in "${sizes[@]}"; do
    for method in avg max; do
        run_step "${OUT[${method}_n$s]}" python generate.py "${common[@]}" "${inputs[@]}" --method "$method" --num-ensemble "$s"
    done
done

# 4. weighted methods (one paraphrase needs no weights)
if [[ -e $confidence ]]; then
    for s in "${sizes[@]}"; do
        ((s >= 2)) || continue
        for method in weighted_avg weighted_max; do
            run_step "${OUT[${method}_n$s]}" python generate.py "${common[@]}" "${inputs[@]}" \
                --method "$method" --num-ensemble "$s" --confidence-file "$confidence"
        done
    done
else
    echo "skip: weighted methods (no confidence file $confidence)"
fi

# 5. FlexAttention (flex_attention_generate.py runs eagerly on CPU by itself)
for s in "${flex_sizes[@]}"; do
    run_step "${OUT[flex_attention_shared_n$s]}" python flex_attention_generate.py "${common[@]}" "${inputs[@]}" \
        --num-paraphrases "$s" --fusion attention --positions shared
    run_step "${OUT[flex_logits_shared_n${s}_avg]}" python flex_attention_generate.py "${common[@]}" "${inputs[@]}" \
        --num-paraphrases "$s" --fusion logits --positions shared --combine avg
done

# 6. report
report=(--dataset "$DATASET" --model "$MODEL")
[[ -n $CACHE_DIR ]] && report+=(--cache-dir "$CACHE_DIR")
run_cmd python analysis/report_accuracy.py "${report[@]}"
