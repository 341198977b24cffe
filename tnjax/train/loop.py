"""The training loop: one jitted step (AdamW, warmup + cosine, clipping, accumulation), evaluation,
orbax checkpoints with exact resume, metrics, a loss plot and a report."""

from __future__ import annotations

import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tnjax.data import eval_batches, load_tokenizer, token_cache, train_batch, train_tokenizer
from tnjax.models import GPT, preset
from tnjax.train.config import TrainConfig
from tnjax.train.mup import mup_multipliers, scale_by_multipliers


def _name(path) -> str:
  parts = []
  for k in path:
    parts.append(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))))
  return ".".join(parts)


class FlatParams:
  """A model's parameters as a flat ``{name: array}`` dict (what optax and orbax see) and back."""

  def __init__(self, state):
    leaves, self.treedef = jax.tree_util.tree_flatten_with_path(state)
    self.names = [_name(p) for p, _ in leaves]

  def flat(self, state) -> dict:
    return dict(zip(self.names, jax.tree_util.tree_leaves(state)))

  def state(self, flat: dict):
    return self.treedef.unflatten([flat[n] for n in self.names])


def make_optimizer(cfg: TrainConfig, params: dict, multipliers: dict | None = None) -> optax.GradientTransformation:
  """AdamW with linear warmup then cosine decay to ``min_lr_ratio * lr``, global-norm clipping,
  and weight decay only on matrices and TT cores (not on norms and biases); with ``multipliers``
  (``{name: float}`` for some of ``params``, e.g. muP's), each parameter's update is scaled by its own.

  Example:
    >>> import jax.numpy as jnp
    >>> from tnjax.train import TrainConfig
    >>> params = {"w": jnp.ones((4, 4)), "b": jnp.zeros(4)}
    >>> tx = make_optimizer(TrainConfig(), params)
    >>> state = tx.init(params)
    >>> len(jax.tree_util.tree_leaves(state)) > 2  # clipping, then AdamW moments per parameter
    True
  """
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup, decay_steps=max(cfg.steps, cfg.warmup + 1),
      end_value=cfg.lr * cfg.min_lr_ratio)
  decay = {k: v.ndim >= 2 for k, v in params.items()}
  tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                   optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay))
  if not multipliers:
    return tx
  unknown = sorted(set(multipliers) - set(params))
  if unknown:
    raise ValueError(f"make_optimizer: multipliers name {unknown[:4]} but the parameters have no such names")
  return optax.chain(tx, scale_by_multipliers({k: float(multipliers.get(k, 1.0)) for k in params}))


def param_shardings(params: dict, mesh, fsdp: bool) -> dict:
  """Replicated, or (FSDP) each array split over the devices along its largest divisible axis."""
  n = mesh.devices.size

  def spec(x):
    if fsdp and n > 1:
      axes = [a for a in np.argsort(x.shape)[::-1] if x.shape[a] % n == 0]
      if axes:
        parts = [None] * x.ndim
        parts[axes[0]] = "data"
        return NamedSharding(mesh, P(*parts))
    return NamedSharding(mesh, P())

  return {k: spec(v) for k, v in params.items()}


def _reseed(rest, key):
  """Gives every RNG key in the non-parameter state a per-step key (dropout), deterministically."""
  leaves, treedef = jax.tree_util.tree_flatten(rest)
  out = [jax.random.fold_in(key, i) if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)
         else x for i, x in enumerate(leaves)]
  return treedef.unflatten(out)


def _cross_entropy(logits, targets):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


class Trainer:
  """Holds the model definition, optimizer and jitted steps of one run.

  Example:
    >>> import numpy as np
    >>> from tnjax.train import TrainConfig
    >>> trainer = Trainer(TrainConfig(steps=2, block_size=32, batch_size=4), vocab_size=512)
    >>> tokens = np.random.default_rng(0).integers(0, 512, 5000)
    >>> loss, grad_norm = trainer.step(0, tokens)
    >>> 5.5 < float(loss) < 7.0  # about log(512) at init
    True
  """

  def __init__(self, cfg: TrainConfig, vocab_size: int, model: GPT | None = None):
    """Builds the model from ``cfg`` (preset, overrides, layers, dtype), or continues training ``model``
    (its config, computation dtype included, wins; ``cfg`` gives the optimizer and batches)."""
    self.cfg = cfg
    given = model is not None
    if not given:
      mup = cfg.mup_base_width if cfg.parametrization == "mup" else None
      self.model_config = preset(cfg.model, **{**cfg.model_overrides, "vocab_size": vocab_size,
                                               "block_size": cfg.block_size, "layers": cfg.layers,
                                               "dtype": None if cfg.dtype == "float32" else cfg.dtype,
                                               "mup_base_width": mup})
      model = GPT(self.model_config, rngs=nnx.Rngs(cfg.seed))
    else:
      self.model_config = model.config
    self.num_params = model.num_params
    self.graphdef, params_state, self.rest = nnx.split(model, nnx.Param, ...)
    self.flat = FlatParams(params_state)
    params = self.flat.flat(params_state)
    if given:  # steps donate their parameters: copy, so the caller's model (and models sharing its arrays) stay valid
      params = {k: jnp.array(v, copy=True) for k, v in params.items()}
    self.mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    micro = cfg.batch_size // cfg.grad_accum
    if micro % self.mesh.devices.size:
      raise ValueError(f"train: batch_size / grad_accum = {micro} but it must be divisible by the "
                       f"{self.mesh.devices.size} devices")
    self.shardings = param_shardings(params, self.mesh, cfg.fsdp)
    self.params = jax.device_put(params, self.shardings)
    multipliers = None
    if self.model_config.mup_base_width is not None:  # ".value" ends the names of nnx variables' arrays
      multipliers = {f"{k}.value": v for k, v in mup_multipliers(self.model_config).items()}
    self.tx = make_optimizer(cfg, params, multipliers)
    # Moments follow their parameters' sharding; scalars (the step count) are replicated.
    opt_state = jax.jit(self.tx.init)(self.params)
    replicated = NamedSharding(self.mesh, P())
    opt_shardings = jax.tree_util.tree_map(
        lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else replicated, opt_state)
    self.opt_state = jax.device_put(opt_state, opt_shardings)
    self.batch_sharding = NamedSharding(self.mesh, P(None, "data"))
    self.dropout = self.model_config.dropout > 0
    # Outputs keep the inputs' shardings, so the second step does not recompile.
    self._step = jax.jit(self._train_step, donate_argnums=(0, 1),
                         out_shardings=(self.shardings, opt_shardings, None, None))
    self._eval = jax.jit(self._eval_loss)

  def model(self, params: dict | None = None) -> GPT:
    return nnx.merge(self.graphdef, self.flat.state(self.params if params is None else params), self.rest)

  def _loss(self, params, x, y, key):
    model = nnx.merge(self.graphdef, self.flat.state(params), _reseed(self.rest, key))
    return _cross_entropy(model(x, deterministic=not self.dropout, padded_logits=True), y)

  def _train_step(self, params, opt_state, x, y, key):
    def micro(carry, xy):
      loss_sum, grad_sum, i = carry
      loss, grads = jax.value_and_grad(self._loss)(params, xy[0], xy[1], jax.random.fold_in(key, i))
      return (loss_sum + loss, jax.tree_util.tree_map(jnp.add, grad_sum, grads), i + 1), None

    n = x.shape[0]
    if n == 1:  # no accumulation: skip the scan and the zeroed gradient buffers (a dense step's last few %)
      loss, grads = jax.value_and_grad(self._loss)(params, x[0], y[0], jax.random.fold_in(key, 0))
    else:
      zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
      (loss, grads, _), _ = jax.lax.scan(micro, (jnp.zeros((), jnp.float32), zeros, 0), (x, y))
      grads = jax.tree_util.tree_map(lambda g: g / n, grads)
    updates, opt_state = self.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss / n, optax.global_norm(grads)

  def _eval_loss(self, params, x, y):
    model = nnx.merge(self.graphdef, self.flat.state(params), self.rest)
    return _cross_entropy(model(x, padded_logits=True), y)

  def put_batch(self, x, y):
    a = self.cfg.grad_accum
    shape = (a, x.shape[0] // a, x.shape[1])
    return (jax.device_put(x.reshape(shape), self.batch_sharding),
            jax.device_put(y.reshape(shape), self.batch_sharding))

  def step(self, step: int, tokens):
    x, y = train_batch(tokens, step, self.cfg.batch_size, self.cfg.block_size, self.cfg.seed)
    x, y = self.put_batch(x, y)
    key = jax.random.fold_in(jax.random.key(self.cfg.seed), step)
    self.params, self.opt_state, loss, gnorm = self._step(self.params, self.opt_state, x, y, key)
    return loss, gnorm

  def evaluate(self, batches) -> float:
    sharding = NamedSharding(self.mesh, P("data"))
    losses = [self._eval(self.params, jax.device_put(x, sharding), jax.device_put(y, sharding)) for x, y in batches]
    return float(np.mean([float(v) for v in losses]))


def _checkpoint_manager(out: pathlib.Path, cfg: TrainConfig):
  import orbax.checkpoint as ocp

  options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, create=True)
  return ocp.CheckpointManager((out / "checkpoints").resolve(), options=options)


def _restore(manager, trainer: Trainer) -> int:
  import orbax.checkpoint as ocp

  step = manager.latest_step()
  target = {"params": trainer.params, "opt_state": trainer.opt_state}
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
  try:
    restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:  # orbax raises many types for unreadable or mismatched trees
    raise ValueError(f"train: checkpoint at step {step} in {manager.directory} could not be restored into this "
                     f"model and optimizer ({type(e).__name__}: {str(e)[:300]}); it is corrupt or from another "
                     "configuration") from e
  trainer.params, trainer.opt_state = restored["params"], restored["opt_state"]
  return int(step)


def _tensorboard(path: pathlib.Path):
  """A TensorBoard event writer when tensorboardX is installed (optional), else None."""
  try:
    from tensorboardX import SummaryWriter
  except ImportError:
    return None
  return SummaryWriter(str(path))


def _tokenizer(cfg: TrainConfig, out: pathlib.Path):
  if cfg.tokenizer:
    return load_tokenizer(cfg.tokenizer)
  saved = out / "tokenizer.json"
  if saved.exists():
    return load_tokenizer(saved)
  tok = train_tokenizer(cfg.train_files, cfg.vocab_size)
  tok.save(str(saved))
  return tok


def _plot(metrics: list[dict], path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  train = sorted({m["step"]: m["loss"] for m in metrics if "loss" in m}.items())
  val = sorted({m["step"]: m["val_loss"] for m in metrics if "val_loss" in m}.items())
  fig, ax = plt.subplots(figsize=(6, 4))
  if train:
    ax.plot(*zip(*train), label="train")
  if val:
    ax.plot(*zip(*val), "o-", label="validation")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats)")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> dict:
  """Runs (or resumes) a training run in ``cfg.out_dir``; returns the report dict.

  The run directory holds ``train_config.json`` (resolved config),
  ``tokenizer.json``, ``cache/`` (token ids), ``checkpoints/`` (orbax, the
  last ``keep``), ``metrics.jsonl``, ``loss.png``, ``report.json`` /
  ``report.md``, ``model/`` (the final model in tnjax's format) and, when
  tensorboardX is installed, ``tensorboard/`` event files.

  Raises:
    ValueError: when the directory already has checkpoints and ``resume`` is
      False, when resuming with a different configuration, or when a
      checkpoint cannot be restored.
  """
  from tqdm import tqdm

  from tnjax.interop import save_model

  cfg.validate()
  out = pathlib.Path(cfg.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  saved_cfg = out / "train_config.json"
  has_ckpt = (out / "checkpoints").exists() and any((out / "checkpoints").iterdir())
  if resume:
    if not saved_cfg.exists():
      raise ValueError(f"train: --resume but {saved_cfg} does not exist; nothing to resume")
    before = {k: v for k, v in json.loads(saved_cfg.read_text()).items() if k != "steps"}
    now = {k: v for k, v in json.loads(json.dumps(cfg.to_dict())).items() if k != "steps"}
    if before != now:
      changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
      raise ValueError(f"train: --resume with a configuration that differs from the saved one in {changed}")
  elif has_ckpt:
    raise ValueError(f"train: {out / 'checkpoints'} already has checkpoints; pass --resume to continue, or choose "
                     "another out_dir")
  cfg.save(saved_cfg)

  tok = _tokenizer(cfg, out)
  train_tokens = token_cache(cfg.train_files, tok, out / "cache", "train")
  valid = eval_batches(token_cache(cfg.valid_files, tok, out / "cache", "valid"), cfg.eval_batches,
                       cfg.batch_size // cfg.grad_accum, cfg.block_size)
  trainer = Trainer(cfg, tok.get_vocab_size())
  manager = _checkpoint_manager(out, cfg)
  start = _restore(manager, trainer) if resume and manager.latest_step() is not None else 0
  metrics_path = out / "metrics.jsonl"
  if not resume:
    metrics_path.write_text("")

  board = _tensorboard(out / "tensorboard")

  def log(record):
    with open(metrics_path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if board is not None:
      for k, v in record.items():
        if k != "step":
          board.add_scalar(k, v, record["step"])

  tokens_per_step = cfg.batch_size * cfg.block_size
  best, last_time, last_step, rates = math.inf, time.perf_counter(), start, []
  bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress, desc="train",
             unit="step", dynamic_ncols=True)
  for step in bar:
    loss, gnorm = trainer.step(step, train_tokens)
    done = step + 1
    if done % cfg.log_every == 0 or done == cfg.steps:
      loss = float(loss)
      now = time.perf_counter()
      rate = (done - last_step) * tokens_per_step / (now - last_time)
      last_time, last_step = now, done
      if done - cfg.log_every > start:  # the first interval includes compilation
        rates.append(rate)
      log({"step": done, "loss": loss, "grad_norm": float(gnorm), "tokens_per_s": rate})
      bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}")
    if done % cfg.eval_every == 0 or done == cfg.steps:
      val = trainer.evaluate(valid)
      best = min(best, val)
      log({"step": done, "val_loss": val, "val_ppl": math.exp(val)})
      bar.write(f"step {done}: validation loss {val:.4f}, perplexity {math.exp(val):.2f}")
    if done % cfg.checkpoint_every == 0 or done == cfg.steps:
      import orbax.checkpoint as ocp

      manager.save(done, args=ocp.args.StandardSave({"params": trainer.params, "opt_state": trainer.opt_state}))
  manager.wait_until_finished()
  manager.close()
  if board is not None:
    board.close()

  metrics = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
  vals = [m["val_loss"] for m in metrics if "val_loss" in m]
  report = {
      "parameters": trainer.num_params, "steps": cfg.steps, "tokens_seen": cfg.steps * tokens_per_step,
      "tokens_per_s": float(np.median(rates)) if rates else None,
      "best_val_perplexity": math.exp(min(vals)) if vals else None,
      "final_val_perplexity": math.exp(vals[-1]) if vals else None,
      "first_val_perplexity": math.exp(vals[0]) if vals else None,
      "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
  }
  if cfg.test_files:
    test = eval_batches(token_cache(cfg.test_files, tok, out / "cache", "test"), cfg.eval_batches,
                        cfg.batch_size // cfg.grad_accum, cfg.block_size)
    report["test_perplexity"] = math.exp(trainer.evaluate(test))
  save_model(trainer.model(), out / "model")
  tok.save(str(out / "model" / "tokenizer.json"))
  _plot(metrics, out / "loss.png")
  (out / "report.json").write_text(json.dumps(report, indent=2))
  (out / "report.md").write_text("# Training report\n\n" + "\n".join(
      f"- {k.replace('_', ' ')}: {v:,.2f}" if isinstance(v, float) else f"- {k.replace('_', ' ')}: {v}"
      for k, v in report.items()) + "\n\n![loss](loss.png)\n")
  return report

