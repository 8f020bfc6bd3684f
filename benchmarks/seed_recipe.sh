#!/usr/bin/env bash
# The seed recipe end to end on a data root, as a new user runs it: stats -> lr-find -> fit (OneCycle to the
# suggested LR) -> test; then the per-epoch table. Test accuracy is also measured after every epoch
# (TestEveryEpoch, for the learning curve only: checkpoints are still chosen on the validation split).
#
#   benchmarks/seed_recipe.sh /tmp/cifar10-jpeg 8 runs/bench
set -euo pipefail
root=${1:?usage: $0 DATA_ROOT [EPOCHS] [RUN_DIR]}
epochs=${2:-24}
runs=${3:-runs/bench}
echo "== $(date -u '+%Y-%m-%d %H:%M UTC') on $(nproc) cores: $(lscpu | sed -n 's/^Model name: *//p')"
time cifarlab stats --data.root "$root" --run.dir "$runs" --out "$runs/stats"
time cifarlab lr-find --config configs/seed.yaml --data.root "$root" --run.dir "$runs"
time cifarlab fit --config configs/seed.yaml --config "$runs/seed/lr_find/suggested_lr.yaml" --data.root "$root" \
    --run.dir "$runs" --trainer.max_epochs "$epochs" --trainer.enable_progress_bar false \
    --trainer.callbacks+=cifarlab.callbacks.TestEveryEpoch
python benchmarks/summarize_run.py "$(ls -d "$runs"/seed/version_* | sort -V | tail -1)"
