#!/bin/bash
# The compression study on one GPU machine (run from the repository root): decompress corpus-large from
# .data/, train the dense 12 x 768 model on every GPU (data parallel) unless it exists, then run
# benchmarks/compress_study.py with one shard per GPU, resuming finished jobs, and copy the results to $1.
# Usage: bash benchmarks/study/compress_gpu.sh OUT [GPUS] [SECONDS] [compress_study.py options, e.g. --only ...]
set -u
OUT=$1; GPUS=${2:-1}; LIMIT=${3:-540}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
end=$((SECONDS + LIMIT))
mkdir -p /tmp/corpus /tmp/cs
for f in train valid test; do [ -f /tmp/corpus/$f.txt ] || xz -dkc .data/$f.txt.xz > /tmp/corpus/$f.txt; done
if [ ! -f /tmp/cs/dense/best_model/config.json ]; then
  python -m tnjax train --config benchmarks/study/compress_dense.toml --no-progress \
    --set 'train_files=["/tmp/corpus/train.txt"]' --set 'valid_files=["/tmp/corpus/valid.txt"]' \
    --set 'test_files=["/tmp/corpus/test.txt"]' --set tokenizer=.data/bpe8192.json --set out_dir=/tmp/cs/dense \
    > /tmp/cs/train.log 2>&1
  tail -3 /tmp/cs/train.log; cp /tmp/cs/dense/report.json "$OUT/dense_report.json"
  echo "trained (with tokenization and evaluations) in $SECONDS s"
fi
data="--model /tmp/cs/dense/best_model --tokenizer .data/bpe8192.json --train /tmp/corpus/train.txt \
  --valid /tmp/corpus/valid.txt --test /tmp/corpus/test.txt --out /tmp/cs/study --cache /tmp/cs/dense/cache"
for k in $(seq 0 $((GPUS - 1))); do
  CUDA_VISIBLE_DEVICES=$k timeout $((end - SECONDS)) python benchmarks/compress_study.py $data \
    --shard $k/$GPUS "${@:4}" > /tmp/cs/shard$k.log 2>&1 &
done
wait
echo "jobs ran until $SECONDS s"
for k in $(seq 0 $((GPUS - 1))); do grep -v '^{' /tmp/cs/shard$k.log | tail -4; done
python benchmarks/compress_study.py --summarize /tmp/cs/study > /dev/null
tar -czf "$OUT/study.tgz" -C /tmp/cs study train.log $(cd /tmp/cs && ls shard*.log)
cp /tmp/cs/study/summary.md "$OUT/"; cp /tmp/cs/study/eval_timing.json "$OUT/" 2>/dev/null || true
