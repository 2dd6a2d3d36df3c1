#!/usr/bin/env bash
# Train every (dataset, backbone, seed) of the ID-only baseline grid as parallel processes (one GPU host or a
# big CPU), then collect the per-run metrics.json into one table.
# usage: scripts/srs_grid.sh OUT_DIR DATASET... ; env BACKBONES, SEEDS, LLMEMB (the command, default `llmemb`)
set -euo pipefail
out=$1; shift
backbones=${BACKBONES:-sasrec gru4rec bert4rec}
seeds=${SEEDS:-42 43 44}
llmemb=${LLMEMB:-llmemb}
mkdir -p "$out/logs"
for ds in "$@"; do
  $llmemb data prepare --dataset "$ds" > "$out/logs/prepare-$(basename "$ds").log"  # build the cache once
done
pids=()
for ds in "$@"; do for bb in $backbones; do for seed in $seeds; do
  $llmemb train srs --dataset "$ds" --backbone "$bb" --seeds "$seed" --out "$out/runs" \
    > "$out/logs/$(basename "$ds")-$bb-$seed.log" 2>&1 &
  pids+=($!)
done; done; done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
$llmemb report collect "$out/runs"
exit $status
