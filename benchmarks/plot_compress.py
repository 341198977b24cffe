"""Figures of the compression study from its JSON lines (bench_compress.py): training-free and healed, zoomed.

Run: python benchmarks/plot_compress.py benchmarks/results/compress_study_h100.jsonl docs/results/
"""

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from tnjax.compress.report import plot_sweep


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("jsonl")
  parser.add_argument("out_dir")
  args = parser.parse_args()
  rows = [json.loads(line) for line in pathlib.Path(args.jsonl).read_text().splitlines() if line.strip()]
  base = next(r["perplexity"] for r in rows if r["method"] == "dense")
  study = [r for r in rows if r["bench"] == "compress_study" and "ratio" in r and "tensorgpt" not in r["method"]]
  free = [r for r in study if "heal" not in r["method"]]
  healed = [r for r in study if "heal" in r["method"]]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  top = 2.0 * base
  plot_sweep(free, None, baseline=base, title="training-free", ylim=(0.95 * base, top), ax=axes[0])
  plot_sweep(healed, None, baseline=base, title="healed (200 steps)", ylim=(0.95 * base, top), ax=axes[1])
  fig.suptitle(f"attention + MLP of a trained 6-layer GPT (dense ppl {base:.2f}; ^ = off the chart)")
  fig.tight_layout()
  out = pathlib.Path(args.out_dir) / "compress_perplexity_vs_kept.png"
  fig.savefig(out, dpi=110)
  print(out)


if __name__ == "__main__":
  main()
