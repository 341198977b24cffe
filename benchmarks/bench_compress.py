"""Compression benchmarks: quality of every method on a trained GPT, compression time and generation speed.

Study (``--model DIR``, a trained tnjax model with its tokenizer): SVD, MPO
(CompactifAI), MoDeGPT at ratios keeping 50/70/90% of the attention and MLP
weights, each also healed; CompactifAI's full pipeline (MPO + heal + int8);
TensorGPT on the embedding; per-layer MPO sensitivity. Validation
perplexity for each, written as JSON lines, a Markdown table and a plot.

Timing: a GPT-2 124M-shaped model with random weights: wall time of each
method (first call, with compilation, and second call), and KV-cached
generation tokens/s of compressed models against the dense one at batch 1
and 16, in one run.

Run:
  python benchmarks/bench_compress.py --smoke
  python benchmarks/bench_compress.py --model runs/corpus-dense/model --train .data/corpus/train.txt \\
      --valid .data/corpus/valid.txt --out-dir results/compress
"""

import argparse
import functools
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tnjax.compress import (
    heal,
    input_grams,
    layer_sensitivity,
    modegpt_compress,
    mpo_compress,
    quantize_int8,
    svd_compress,
    svdllm_compress,
    tensorgpt_embedding,
)
from tnjax.compress.report import compressed_part, plot_sweep, summary
from tnjax.data import eval_batches, load_tokenizer
from tnjax.eval import perplexity
from tnjax.interop import load_model
from tnjax.models import GPT, generate, preset

from _common import emit, environment


def _ids(tok, path, limit=None):
  ids = np.asarray(tok.encode(pathlib.Path(path).read_text(encoding="utf-8")).ids, np.int32)
  return ids if limit is None else ids[:limit]


def _timed(fn):
  start = time.perf_counter()
  out = fn()
  jax.block_until_ready(jax.tree_util.tree_leaves(nnx.state(out)))
  return out, time.perf_counter() - start


def study(args, env, out_dir: pathlib.Path):
  model = load_model(args.model)
  tok = load_tokenizer(args.model)
  train = _ids(tok, args.train, args.train_tokens)
  valid = _ids(tok, args.valid, args.max_tokens)
  block = min(args.block_size, model.config.block_size)
  calib = [x for x, _ in eval_batches(train, args.calib_batches, 8, block)]
  ppl = lambda m: perplexity(m, valid, block_size=block)["perplexity"]
  base = ppl(model)
  emit({"bench": "compress_study", "method": "dense", "perplexity": base, "params": model.num_params, **env},
       args.jsonl)
  methods = {
      "svd": lambda r: svd_compress(model, ratio=r),
      "mpo": lambda r: mpo_compress(model, ratio=r),
      "modegpt": lambda r: modegpt_compress(model, calib, ratio=r),
      "modegpt-uniform": lambda r: modegpt_compress(model, calib, ratio=r, allocation="uniform"),
  }
  rows = []
  part = compressed_part(model, "svd")
  heal_fn = functools.partial(heal, tokens=train, steps=args.heal_steps, lr=args.heal_lr, batch_size=16,
                              block_size=block)
  for name, make in methods.items():
    for r in args.ratios:
      small, secs = _timed(lambda make=make, r=r: make(r))
      variants = [(name, small, 0.0)]
      if args.heal_steps and name in ("svd", "mpo", "modegpt"):
        healed, heal_s = _timed(lambda small=small: heal_fn(small))
        variants.append((name + "+heal", healed, heal_s))
        if name == "mpo":
          variants.append(("mpo+heal+int8", quantize_int8(healed), heal_s))
      for label, m, heal_s in variants:
        s = summary(model, m, part)
        row = {"bench": "compress_study", "method": label, "ratio": r, "kept": s["part_kept"],
               "perplexity": ppl(m), "ppl_vs_dense": None, "params": s["params_after"], "bytes": s["bytes_after"],
               "part_params": s["part_params_after"], "compress_s": secs, "heal_s": heal_s,
               "heal_steps": args.heal_steps if "heal" in label else 0, **env}
        row["ppl_vs_dense"] = row["perplexity"] / base
        rows.append(row)
        emit(row, args.jsonl)
  # TensorGPT: the embedding is the compressed part.
  emb_rows = []
  for form in ("mps", "ttm"):
    for target in [{"ratio": r} for r in args.ratios] + [{"rank": 1}]:
      small, secs = _timed(lambda form=form, target=target: tensorgpt_embedding(model, form=form, **target))
      s = summary(model, small, ["embedding"])
      row = {"bench": "compress_study", "method": f"tensorgpt-{form}", **target, "kept": s["part_kept"],
             "embedding_compression": s["part_compression"], "perplexity": ppl(small), "params": s["params_after"],
             "compress_s": secs, **env}
      row["ppl_vs_dense"] = row["perplexity"] / base
      emb_rows.append(row)
      emit(row, args.jsonl)
  # CompactifAI profiling: each layer alone to MPO at half its weights, on training text (validation is for choices).
  sens = layer_sensitivity(model, train[-args.sensitivity_tokens:], functools.partial(mpo_compress, ratio=0.5),
                           block_size=block)
  for name, v in sens["layers"].items():
    emit({"bench": "compress_sensitivity", "layer": name, **v, "base": sens["base"], **env}, args.jsonl)
  plot_sweep([r for r in rows], out_dir / "perplexity_vs_kept.png", baseline=base,
             title="compressing attention + MLP of a trained 6-layer GPT")
  _markdown(rows, emb_rows, sens, base, out_dir / "compress_study.md")


def _markdown(rows, emb_rows, sens, base, path):
  lines = [f"Dense validation perplexity: {base:.3f}", "",
           "| method | target ratio | kept | val ppl | vs dense | compress s | heal s |",
           "|---|---|---|---|---|---|---|"]
  for r in sorted(rows, key=lambda r: (r["ratio"], r["method"])):
    lines.append(f"| {r['method']} | {r['ratio']} | {r['kept']:.3f} | {r['perplexity']:.3f} | "
                 f"{r['ppl_vs_dense']:.3f}x | {r['compress_s']:.2f} | {r['heal_s']:.1f} |")
  lines += ["", "| TensorGPT | target | embedding compression | val ppl | vs dense |", "|---|---|---|---|---|"]
  for r in emb_rows:
    target = f"ratio {r['ratio']}" if "ratio" in r else f"rank {r['rank']}"
    lines.append(f"| {r['method']} | {target} | {r['embedding_compression']:.2f}x | {r['perplexity']:.3f} | "
                 f"{r['ppl_vs_dense']:.3f}x |")
  lines += ["", "| layer (MPO, half its weights, alone) | ppl increase |", "|---|---|"]
  for name, v in sens["layers"].items():
    lines.append(f"| {name} | {100 * v['increase']:+.2f}% |")
  path.write_text("\n".join(lines) + "\n")


def timing(args, env):
  name = "tiny" if args.smoke else "gpt2"
  model = GPT(preset(name, dtype=args.dtype), rngs=nnx.Rngs(0))
  vocab = model.config.vocab_size
  rng = np.random.default_rng(0)
  calib = [rng.integers(0, vocab, (8, 512 if not args.smoke else 64)).astype(np.int32)]  # >= the 3072-wide input
  cal = None
  if not args.generate_only:  # one calibration pass (every projection's input Gram), timed, shared below
    start = time.perf_counter()
    cal = input_grams(model, calib)
    emit({"bench": "compress_time", "model": name, "method": "calibration (input_grams)",
          "first_s": time.perf_counter() - start, "tokens": cal.tokens, **env}, args.jsonl)
  methods = {
      "svd ratio 0.5": lambda: svd_compress(model, ratio=0.5),
      "svdllm ratio 0.5": lambda: svdllm_compress(model, cal, ratio=0.5),
      "mpo ratio 0.5": lambda: mpo_compress(model, ratio=0.5),
      "mpo-data ratio 0.5": lambda: mpo_compress(model, ratio=0.5, fit="data", calib=cal),
      "modegpt ratio 0.7": lambda: modegpt_compress(model, calib, ratio=0.7, multiple_of=8),
      "tensorgpt rank 1": lambda: tensorgpt_embedding(model, rank=1),
      "int8": lambda: quantize_int8(model),
  }
  small = {}
  for label, make in methods.items():
    if args.generate_only:
      if label in ("modegpt ratio 0.7", "int8"):
        small[label] = make()
      continue
    small[label], cold = _timed(make)
    _, warm = _timed(make)
    emit({"bench": "compress_time", "model": name, "method": label, "first_s": cold, "second_s": warm,
          "params": small[label].num_params, **env}, args.jsonl)
  if args.no_generate:
    return
  gen_models = {"dense": model, "modegpt ratio 0.7": small["modegpt ratio 0.7"],
                "mpo ratio 0.7": mpo_compress(model, ratio=0.7), "svd ratio 0.7": svd_compress(model, ratio=0.7),
                "int8": small["int8"]}
  if env["platform"] == "gpu":  # two-core MPO layers run by the fused Pallas kernels
    gen_models["mpo chi 16 fused"] = mpo_compress(model, rank=16, layout="fused")
  new = 16 if args.smoke else 128
  for batch in (1, 16):
    prompt = jnp.asarray(rng.integers(0, vocab, (batch, 16)).astype(np.int32))
    base = None
    for label, m in gen_models.items():
      run = lambda m=m, prompt=prompt: generate(m, prompt, new, temperature=0.0)
      jax.block_until_ready(run())
      times = []
      for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
      tps = batch * new / float(np.median(times))
      base = tps if base is None else base
      emit({"bench": "generate", "model": name, "method": label, "batch": batch, "new_tokens": new,
            "tokens_per_s": tps, "vs_dense": tps / base, "params": m.num_params, **env}, args.jsonl)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
  parser.add_argument("--model", help="trained tnjax model directory (with tokenizer.json) for the study")
  parser.add_argument("--train", help="training text (calibration and healing)")
  parser.add_argument("--valid", help="validation text")
  parser.add_argument("--ratios", default="0.5,0.7,0.9")
  parser.add_argument("--heal-steps", type=int, default=300)
  parser.add_argument("--heal-lr", type=float, default=3e-4)
  parser.add_argument("--block-size", type=int, default=256)
  parser.add_argument("--calib-batches", type=int, default=16)
  parser.add_argument("--max-tokens", type=int, default=100_000, help="validation tokens scored")
  parser.add_argument("--train-tokens", type=int, default=2_000_000)
  parser.add_argument("--sensitivity-tokens", type=int, default=30_000, help="training tokens (the last read) profiled")
  parser.add_argument("--dtype", default=None, help="computation dtype of the timing model (e.g. bfloat16)")
  parser.add_argument("--no-timing", action="store_true")
  parser.add_argument("--no-generate", action="store_true")
  parser.add_argument("--generate-only", action="store_true", help="skip the compression-time measurements")
  parser.add_argument("--out-dir", default=None, help="where the study's table and plot go")
  parser.add_argument("--jsonl", default=None, help="append JSON lines here")
  args = parser.parse_args()
  args.ratios = [float(r) for r in args.ratios.split(",")]
  env = environment()
  if args.smoke and args.model is None:  # a random tiny model with a tokenizer of the packaged sample
    import tempfile

    from tnjax.data import SAMPLE_DIR, train_tokenizer
    from tnjax.interop import save_model

    tmp = pathlib.Path(tempfile.mkdtemp())
    tok = train_tokenizer([SAMPLE_DIR / "train.txt"], 512)
    save_model(GPT(preset("tiny", vocab_size=tok.get_vocab_size(), block_size=64), rngs=nnx.Rngs(0)), tmp / "model")
    tok.save(str(tmp / "model" / "tokenizer.json"))
    args.model, args.train, args.valid = str(tmp / "model"), SAMPLE_DIR / "train.txt", SAMPLE_DIR / "valid.txt"
    args.ratios, args.heal_steps, args.max_tokens, args.block_size = [0.5], 2, 1000, 64
    args.calib_batches, args.sensitivity_tokens, args.out_dir = 2, 300, str(tmp / "out")
  if args.model:
    out_dir = pathlib.Path(args.out_dir or ".")
    out_dir.mkdir(parents=True, exist_ok=True)
    study(args, env, out_dir)
  if not args.no_timing:
    timing(args, env)


if __name__ == "__main__":
  with jax.numpy_dtype_promotion("standard"):
    main()
