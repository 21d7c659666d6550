#!/bin/bash
# Submit a job script N times in a dependency chain: each job starts when the previous one has ended (whatever
# its exit code) and continues the run with --resume auto; once the run is finished the remaining jobs exit 0
# at once. REQUEUE=0 is exported so that a stopped job does not also requeue itself.
#
#   DATA=/data/totalseg_prepared OUT=runs/pre_B scripts/slurm/chain.sh 5 scripts/slurm/pretrain_1node.sbatch
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: $0 N JOB_SCRIPT [sbatch options...]" >&2
    exit 2
fi
n=$1
script=$2
shift 2

prev=$(sbatch --parsable --export=ALL,REQUEUE=0 "$@" "$script")
echo "submitted $prev"
for _ in $(seq 2 "$n"); do
    prev=$(sbatch --parsable --export=ALL,REQUEUE=0 --dependency=afterany:"$prev" "$@" "$script")
    echo "submitted $prev (after the previous job)"
done
