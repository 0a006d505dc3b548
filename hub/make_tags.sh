#!/usr/bin/env bash
# How every published tag (veloxseg.variants.PUBLISHED) was made, on a 2-core CPU machine: one torch
# thread per run, at most two runs at once, each under GNU time for its CPU hours. Run from the
# repository root after `bash .ci/install` and `apt-get install mricron-data` (INIA19 for the SSL
# corpus; Colin27 stays out of every tag's training: it is benchmarks/finetune.py's held-out task, and
# its test scans score the SSL tags' reconstruction).
#
#   bash hub/make_tags.sh data     # the three training sets
#   bash hub/make_tags.sh train    # every run (resumable: a run that stops is continued with --resume;
#                                  # SKIP="veloxseg_tiny.petct ..." leaves runs out)
#   bash hub/make_tags.sh tags     # hub/<tag>/ from the runs; then paste the printed entries into PUBLISHED
#                                  # and run python hub/tags_table.py --write (cards, tables, hashes)
#   bash hub/make_tags.sh heldout  # the tissue tags on Colin27 (no fine-tuning at 1-3 mm; fine-tuning
#                                  # against scratch); then `tags` and --write again put the numbers on them
set -euo pipefail
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
DATA=${DATA:-/tmp/data} RUNS=${RUNS:-/tmp/runs} PY=${PY:-.venv/bin/python}

# 64^3 ROI throughout: at 96^3 a step of veloxseg_small costs about 3 CPU s here, of base 8 s.
# Every run trains at its data's spacing fingerprint (the trainer's default), recorded in the tag.
# PET/CT: each variant has two lesion tags, one trained on PET/CT as it comes (the best on PET/CT) and one with
# modality dropout (_anymod: it segments PET/CT, PET alone or CT alone, a little worse on PET/CT:
# benchmarks/results/missing_modality-petct.md), with the same budget.
# MNI152: cases synthesised from the template's tissue maps at 2 mm and SynthSeg-style domain randomisation, so
# the tissue tags work on T1 brains of other sources (at 3 mm they did less well on Colin27:
# benchmarks/experiments/brain-generalisation/README.md).
PETCT="--data $DATA/petct --roi 64 --checkpoint-every 100 --seed 0"
ANYMOD="$PETCT --modality-dropout 0.5"
MNI152="--data $DATA/mni152_2mm --roi 64 --checkpoint-every 100 --seed 0 --domain-randomisation"
SSL="--stage pretrain --data $DATA/ssl --mask-ratio 0.5 --roi 64 --checkpoint-every 100 --seed 0"

run() {  # run NAME FLAGS...: one training run into $RUNS/NAME, its log (with GNU time's report) in $RUNS/NAME.log
    local name=$1; shift
    [[ " ${SKIP:-} " == *" $name "* ]] && return 0  # SKIP="NAME ...": runs left out (their tag already made)
    # the published tags' license (a run's own default is "other"); the MNI152 and SSL data's NOTICE goes with them
    /usr/bin/time -v $PY examples/train.py --no-progress --license apache-2.0 --output-dir "$RUNS/$name" "$@" \
        > "$RUNS/$name.log" 2>&1 ||
        /usr/bin/time -v $PY examples/train.py --no-progress --license apache-2.0 --output-dir "$RUNS/$name" --resume \
            "$@" >> "$RUNS/$name.log" 2>&1
}

tag() {  # tag RUN TAG ABOUT [make_tag.py flags]
    local run=$1 name=$2 about=$3; shift 3
    [[ " ${SKIP:-} " == *" $run "* ]] && return 0
    $PY hub/make_tag.py "$RUNS/$run" "$name" --about "$about" --time-log "$RUNS/$run.log" --license apache-2.0 "$@"
}

case ${1:-} in
data)
    "$(dirname "$PY")/veloxseg" demo-data "$DATA/petct" --num-train 48 --num-test 8 --seed 0
    $PY examples/prepare_brain_templates.py "$DATA/mni152_2mm" --num-train 64 --num-test 8 --seed 0 --synthesise --resolution 2
    $PY examples/prepare_ssl_corpus.py "$DATA/ssl" --seed 0
    $PY examples/prepare_brain_templates.py "$DATA/colin27" --template colin27 --num-train 16 --num-test 4 --seed 0
    ;;
train)
    mkdir -p "$RUNS"
    {
        run veloxseg_small.petct --model veloxseg_small $PETCT --max-steps 1500 --val-every 500
        run veloxseg_small.petct_anymod --model veloxseg_small $ANYMOD --max-steps 1500 --val-every 500
        run veloxseg_small.mni152 --model veloxseg_small $MNI152 --max-steps 4500 --val-every 1500
        run veloxseg_small.ssl --model veloxseg_small $SSL --max-steps 1500 --val-every 500
    } &
    {
        run veloxseg_tiny.ssl --model veloxseg_tiny $SSL --max-steps 600 --val-every 300
        run veloxseg_base.petct --model veloxseg_base $PETCT --max-steps 600 --val-every 300
        run veloxseg_base.petct_anymod --model veloxseg_base $ANYMOD --max-steps 600 --val-every 300
        run veloxseg_base.ssl --model veloxseg_base $SSL --max-steps 500 --val-every 500
        run veloxseg_small_hr.petct --model veloxseg_small_hr $PETCT --max-steps 1200 --val-every 400
        run veloxseg_small_hr.petct_anymod --model veloxseg_small_hr $ANYMOD --max-steps 1200 --val-every 400
        run veloxseg_small_hr.mni152 --model veloxseg_small_hr $MNI152 --max-steps 4500 --val-every 1500
        run veloxseg_small_hr.ssl --model veloxseg_small_hr $SSL --max-steps 1000 --val-every 500
        run veloxseg_tiny.petct --model veloxseg_tiny $PETCT --max-steps 2000 --val-every 500
        run veloxseg_tiny.petct_anymod --model veloxseg_tiny $ANYMOD --max-steps 2000 --val-every 500
    } &
    wait
    ;;
tags)
    petct="Lesion segmentation on the built-in synthetic PET/CT data: CT and PET as two modality groups, the paper's AutoPET-II shape. It needs both: for PET or CT alone use its twin trained with modality dropout, petct_lesions_anymod."
    anymod="Lesion segmentation on the built-in synthetic PET/CT data: CT and PET as two modality groups, the paper's AutoPET-II shape, trained with modality dropout 0.5: it segments PET/CT, PET alone or CT alone (on PET/CT the petct_lesions tag is more accurate)."
    mni="Grey / white matter segmentation of skull-stripped T1 brain MRI at any resolution (resampled to 2 mm), trained on cases synthesised from the MNI152 2009a tissue maps (random tissue borders, intensities, blur, partial volume) with SynthSeg-style domain randomisation in training, 64^3 ROI. The colin27_* metrics are on a T1 brain no tag was trained on (Colin27): without fine-tuning at 1-3 mm (benchmarks/brain_generalisation.py), and fine-tuned for 150 steps against scratch (benchmarks/finetune.py)."
    ssl="Self-supervised generalist (stage pretrain, masked-volume reconstruction by the teachers, no labels) on one-channel scans: synthetic CT and PET, the MNI152 T1 at 1-3 mm, the INIA19 macaque T1. Its decoder and head are untrained: fine-tune it (--stage finetune)."
    petct_data=(--test-data "$DATA/petct" --data-command "veloxseg demo-data $DATA/petct --num-train 48 --num-test 8 --seed 0")
    mni_data=(--test-data "$DATA/mni152_2mm" --notice "$DATA/mni152_2mm/NOTICE.txt"
              --data-command "python examples/prepare_brain_templates.py $DATA/mni152_2mm --num-train 64 --num-test 8 --seed 0 --synthesise --resolution 2")
    ssl_data=(--test-data "$DATA/colin27" --notice "$DATA/ssl/NOTICE.txt" --data-command "python examples/prepare_ssl_corpus.py $DATA/ssl --seed 0")
    for variant in veloxseg_tiny veloxseg_small veloxseg_base veloxseg_small_hr; do
        tag $variant.petct $variant.petct_lesions "$petct" "${petct_data[@]}"
        tag $variant.petct_anymod $variant.petct_lesions_anymod "$anymod" "${petct_data[@]}"
        tag $variant.ssl $variant.ssl_generalist "$ssl" "${ssl_data[@]}"
    done
    for variant in veloxseg_small veloxseg_small_hr; do  # their Colin27 numbers once `heldout` has run
        colin27=$($PY hub/colin27_metrics.py $variant 2>/dev/null || true)
        tag $variant.mni152 $variant.mni152_tissue "$mni" "${mni_data[@]}" $colin27
    done
    ;;
heldout)  # the tissue tags on Colin27 (seen by no tag): then `tags` again records the numbers in them
    $PY benchmarks/brain_generalisation.py --models veloxseg_small veloxseg_small_hr --resolutions 1 1.5 2 3 \
        --out benchmarks/results/brain-generalisation
    $PY benchmarks/brain_generalisation.py --models veloxseg_small veloxseg_small_hr --resolutions 1 1.5 2 3 --tta \
        --out benchmarks/results/brain-generalisation-tta
    for variant in veloxseg_small veloxseg_small_hr; do
        $PY benchmarks/finetune.py --data "$DATA/colin27" --variant $variant --starts scratch mni152_tissue --seed 0 1 2 \
            --out benchmarks/results/finetune-colin27-$variant
    done
    ;;
*)
    echo "usage: bash hub/make_tags.sh data|train|tags|heldout" >&2
    exit 2
    ;;
esac
