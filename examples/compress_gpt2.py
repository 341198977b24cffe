"""Compress a GPT-2 checkpoint with every method in tnjax.compress and compare them at equal size.

  python examples/compress_gpt2.py --model DIR --train train.txt --valid valid.txt [--out runs/compress]

DIR is a Hugging Face GPT-2 directory (config.json, model.safetensors and the
tokenizer files) or a tnjax model directory. With --smoke it first trains a
tiny dense GPT on the packaged sample text (CPU, under a minute) and uses that.
Prints a table (perplexity against the fraction of attention + MLP weights
kept) and writes perplexity.png.
"""

import argparse
import pathlib
import tempfile

import numpy as np

from tnjax.compress import heal, modegpt_compress, mpo_compress, quantize_int8, svd_compress, tensorgpt_embedding
from tnjax.compress.report import plot_sweep, summary
from tnjax.data import SAMPLE_DIR, eval_batches, load_tokenizer
from tnjax.eval import perplexity
from tnjax.interop import load_any


def tiny_model(out: pathlib.Path) -> pathlib.Path:
  """A small dense GPT trained for a few steps: stands in for a real checkpoint in the smoke run."""
  from tnjax.train import TrainConfig, train

  train(TrainConfig(steps=15, warmup=3, layers={}, eval_every=15, out_dir=str(out)), progress=False)
  return out / "model"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", help="Hugging Face GPT-2 or tnjax model directory (with its tokenizer)")
  parser.add_argument("--train", default=str(SAMPLE_DIR / "train.txt"), help="calibration and healing text")
  parser.add_argument("--valid", default=str(SAMPLE_DIR / "valid.txt"), help="validation text")
  parser.add_argument("--ratios", default="0.5,0.7,0.9", help="fractions of the attention + MLP weights kept")
  parser.add_argument("--block-size", type=int, default=256)
  parser.add_argument("--heal-steps", type=int, default=100)
  parser.add_argument("--out", default=None)
  parser.add_argument("--smoke", action="store_true")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out or tempfile.mkdtemp())
  out.mkdir(parents=True, exist_ok=True)
  if args.smoke:
    args.model = args.model or str(tiny_model(out / "tiny"))
    args.ratios, args.heal_steps, args.block_size = "0.5", 3, 64
  if args.model is None:
    parser.error("--model is required (or --smoke)")

  # 1. The model, its tokenizer, and token ids of the text.
  model, tok = load_any(args.model), load_tokenizer(args.model)
  encode = lambda path: np.asarray(tok.encode(pathlib.Path(path).read_text(encoding="utf-8")).ids)
  train_ids, valid_ids = encode(args.train), encode(args.valid)[:20_000]
  block = min(args.block_size, model.config.block_size)
  ppl = lambda m: perplexity(m, valid_ids, block_size=block)["perplexity"]
  base = ppl(model)
  print(f"{model.num_params:,} parameters, validation perplexity {base:.2f}")

  # 2. The attention and MLP projections at several sizes, by each method.
  calib = [x for x, _ in eval_batches(train_ids, 4, 8, block)]   # MoDeGPT: a few batches of text
  methods = {"svd": lambda r: svd_compress(model, ratio=r),
             "mpo": lambda r: mpo_compress(model, ratio=r),
             "modegpt": lambda r: modegpt_compress(model, calib, ratio=r)}
  names = [f"h.{i}.{p}" for i in range(model.config.n_layer)
           for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
  rows = []
  print(f"{'method':<10} {'kept':>6} {'perplexity':>11}")
  for method, make in methods.items():
    for r in (float(x) for x in args.ratios.split(",")):
      small = make(r)
      rows.append({"method": method, "kept": summary(model, small, names)["part_kept"], "perplexity": ppl(small)})
      print(f"{method:<10} {rows[-1]['kept']:>6.3f} {rows[-1]['perplexity']:>11.2f}")

  # 3. CompactifAI's pipeline: MPO, a short healing fine-tune, then int8 weights.
  healed = heal(mpo_compress(model, ratio=0.7), train_ids, args.heal_steps, lr=3e-4, block_size=block)
  final = quantize_int8(healed)
  s = summary(model, final, names)
  print(f"mpo 0.7 + heal + int8: perplexity {ppl(final):.2f}, {s['bytes_before']:,} -> {s['bytes_after']:,} bytes")

  # 4. TensorGPT: the embedding, one MPS per token row, by rank.
  for rank in (1, 2) if args.smoke else (1, 4, 16):
    small = tensorgpt_embedding(model, rank=rank)
    print(f"tensorgpt rank {rank:>2}: embedding {summary(model, small, ['embedding'])['part_compression']:.1f}x "
          f"smaller, perplexity {ppl(small):.2f}")

  plot_sweep(rows, out / "perplexity.png", baseline=base, title="attention + MLP compressed")
  print(f"plot: {out / 'perplexity.png'}")


if __name__ == "__main__":
  main()
