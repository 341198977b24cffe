"""Training throughput: tokens/s of one jitted AdamW step, a plain-JAX GPT-2 reference vs tnjax's dense,
TT-matrix, Block-TT (BTT) and low-rank GPT-2s, and ``tnjax train`` itself against a pipelined plain-JAX step.

tnjax variants use tnjax.train.Trainer (the same step ``tnjax train`` runs);
the reference is GPT-2 written directly in JAX below (float32 parameters,
bfloat16 compute, tied embedding, the same optax AdamW, clipping and
schedule), at the true vocabulary (50257) and padded to 50304. Random
tokens, so no corpus is needed. These variants draw each batch on the host
and wait for every step (the median step is reported).

Two more measure the whole loop:

* "plain-resident": the plain-JAX step (padded vocabulary) with every batch
  already on the device, steps dispatched back to back and one wait at the
  end: the fastest a step can go, the input pipeline's ceiling;
* "train-dense": ``tnjax.train.train`` itself, end to end (token cache,
  prefetch thread, logging, the tokens/s it reports: the median over its log
  intervals after the first), on a word-level tokenizer of the vocabulary's
  size and random text, tnjax dense at the padded vocabulary.

Ratios are within one run: "vs dense" against tnjax's dense model (per-step
waits), "vs plain" against the plain-JAX step at the same (padded)
vocabulary, and for "train-dense" against "plain-resident".

With ``--family llama --widths 576,2048,3072,4096`` it is the wide-model
benchmark instead: Llama-style models of public shapes (SmolLM-135M,
Llama-3.2-1B, Llama-3.2-3B, Llama-3.1-8B; ``--blocks`` caps the block count
where a shape must fit), tnjax dense against every structured kind on all
seven projections, each kind at the largest rank of 1, 2, 4, ... whose
projections keep at most ``--budget`` (default 0.5) of dense's projection
parameters. Every (width, variant) runs as its own process, so its peak
device memory is its own; the table gives tokens/s, peak GiB and the ratio to
dense at the same width, which tells where each kind overtakes dense.

Run: python benchmarks/bench_train_step.py [--smoke] [--attention cudnn] [--variants a,b] [--out results.jsonl]
     python benchmarks/bench_train_step.py --family llama --widths 2048,4096 --blocks 8 [--variants dense,btt]
"""

import argparse
import json
import math
import pathlib
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tnjax.core.contraction.fused import fused_dims
from tnjax.train import TrainConfig, Trainer, train

from _common import emit, environment, time_steps

MLP = ("mlp.c_fc", "mlp.c_proj")
ALL = ("attn.c_attn", "attn.c_proj") + MLP


def _kind(kind, rank, names, **extra):
  return {n: {"kind": kind, "rank": rank, **extra} for n in names}


def _fused_ttm(rank, d, path="fused"):
  """Two-core TT-matrix layers in the fused kernels' layout, run by them (path "fused", or "fused_fwd": the
  forward kernel with the rebuild-W backward) or by the cost model's per-direction plan ("auto")."""
  shapes = {"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d), "mlp.c_fc": (d, 4 * d), "mlp.c_proj": (4 * d, d)}
  out = {}
  for name, (m, n) in shapes.items():
    in_dims, out_dims = fused_dims(m, n)
    out[name] = {"kind": "ttm", "rank": rank, "num_cores": 2, "in_dims": list(in_dims), "out_dims": list(out_dims),
                 "path": path}
  return out


def variants(d: int) -> dict:
  """name -> (vocab_multiple, layers) of the tnjax variants, built on demand (fused layouts need
  d_model % 256 == 0); the "plain-*" entries are the reference steps."""
  return {
      "plain-50257": None, "plain-padded": None, "plain-resident": None, "train-dense": None,
      "dense-50257": lambda: (1, {}), "dense": lambda: (128, {}),
      "btt-all-r1": lambda: (128, _kind("btt", 1, ALL)), "btt-all-r2": lambda: (128, _kind("btt", 2, ALL)),
      "btt-all-r4": lambda: (128, _kind("btt", 4, ALL)), "btt-all-r8": lambda: (128, _kind("btt", 8, ALL)),
      "ttm-all-r16": lambda: (128, _kind("ttm", 16, ALL)), "ttm-all-r64": lambda: (128, _kind("ttm", 64, ALL)),
      "ttm-fused-all-r4": lambda: (128, _fused_ttm(4, d)), "ttm-fused-all-r8": lambda: (128, _fused_ttm(8, d)),
      "ttm-fusedfwd-all-r4": lambda: (128, _fused_ttm(4, d, "fused_fwd")),
      "ttm-fusedfwd-all-r8": lambda: (128, _fused_ttm(8, d, "fused_fwd")),
      "ttm-fusedauto-all-r4": lambda: (128, _fused_ttm(4, d, "auto")),
      "ttm-fusedauto-all-r8": lambda: (128, _fused_ttm(8, d, "auto")),
      "lowrank-all-r128": lambda: (128, _kind("lowrank", 128, ALL)),
  }


# ---------------------------------------------------------------------------------------------------------------
# The plain-JAX reference: GPT-2 as a dict of arrays, nothing but jax, jax.nn and optax.

def _plain_params(key, vocab, block, d, n_layer):
  keys = iter(jax.random.split(key, 4 + 4 * n_layer))
  normal = lambda shape, std: std * jax.random.normal(next(keys), shape, jnp.float32)  # noqa: E731
  resid = 0.02 / math.sqrt(2 * n_layer)
  blocks = [{"ln1": (jnp.ones(d), jnp.zeros(d)), "ln2": (jnp.ones(d), jnp.zeros(d)),
             "attn": (normal((d, 3 * d), 0.02), jnp.zeros(3 * d)), "proj": (normal((d, d), resid), jnp.zeros(d)),
             "fc": (normal((d, 4 * d), 0.02), jnp.zeros(4 * d)), "fc2": (normal((4 * d, d), resid), jnp.zeros(d))}
            for _ in range(n_layer)]
  return {"wte": normal((vocab, d), 0.02), "wpe": normal((block, d), 0.01), "blocks": blocks,
          "ln_f": (jnp.ones(d), jnp.zeros(d))}


def _plain_loss(params, x, y, n_head, vocab, attention):
  bf = jnp.bfloat16

  def ln(h, p):
    h32 = h.astype(jnp.float32)
    mean, var = h32.mean(-1, keepdims=True), h32.var(-1, keepdims=True)
    return ((h32 - mean) * jax.lax.rsqrt(var + 1e-5) * p[0] + p[1]).astype(bf)

  def dense(h, p):
    return h @ p[0].astype(bf) + p[1].astype(bf)

  b, t = x.shape
  h = (params["wte"][x] + params["wpe"][:t]).astype(bf)
  for p in params["blocks"]:
    q, k, v = jnp.split(dense(ln(h, p["ln1"]), p["attn"]), 3, axis=-1)
    q, k, v = (z.reshape(b, t, n_head, -1) for z in (q, k, v))
    a = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=attention).reshape(b, t, -1)
    h = h + dense(a, p["proj"])
    h = h + dense(jax.nn.gelu(dense(ln(h, p["ln2"]), p["fc"]), approximate=True), p["fc2"])
  logits = (ln(h, params["ln_f"]) @ params["wte"].astype(bf).T).astype(jnp.float32)
  if logits.shape[-1] > vocab:
    logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab, logits, -jnp.inf)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, y[..., None], axis=-1))


class PlainStep:
  """A jitted plain-JAX GPT-2 training step with tnjax's optimizer settings."""

  def __init__(self, cfg: TrainConfig, vocab: int, rows: int, d: int, n_layer: int, n_head: int, attention):
    self.cfg = cfg
    params = _plain_params(jax.random.key(cfg.seed), rows, cfg.block_size, d, n_layer)
    self.num_params = sum(x.size for x in jax.tree_util.tree_leaves(params)) - (rows - vocab) * d  # as tnjax
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup, cfg.steps, cfg.lr * cfg.min_lr_ratio)
    mask = jax.tree_util.tree_map(lambda a: a.ndim >= 2, params)
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                     optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=mask))
    self.params, self.opt_state = params, tx.init(params)

    def step(params, opt_state, x, y):
      loss, grads = jax.value_and_grad(_plain_loss)(params, x, y, n_head, vocab, attention)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    self._step = jax.jit(step, donate_argnums=(0, 1))

  def step(self, step: int, tokens, batch=None):
    """One step on ``batch`` (x, y on the device), or on the batch of ``step`` drawn from ``tokens`` now."""
    from tnjax.data import train_batch

    if batch is None:
      batch = map(jnp.asarray, train_batch(tokens, step, self.cfg.batch_size, self.cfg.block_size, self.cfg.seed))
    self.params, self.opt_state, loss = self._step(self.params, self.opt_state, *batch)
    return loss

  def resident_seconds(self, tokens, steps: int, warmup: int = 2) -> float:
    """Seconds per step with every batch already on the device and ``steps`` steps dispatched back to back, one
    wait at the end (after ``warmup`` steps that compile)."""
    for s in range(warmup):
      jax.block_until_ready(self.step(s, tokens))
    from tnjax.data import train_batch

    batches = [jax.device_put(train_batch(tokens, s, self.cfg.batch_size, self.cfg.block_size, self.cfg.seed))
               for s in range(warmup, warmup + steps)]
    jax.block_until_ready(batches)
    start = time.perf_counter()
    for s, batch in enumerate(batches, warmup):
      loss = self.step(s, tokens, batch)
    jax.block_until_ready((loss, self.params))
    return (time.perf_counter() - start) / steps


def train_seconds(cfg: TrainConfig, vocab: int, steps: int, attention) -> tuple[float, int]:
  """Seconds per step of ``tnjax.train.train`` (the tokens/s its report gives) and the model's parameters: a
  dense run of ``4 * steps`` steps logged every ``steps`` (the first interval compiles; the median of the other
  three counts), on random text over a word-level tokenizer of ``vocab`` words."""
  from tokenizers import Tokenizer, models, pre_tokenizers

  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    tok = Tokenizer(models.WordLevel({"<unk>": 0, **{f"w{i}": i for i in range(1, vocab)}}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp / "tokenizer.json"))
    rng = np.random.default_rng(0)
    words = max(1_000_000 if cfg.block_size > 256 else 50_000, 4 * cfg.block_size)
    for name, n in (("train", words), ("valid", 4 * cfg.block_size)):
      (tmp / f"{name}.txt").write_text(" ".join(f"w{i}" for i in rng.integers(1, vocab, n)) + "\n")
    run = TrainConfig(**{**cfg.to_dict(), "steps": 4 * steps, "warmup": min(cfg.warmup, 4 * steps - 1),
                         "log_every": steps, "eval_every": 4 * steps,
                         "checkpoint_every": 4 * steps, "eval_batches": 1, "keep": 1, "layers": {},
                         "tokenizer": str(tmp / "tokenizer.json"), "train_files": [str(tmp / "train.txt")],
                         "valid_files": [str(tmp / "valid.txt")], "out_dir": str(tmp / "run"),
                         "model_overrides": {"attention_impl": attention, "vocab_multiple": 128}})
    report = train(run, progress=False)
  return cfg.batch_size * cfg.block_size / report["tokens_per_s"], report["parameters"]


# ---------------------------------------------------------------------------------------------------------------
# The wide-model benchmark: Llama-style shapes, dense vs each structured kind at <= budget of the projection
# parameters, one process per (width, variant).

LLAMA_SHAPES = {  # width -> the public shape's sizes (config.json as published)
    576: dict(n_layer=30, n_head=9, n_kv_head=3, d_ff=1536, vocab_size=49152, tie_embeddings=True),  # SmolLM-135M
    2048: dict(n_layer=16, n_head=32, n_kv_head=8, d_ff=8192, vocab_size=128256, tie_embeddings=True),  # 3.2-1B
    3072: dict(n_layer=28, n_head=24, n_kv_head=8, d_ff=8192, vocab_size=128256, tie_embeddings=True),  # 3.2-3B
    4096: dict(n_layer=32, n_head=32, n_kv_head=8, d_ff=14336, vocab_size=128256, tie_embeddings=False),  # 3.1-8B
}
SMOKE_SHAPES = {64: dict(n_layer=2, n_head=4, n_kv_head=2, d_ff=128, vocab_size=512, tie_embeddings=True),
                128: dict(n_layer=2, n_head=4, n_kv_head=2, d_ff=256, vocab_size=512, tie_embeddings=True)}
LLAMA_KINDS = {  # variant -> LayerSpec for every projection at rank r
    "lowrank": lambda r: {"kind": "lowrank", "rank": r},
    "btt": lambda r: {"kind": "btt", "rank": r},
    # 4 x 4 blocks of rank r each, in_dims (m / 4, 4), out_dims (4, n / 4): the layout bench_btt_linear found
    # closest to dense (large first contraction, an intermediate of 16 r per token)
    "btt4": lambda r: {"kind": "btt", "rank": r, "blocks": 4},
    "ttm": lambda r: {"kind": "ttm", "rank": r},
    "ttm2": lambda r: {"kind": "ttm", "rank": r, "num_cores": 2},
}


def llama_overrides(width: int, blocks: int | None, smoke: bool) -> dict:
  shapes = SMOKE_SHAPES if smoke else LLAMA_SHAPES
  if width not in shapes:
    raise SystemExit(f"bench_train_step: width {width} has no shape; known: {sorted(shapes)}")
  shape = dict(shapes[width], d_model=width)
  if blocks is not None:
    shape["n_layer"] = min(shape["n_layer"], blocks)
  return shape


def projection_params(overrides: dict, layers: dict) -> int:
  """Parameters of the blocks' projections (norms excluded) of the Llama model these make, counted abstractly."""
  from flax import nnx

  from tnjax.models import build, preset

  cfg = preset("llama-tiny", **{**overrides, "layers": layers})
  model = nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0)))
  flat = nnx.to_flat_state(nnx.state(model.h, nnx.Param))
  return sum(math.prod(v.shape) for path, v in flat if "ln_" not in ".".join(map(str, path)))


def llama_layers(variant: str, overrides: dict, budget: float) -> tuple[dict, int | None]:
  """The variant's ``layers`` and rank: the largest power-of-two rank whose projections keep <= ``budget`` of
  dense's projection parameters (dense: no layers, rank None)."""
  if variant == "dense":
    return {}, None
  if variant not in LLAMA_KINDS:
    raise SystemExit(f"bench_train_step: unknown llama variant {variant!r}; known: {['dense', *LLAMA_KINDS]}")
  dense, best, rank = projection_params(overrides, {}), None, 1
  while rank <= overrides["d_model"]:
    layers = {"*": LLAMA_KINDS[variant](rank)}
    try:
      if projection_params(overrides, layers) > budget * dense:
        break
    except ValueError:  # e.g. a BTT rank the blocks cannot hold
      break
    best, rank = (layers, rank), 2 * rank
  if best is None:
    raise SystemExit(f"bench_train_step: {variant} has no rank within {budget} of dense's projections")
  return best


def llama_child(args, env) -> None:
  """One (width, variant): tokens/s of the Trainer step and peak device memory, one JSON line on stdout."""
  width, variant = int(args.widths), args.variants
  overrides = llama_overrides(width, args.blocks, args.smoke)
  layers, rank = llama_layers(variant, overrides, args.budget)
  vocab = overrides.pop("vocab_size")
  batch, block = args.batch, args.block
  cfg = TrainConfig(model="llama-tiny", batch_size=batch, block_size=block, dtype="float32" if args.smoke else
                    "bfloat16", steps=1000, warmup=10, layers=layers,
                    model_overrides={**overrides, "attention_impl": args.attention})
  runner = Trainer(cfg, vocab)
  tokens = np.random.default_rng(0).integers(0, vocab, 2_000_000).astype(np.uint32 if vocab > 65535 else np.uint16)
  sec = time_steps(runner, tokens, args.steps)
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  print("RESULT " + json.dumps({
      "bench": "train_step_llama", "variant": variant, "width": width, "rank": rank, "n_layer": overrides["n_layer"],
      "vocab": vocab, "batch": batch, "block": block, "dtype": cfg.dtype, "attention": args.attention,
      "params": runner.num_params, "projection_params": projection_params({**overrides, "vocab_size": vocab}, layers),
      "step_seconds": sec, "tokens_per_s": batch * block / sec, "peak_device_bytes": peak, **env}), flush=True)


def llama_main(args, env) -> None:
  if args.smoke:
    args.batch, args.block = 2, 32
  widths = [int(w) for w in (args.widths or ("64,128" if args.smoke else "576,2048,3072,4096")).split(",")]
  names = (args.variants or "dense," + ",".join(LLAMA_KINDS)).split(",")
  print(f"# {env['device']} jax {env['jax']} llama widths {widths} batch {args.batch}x{args.block} "
        f"budget {args.budget} blocks<={args.blocks}")
  print(f"{'width':>6} {'variant':<9} {'rank':>5} {'proj %':>7} {'params':>14} {'step ms':>9} {'tokens/s':>10} "
        f"{'peak GiB':>9} {'vs dense':>9}")
  failed = []
  for width in widths:
    dense = dense_proj = None
    for name in names:
      cmd = [sys.executable, __file__, "--family", "llama", "--child", "--widths", str(width), "--variants", name,
             "--steps", str(args.steps), "--batch", str(args.batch), "--block", str(args.block),
             "--budget", str(args.budget)] + (["--smoke"] if args.smoke else []) + \
            ([] if args.blocks is None else ["--blocks", str(args.blocks)]) + \
            ([] if args.attention is None else ["--attention", args.attention])
      try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
        code, lines = proc.returncode, [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
      except subprocess.TimeoutExpired:  # one slow run must not cost the others' results
        code, lines, tail = "timeout", [], [f"no result within --child-timeout {args.child_timeout} s"]
      if code or not lines:
        print(f"{width:>6} {name:<9} failed (exit {code}): {tail[0][:160]}", flush=True)
        emit({"bench": "train_step_llama", "variant": name, "width": width, "error": tail[0][:400], **env}, args.out)
        failed.append(f"{width}/{name}")
        continue
      record = {**json.loads(lines[-1][len("RESULT "):]), "command": env["command"]}
      if name == "dense":
        dense, dense_proj = record["tokens_per_s"], record["projection_params"]
      record["ratio_vs_dense"] = record["tokens_per_s"] / dense if dense else None
      record["projection_fraction"] = record["projection_params"] / dense_proj if dense_proj else None
      frac = f"{100 * record['projection_fraction']:>6.1f}%" if dense_proj else f"{'-':>7}"
      vs = f"{record['ratio_vs_dense']:>8.2f}x" if dense else f"{'-':>9}"
      peak = f"{record['peak_device_bytes'] / 2**30:>9.1f}" if record["peak_device_bytes"] else f"{'-':>9}"
      print(f"{width:>6} {name:<9} {record['rank'] or '-':>5} {frac} {record['params']:>14,d} "
            f"{record['step_seconds'] * 1e3:>9.2f} {record['tokens_per_s']:>10,.0f} {peak} {vs}", flush=True)
      emit(record, args.out)
  if failed:
    raise SystemExit(f"bench_train_step: {len(failed)} runs failed: {', '.join(failed)}")


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--attention", default=None, help="jax.nn.dot_product_attention implementation, e.g. cudnn")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--variants", default=None, help="comma-separated names (default: all)")
  parser.add_argument("--out", default=None)
  parser.add_argument("--family", default="gpt2", choices=("gpt2", "llama"))
  parser.add_argument("--widths", default=None, help="llama: comma-separated widths of the public shapes")
  parser.add_argument("--blocks", type=int, default=None, help="llama: at most this many blocks per shape")
  parser.add_argument("--budget", type=float, default=0.5, help="llama: structured projections' parameter budget")
  parser.add_argument("--batch", type=int, default=8, help="llama: sequences per step")
  parser.add_argument("--block", type=int, default=2048, help="llama: tokens per sequence")
  parser.add_argument("--child-timeout", type=int, default=900)
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  env = environment()
  if args.family == "llama":
    return llama_child(args, env) if args.child else llama_main(args, env)
  if args.smoke:
    model, batch, block, dtype, vocab, d, n_layer, n_head = "tiny", 4, 64, "float32", 500, 128, 2, 4
    names = ["plain-50257", "plain-padded", "plain-resident", "train-dense", "dense", "btt-all-r2", "ttm-all-r16"]
  else:
    model, batch, block, dtype, vocab, d, n_layer, n_head = "gpt2", 16, 1024, "bfloat16", 50257, 768, 12, 12
    names = list(variants(d))
  if args.variants:
    names = args.variants.split(",")
  table = variants(d)
  unknown = sorted(set(names) - set(table))
  if unknown:
    raise SystemExit(f"bench_train_step: unknown variants {unknown}; known: {sorted(table)}")
  tokens = np.random.default_rng(0).integers(0, vocab, 2_000_000).astype(np.uint16)
  print(f"# {env['device']} jax {env['jax']} {model} batch {batch}x{block} {dtype} attention={args.attention}")
  print(f"{'variant':<18} {'params':>12} {'step ms':>9} {'tokens/s':>11} {'vs dense':>9} {'vs plain':>9}")
  rates, rows = {}, []
  for name in names:
    cfg = TrainConfig(model=model, batch_size=batch, block_size=block, dtype=dtype, steps=1000, warmup=10)
    if name == "train-dense":
      sec, params = train_seconds(cfg, vocab, args.steps, args.attention)
    elif name.startswith("plain"):
      padded = vocab if name == "plain-50257" else -(-vocab // 128) * 128
      runner = PlainStep(cfg, vocab, padded, d, n_layer, n_head, args.attention)
      sec = runner.resident_seconds(tokens, 3 * args.steps) if name == "plain-resident" else \
          time_steps(runner, tokens, args.steps)
      params = runner.num_params
      del runner
    else:
      multiple, layers = table[name]()
      cfg.layers = layers
      cfg.model_overrides = {"attention_impl": args.attention, "vocab_multiple": multiple}
      runner = Trainer(cfg, vocab)
      sec, params = time_steps(runner, tokens, args.steps), runner.num_params
      del runner
    rates[name] = batch * block / sec
    rows.append((name, params, sec))
    # each variant as measured (the table with its ratios follows at the end): a run stopped early keeps these
    print(f"# measured {name}: {sec * 1e3:.2f} ms/step, {rates[name]:,.0f} tokens/s", flush=True)
  dense = rates.get("dense")
  for name, params, sec in rows:
    rate = rates[name]
    plain = rates.get({"plain-50257": "plain-50257", "dense-50257": "plain-50257", "train-dense": "plain-resident",
                       "plain-resident": "plain-resident"}.get(name, "plain-padded"))
    vs_dense = rate / dense if dense else None
    vs_plain = rate / plain if plain else None
    fmt = lambda v: f"{v:>8.2f}x" if v else f"{'-':>9}"  # noqa: E731
    print(f"{name:<18} {params:>12,d} {sec * 1e3:>9.2f} {rate:>11,.0f} {fmt(vs_dense)} {fmt(vs_plain)}")
    emit({"bench": "train_step", "variant": name, "model": model, "batch": batch, "block": block, "dtype": dtype,
          "attention": args.attention, "params": params, "step_seconds": sec, "tokens_per_s": rate,
          "ratio_vs_dense": vs_dense, "ratio_vs_plain": vs_plain, **env}, args.out)


if __name__ == "__main__":
  main()
