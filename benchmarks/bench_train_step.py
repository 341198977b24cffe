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

Run: python benchmarks/bench_train_step.py [--smoke] [--attention cudnn] [--variants a,b] [--out results.jsonl]
"""

import argparse
import math
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tnjax.core.fused import fused_dims
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


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--attention", default=None, help="jax.nn.dot_product_attention implementation, e.g. cudnn")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--variants", default=None, help="comma-separated names (default: all)")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  env = environment()
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
