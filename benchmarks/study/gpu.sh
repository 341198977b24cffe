#!/bin/bash
# The study on one GPU machine (run from the repository root): decompress corpus-large from .data/, run
# the small grid, then the large one with the small one's learning rates, then copy the small files
# (reports, metrics, logs, summaries, plots; not checkpoints or models) to $1/study.tgz.
# With a fourth argument, GRID (a grid TOML), it runs (or resumes) only that grid, into .study/<its name>.
# Usage: bash benchmarks/study/gpu.sh OUT [DEVICES] [SECONDS] [GRID]
set -u
OUT=$1; DEVICES=${2:-0}; LIMIT=${3:-540}; GRID=${4:-}
export PYTHONPATH=$PWD
mkdir -p /tmp/corpus
for f in train valid test; do [ -f /tmp/corpus/$f.txt ] || xz -dkc .data/$f.txt.xz > /tmp/corpus/$f.txt; done
TOK=""; [ -f .data/bpe8192.json ] && TOK="--tokenizer .data/bpe8192.json"
data="--train /tmp/corpus/train.txt --valid /tmp/corpus/valid.txt --test /tmp/corpus/test.txt $TOK"
end=$((SECONDS + LIMIT))
if [ -n "$GRID" ]; then
  name=$(basename "$GRID" .toml)
  timeout $((end - SECONDS)) python benchmarks/pretrain_study.py --grid "$GRID" $data --out .study/$name \
    --devices "$DEVICES"
  pkill -f 'pretrain_study.py --run-one'  # a run the time limit cut: its process outlives the killed driver
  python benchmarks/pretrain_study.py --plot .study/$name --out .study/$name-plots
else
timeout $((end - SECONDS)) python benchmarks/pretrain_study.py --grid benchmarks/study/small.toml $data \
  --out .study/small --devices "$DEVICES" && \
timeout $((end - SECONDS)) python benchmarks/pretrain_study.py --grid benchmarks/study/large.toml $data \
  --out .study/large --lr-from .study/small --devices "$DEVICES"
python benchmarks/pretrain_study.py --plot .study/small $( [ -f .study/large/results.jsonl ] && echo .study/large ) \
  --out .study/plots
fi
cd .study && find . \( -name report.json -o -name metrics.jsonl -o -name train_config.json -o -name log.txt \
  -o -name 'summary.*' -o -name results.jsonl -o -name '*.png' \) -not -path '*/model/*' -not -path '*/best_model/*' \
  | tar -czf "$OUT/study.tgz" -T -  # one file: the device tool returns no deep folders
