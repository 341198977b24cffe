"""The training loop: one jitted step (AdamW, warmup + cosine, clipping, accumulation), evaluation,
orbax checkpoints with exact resume, metrics, a loss plot and a report."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import pathlib
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tnjax._io import LOCK_NAME, atomic_write, atomic_write_text, copy_tree_linked, dir_lock, read_json, read_text
from tnjax.data import Prefetcher, eval_batches, load_tokenizer, token_cache, train_batch, train_tokenizer
from tnjax.data.cache import file_sha256
from tnjax.models import Decoder, build
from tnjax.train.config import RESUMABLE, TrainConfig, saved_config
from tnjax.train.mup import mup_multipliers, scale_by_multipliers
from tnjax.train.sharding import entry, make_mesh, param_shardings


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


def decay_start(cfg: TrainConfig) -> int:
  """The first step of a "wsd" schedule's decay (``cfg.steps`` minus its ``decay_fraction``, not before warmup)."""
  return max(cfg.warmup, cfg.steps - max(1, round(cfg.decay_fraction * cfg.steps)))


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
  """The learning rate of every step: ``warmup`` linear steps from 0 to ``lr``, then

  * "cosine": cosine decay to ``min_lr_ratio * lr`` at ``steps``;
  * "wsd" (warmup-stable-decay, Hägele et al. 2024): ``lr`` until `decay_start`, then linear
    decay to ``min_lr_ratio * lr`` at ``steps``. Runs of different ``steps`` agree up to the
    earlier decay start, which is what lets one run branch into several budgets.

  Examples:
    >>> from tnjax.train import TrainConfig
    >>> f = lr_schedule(TrainConfig(lr=1.0, min_lr_ratio=0.0, warmup=10, steps=100, schedule="wsd",
    ...                             decay_fraction=0.2))
    >>> [round(float(f(t)), 3) for t in (5, 10, 79, 80, 90, 100)]
    [0.5, 1.0, 1.0, 1.0, 0.5, 0.0]
  """
  end = cfg.lr * cfg.min_lr_ratio
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup,
                                              decay_steps=max(cfg.steps, cfg.warmup + 1), end_value=end)
  start = decay_start(cfg)
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, cfg.warmup), optax.constant_schedule(cfg.lr),
                               optax.linear_schedule(cfg.lr, end, max(1, cfg.steps - start))],
                              boundaries=[cfg.warmup, start])


def make_optimizer(cfg: TrainConfig, params: dict, multipliers: dict | None = None) -> optax.GradientTransformation:
  """AdamW on the learning rate of `lr_schedule` (warmup, then cosine or warmup-stable-decay), global-norm clipping,
  and weight decay only on matrices and TT cores (not on norms and biases); with ``multipliers``
  (``{name: float}`` for some of ``params``, e.g. muP's), each parameter's update is scaled by its own.

  Examples:
    >>> import jax.numpy as jnp
    >>> from tnjax.train import TrainConfig
    >>> params = {"w": jnp.ones((4, 4)), "b": jnp.zeros(4)}
    >>> tx = make_optimizer(TrainConfig(), params)
    >>> state = tx.init(params)
    >>> len(jax.tree_util.tree_leaves(state)) > 2  # clipping, then AdamW moments per parameter
    True
  """
  schedule = lr_schedule(cfg)
  decay = {k: v.ndim >= 2 for k, v in params.items()}
  tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                   optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay))
  if not multipliers:
    return tx
  unknown = sorted(set(multipliers) - set(params))
  if unknown:
    raise ValueError(f"make_optimizer: multipliers name {unknown[:4]} but the parameters have no such names")
  return optax.chain(tx, scale_by_multipliers({k: float(multipliers.get(k, 1.0)) for k in params}))


def _on_mesh(mesh, fn):
  """``fn`` traced with ``mesh`` as the ambient mesh, so the fused TT-matrix kernels run under ``shard_map`` on each
  device's rows (`tnjax.core.contraction.fused.row_axes`) instead of on every row everywhere."""

  @functools.wraps(fn)
  def wrapped(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)

  return wrapped


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

  Examples:
    >>> import numpy as np
    >>> from tnjax.train import TrainConfig
    >>> trainer = Trainer(TrainConfig(steps=2, block_size=32, batch_size=4), vocab_size=512)
    >>> tokens = np.random.default_rng(0).integers(0, 512, 5000)
    >>> loss, grad_norm = trainer.step(0, tokens)
    >>> 5.5 < float(loss) < 7.0  # about log(512) at init
    True
  """

  def __init__(self, cfg: TrainConfig, vocab_size: int, model: Decoder | None = None, *, mup: bool = True):
    """Builds the model from ``cfg`` (preset, overrides, layers, dtype), or continues training ``model``
    (its config, computation dtype included, wins; ``cfg`` gives the optimizer and batches)."""
    self.cfg = cfg
    given = model is not None
    if not given:
      self.model_config = cfg.model_config(vocab_size)
      model = build(self.model_config, rngs=nnx.Rngs(cfg.seed))
    else:
      self.model_config = model.config
    self.num_params = model.num_params
    self.graphdef, params_state, self.rest = nnx.split(model, nnx.Param, ...)
    self.flat = FlatParams(params_state)
    params = self.flat.flat(params_state)
    if given:  # steps donate their parameters: copy, so the caller's model (and models sharing its arrays) stay valid
      params = {k: jnp.array(v, copy=True) for k, v in params.items()}
    axes, sizes, self.rules = cfg.sharding_layout(jax.device_count())
    self.mesh = make_mesh(axes, sizes)
    self.batch_axes = self.rules["batch"]  # the mesh axes a batch's sequences are split over
    micro, split = cfg.batch_size // cfg.grad_accum, math.prod(self.mesh.shape[a] for a in self.batch_axes)
    if micro % split:
      raise ValueError(f"train: batch_size / grad_accum = {micro} but it must be divisible by the {split} devices "
                       f"of the batch's mesh axes {self.batch_axes}")
    logical = {f"{k}.value": v for k, v in model.logical_axes().items()}  # ".value" ends nnx variables' names
    self.shardings = param_shardings(params, self.mesh, self.rules, logical)
    self.params = jax.device_put(params, self.shardings)
    multipliers = None
    if mup and self.model_config.mup_base_width is not None:  # ".value" ends nnx variables' array names
      multipliers = {f"{k}.value": v for k, v in mup_multipliers(self.model_config).items()}
    self.tx = make_optimizer(cfg, params, multipliers)
    # Moments follow their parameters' sharding; scalars (the step count) are replicated.
    opt_state = jax.jit(self.tx.init)(self.params)
    replicated = NamedSharding(self.mesh, P())
    opt_shardings = jax.tree_util.tree_map(
        lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else replicated, opt_state)
    self.opt_state = jax.device_put(opt_state, opt_shardings)
    self.batch_sharding = NamedSharding(self.mesh, P(None, entry(self.batch_axes)))
    self.dropout = self.model_config.dropout > 0
    # Outputs keep the inputs' shardings, so the second step does not recompile.
    self._step = jax.jit(_on_mesh(self.mesh, self._train_step), donate_argnums=(0, 1),
                         out_shardings=(self.shardings, opt_shardings, None, None))
    self._eval = jax.jit(_on_mesh(self.mesh, self._eval_loss))

  def model(self, params: dict | None = None) -> Decoder:
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
    return optax.apply_updates(params, updates), opt_state, loss / n, optax.tree.norm(grads)

  def _eval_loss(self, params, x, y):
    model = nnx.merge(self.graphdef, self.flat.state(params), self.rest)
    return _cross_entropy(model(x, padded_logits=True), y)

  def put_batch(self, x, y):
    a = self.cfg.grad_accum
    shape = (a, x.shape[0] // a, x.shape[1])
    return (jax.device_put(x.reshape(shape), self.batch_sharding),
            jax.device_put(y.reshape(shape), self.batch_sharding))

  def batch(self, step: int, tokens):
    """What step ``step`` trains on: its batch of ``tokens`` (`tnjax.data.train_batch`, seeded by (seed, step)) on
    the devices with the training sharding, and its dropout key; ``(x, y, key)``. Safe to call from another thread
    (`batches` does)."""
    x, y = self.put_batch(*train_batch(tokens, step, self.cfg.batch_size, self.cfg.block_size, self.cfg.seed))
    return x, y, jax.random.fold_in(jax.random.key(self.cfg.seed), step)

  def batches(self, tokens, start: int, stop: int) -> Prefetcher:
    """The `batch` of every step in ``range(start, stop)``, in order, made ``cfg.prefetch`` steps ahead on a
    background thread (`tnjax.data.Prefetcher`; a context manager that stops the thread on leaving)."""
    return Prefetcher(lambda step: self.batch(step, tokens), start, stop, depth=self.cfg.prefetch)

  def step(self, step: int, tokens, batch=None):
    """One optimizer step on ``batch`` (`batch`'s ``(x, y, key)`` for this step; default: made now from
    ``tokens``). Returns the loss and gradient norm, device arrays (reading them waits for the step)."""
    x, y, key = self.batch(step, tokens) if batch is None else batch
    self.params, self.opt_state, loss, gnorm = self._step(self.params, self.opt_state, x, y, key)
    return loss, gnorm

  def evaluate(self, batches, params: dict | None = None) -> float:
    """Mean loss over ``batches`` of the current parameters (or ``params``, same names and shardings)."""
    sharding = NamedSharding(self.mesh, P(entry(self.batch_axes)))
    params = self.params if params is None else params
    losses = [self._eval(params, jax.device_put(x, sharding), jax.device_put(y, sharding)) for x, y in batches]
    return float(np.mean([float(v) for v in losses]))


def _checkpoint_manager(out: pathlib.Path, cfg: TrainConfig):
  import orbax.checkpoint as ocp

  options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, keep_period=cfg.keep_every or None, create=True)
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


class _HeldRecords(logging.Filter):
  """Keeps orbax's error records (with their tracebacks) instead of letting the logger print them."""

  def __init__(self):
    super().__init__()
    self.held: list[logging.LogRecord] = []

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR and "orbax" in record.pathname:
      self.held.append(record)
      return False
    return True


@contextlib.contextmanager
def _orbax_errors_held():
  """Holds what orbax's save threads print about a failure during the block: the error records it logs (through
  absl's logger) and the exceptions its storage library's callbacks print when they complete after orbax has
  closed their event loop (``RuntimeError: Event loop is closed``, through ``sys.unraisablehook``). Dropped when
  the block raises (its error then says what failed, in one line); printed after it when it does not."""
  logger, held, hook, unraisable = logging.getLogger("absl"), _HeldRecords(), sys.unraisablehook, []
  logger.addFilter(held)
  sys.unraisablehook = unraisable.append
  try:
    yield
  finally:
    logger.removeFilter(held)
    sys.unraisablehook = hook
  for record in held.held:
    logger.handle(record)
  for info in unraisable:
    hook(info)


@contextlib.contextmanager
def _checkpoint_error(manager):
  """Turns a failed orbax save (a full disk, an unwritable directory; raised by the next save or the final wait)
  into one line: where, its first cause, and that ``--resume`` continues from the last checkpoint written whole."""
  try:
    yield
  except Exception as e:  # orbax and tensorstore raise many types (ValueError, OSError, RuntimeError)
    cause = next((c for c in _causes(e) if isinstance(c, OSError)), e)
    detail = " ".join(str(cause).split())[:300] or type(cause).__name__
    steps = _checkpoint_steps(pathlib.Path(manager.directory).parent)
    raise ValueError(f"train: saving a checkpoint in {manager.directory} failed ({type(cause).__name__}: {detail}); "
                     "is the disk full? Free space and run again with --resume, which continues from "
                     f"{f'step {steps[-1]}' if steps else 'the start (no checkpoint was written whole)'}") from e


def _close(manager, board, *, failing: bool) -> None:
  """Waits for the last checkpoint save and closes the manager's threads and the event writer, on every path
  (errors and Ctrl-C included). When the run is ``failing`` already, a save that fails too (the same full disk)
  is left unsaid: the error in flight is the one line."""
  with _interrupt_after():
    try:
      with _checkpoint_error(manager):
        manager.wait_until_finished()
    except ValueError:
      if not failing:
        raise
    finally:
      manager.close()
      if board is not None:
        board.close()


def _causes(e: BaseException):
  """``e`` and the exceptions it was raised from or during, innermost last."""
  seen = []
  while e is not None and e not in seen:
    seen.append(e)
    e = e.__cause__ or e.__context__
  return seen


def _tensorboard(path: pathlib.Path):
  """A TensorBoard event writer when tensorboardX is installed (optional), else None."""
  try:
    from tensorboardX import SummaryWriter
  except ImportError:
    return None
  return SummaryWriter(str(path))


def _say(message: str) -> None:
  """A line for the person running ``train`` (stderr, so stdout stays the JSON report)."""
  print(message, file=sys.stderr, flush=True)


def _tokenizer(cfg: TrainConfig, out: pathlib.Path, resume: bool):
  """The configured tokenizer, or the run's own BPE: reused only when made from the same files and vocab_size."""
  if cfg.tokenizer:
    return load_tokenizer(cfg.tokenizer)
  saved, source = out / "tokenizer.json", out / "tokenizer.source.json"
  made_from = {"vocab_size": cfg.vocab_size,
               "train_files": [{"size": f.stat().st_size, "sha256": file_sha256(f)}
                               for f in map(pathlib.Path, cfg.train_files)]}
  if saved.exists():
    before = read_json("train", source) if source.exists() else None
    if before == made_from or (resume and before is None):  # runs from before the source file existed
      return load_tokenizer(saved)
    if resume:
      raise ValueError(f"train: --resume but {saved} was made from other training files or another vocab_size "
                       f"({source}); its checkpoints belong to that tokenizer")
    _say(f"train: {saved} was made from other training files or another vocab_size; training a new one")
  with _naming("train_files"):
    tok = train_tokenizer(cfg.train_files, cfg.vocab_size)
  atomic_write(saved, tok.save)
  atomic_write_text(source, json.dumps(made_from, indent=1))
  return tok


FILE_FIELDS = ("train_files", "valid_files", "test_files")


@contextlib.contextmanager
def _naming(field: str):
  """Puts the TrainConfig field whose files the block reads in front of the ValueError it raises."""
  try:
    yield
  except ValueError as e:
    raise ValueError(f"train: {field}: {e}") from e


def _check_files(cfg: TrainConfig) -> None:
  """Refuses, before anything is written, a file of ``FILE_FIELDS`` that does not exist, is not a file or is empty."""
  for field in FILE_FIELDS:
    for f in getattr(cfg, field):
      path = pathlib.Path(f)
      if not path.is_file():
        raise ValueError(f"train: {field} has {f!r}, which does not exist or is not a file")
      if path.stat().st_size == 0:
        raise ValueError(f"train: {field} has {f!r}, which is empty; a UTF-8 text file is expected")


def _check_host_memory(cfg: TrainConfig) -> None:
  """Refuses, before any work, batches whose token ids alone exceed the host's memory: one training batch and the
  validation batches (held for the whole run), each window as int64 indices and int32 inputs and targets."""
  try:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (AttributeError, ValueError, OSError):  # no such query on this platform
    return
  windows = cfg.batch_size + cfg.eval_batches * (cfg.batch_size // cfg.grad_accum)
  need = windows * (cfg.block_size + 1) * 16
  if need > total:
    raise ValueError(f"train: batch_size={cfg.batch_size:,} (and eval_batches={cfg.eval_batches} validation batches) "
                     f"of block_size={cfg.block_size} tokens need {need / 2**30:,.1f} GiB of host memory for their "
                     f"token ids alone but this host has {total / 2**30:,.1f} GiB; lower batch_size or eval_batches "
                     "(grad_accum splits a batch into micro-batches on the device, not on the host)")


def _tokens(cfg: TrainConfig, tok, out: pathlib.Path, field: str) -> np.ndarray:
  """The token ids of one of ``FILE_FIELDS`` (read, decoded and tokenized, or taken from the cache), so that every
  file a run reads is refused before its first step rather than after training.

  Raises:
    ValueError: naming the field and the file that is not UTF-8 text, or the field and its files when they hold
      fewer than ``block_size + 2`` tokens (a window, its shifted targets and a second start) or an id the
      model's vocabulary (the tokenizer's size) does not hold.
  """
  files = getattr(cfg, field)
  with _naming(field):
    tokens = token_cache(files, tok, out / "cache", field.removesuffix("_files"))
  top, vocab = int(tokens.max()), tok.get_vocab_size()
  if top >= vocab:  # the embedding would read past its table: NaN losses that looked like a divergence
    raise ValueError(f"train: {field} {files} encode to id {top:,} but the tokenizer "
                     f"({cfg.tokenizer or out / 'tokenizer.json'}) has {vocab:,} tokens, the model's vocab_size; "
                     f"its ids are expected in 0..{vocab - 1:,} (a vocabulary with gaps or added tokens past it)")
  need = cfg.block_size + 2
  if len(tokens) < need:
    raise ValueError(f"train: {field} {files} hold {len(tokens)} tokens but block_size={cfg.block_size} needs at "
                     f"least {need} (a window, its shifted targets and a second start); give more text or a smaller "
                     "block_size")
  return tokens


def _checkpoint_steps(out: pathlib.Path) -> list[int]:
  """The steps of the checkpoints in a run directory, ascending (orbax's finished ones: in-progress saves have
  temporary names)."""
  return sorted(int(p.name) for p in (out / "checkpoints").glob("*") if p.name.isdigit())


def read_metrics(fn: str, path: pathlib.Path) -> list[dict]:
  """The records of a run's ``metrics.jsonl`` (none when it does not exist).

  Raises:
    ValueError: naming ``fn``, the file and the line that is not a JSON object with an integer "step".
  """
  if not path.exists():
    return []
  records = []
  for i, line in enumerate(read_text(fn, "metrics", path).splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      record, why = None, f"not valid JSON ({e})"
    else:
      why = "not a JSON object with an integer 'step'"
    if not isinstance(record, dict) or isinstance(record.get("step"), bool) or not isinstance(record.get("step"), int):
      raise ValueError(f"{fn}: {path} line {i} is {why}; the metrics log is corrupt (remove that line, or the file "
                       "to start the log afresh)")
    records.append(record)
  return records


def _resume_note(saved: dict, cfg: TrainConfig, start: int) -> str | None:
  """What a resume changes (fields of `RESUMABLE`), and where the learning rate goes when the schedule changes: a
  cosine stretched over more steps rises again at ``start``, where the saved run had decayed."""
  changed = [k for k in RESUMABLE if k != "out_dir" and saved.get(k) != json.loads(json.dumps(getattr(cfg, k)))]
  if not changed:
    return None
  note = f"train: resuming at step {start} with " + ", ".join(
      f"{k}={getattr(cfg, k)!r} (the saved run had {k}={saved.get(k)!r})" for k in changed)
  if set(changed) & {"steps", "lr", "min_lr_ratio", "warmup", "schedule", "decay_fraction"}:
    old, new = lr_schedule(TrainConfig(**saved)), lr_schedule(cfg)
    lr_old, lr_new, lr_end = (float(f(t)) for f, t in ((old, start), (new, start), (new, cfg.steps)))
    note += (f"; the {cfg.schedule} learning-rate schedule changes: at step {start} the rate is {lr_new:.3g} where "
             f"the saved run's had {lr_old:.3g}, and it ends at {lr_end:.3g} at step {cfg.steps}")
    if lr_new > 1.01 * lr_old:
      note += (" (the rate rises again, so the loss may rise before it falls; best_model/ keeps the model of lowest "
               "validation loss)")
  return note


def _check_steps_ahead(cfg: TrainConfig, out: pathlib.Path) -> None:
  """Refuses to resume a run to fewer steps than it has trained, or to as many when it has finished (its report
  gives them): either would rewrite its config and report with less (steps, tokens seen, tokens/s)."""
  trained = max(_checkpoint_steps(out), default=0)
  try:
    finished = json.loads((out / "report.json").read_text()).get("steps") == trained
  except (OSError, ValueError, AttributeError):  # no report (an unfinished run), or not one of ours
    finished = False
  if cfg.steps < trained or (cfg.steps == trained and finished):
    raise ValueError(f"train: --resume but the run in {out} has already {'finished' if finished else 'trained'} "
                     f"{trained} steps (checkpoint {trained}); steps={cfg.steps} is "
                     f"{'fewer' if cfg.steps < trained else 'no more'}; choose steps > {trained} or a new out_dir")


def _plot(metrics: list[dict], path: pathlib.Path) -> None:
  # A Figure with its own Agg canvas: no pyplot, so the caller's backend and open figures are untouched.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  train = sorted({m["step"]: m["loss"] for m in metrics if "loss" in m}.items())
  val = sorted({m["step"]: m["val_loss"] for m in metrics if "val_loss" in m}.items())
  fig = Figure(figsize=(6, 4))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  if train:
    ax.plot(*zip(*train), label="train")
  if val:
    ax.plot(*zip(*val), "o-", label="validation")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats)")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


def branch(src, step: int, steps: int, out_dir) -> TrainConfig:
  """Prepares ``out_dir`` as a copy of the "wsd" run ``src`` at its checkpoint ``step``, to be continued
  (``train(cfg, resume=True)``) into a run of ``steps`` steps whose decay starts at or after ``step``.

  Because the stable phase of a WSD schedule does not depend on ``steps``, the branch is
  the run that would have been made with ``steps`` from the start: one long run gives several
  budgets, each paying only for its decay. Keep the branch points with ``keep_every``.
  ``out_dir`` gets the configuration (``steps`` and ``out_dir`` changed), the tokenizer, the
  token cache (hard links where possible), the checkpoint of ``step``, the metrics up to
  ``step`` and ``best_model/`` when its validation step is at most ``step``.

  Returns:
    The branch's TrainConfig.

  Raises:
    ValueError: when ``src`` has no configuration or no checkpoint ``step``, is not a "wsd" run,
      ``step`` is past the decay start of ``src`` or of the branch, or ``out_dir`` is not empty.

  Example (not run: it needs a trained run):
    ``cfg = branch("runs/wsd", 3000, 4000, "runs/wsd-4000"); train(cfg, resume=True)``
  """
  import shutil

  fn = "branch"
  src, out = pathlib.Path(src), pathlib.Path(out_dir)
  before = TrainConfig.from_dict(saved_config(fn, src, resuming=False))
  cfg = TrainConfig.from_dict({**before.to_dict(), "steps": steps, "out_dir": str(out)})
  if before.schedule != "wsd":
    raise ValueError(f"{fn}: {src} has schedule={before.schedule!r} but only a 'wsd' run can branch (its stable "
                     "phase does not depend on steps)")
  ckpt = src / "checkpoints" / str(step)
  if not ckpt.is_dir():
    raise ValueError(f"{fn}: {src} has no checkpoint at step {step} (it has {_checkpoint_steps(src)}); keep_every "
                     "keeps branch points")
  limit = min(decay_start(before), decay_start(cfg))
  if step > limit:
    raise ValueError(f"{fn}: step={step} but the stable phase ends at step {limit} (decay of {src}: "
                     f"{decay_start(before)}, of the branch with steps={steps}: {decay_start(cfg)})")
  out.mkdir(parents=True, exist_ok=True)
  with dir_lock(fn, out):
    if any(p.name != LOCK_NAME for p in out.iterdir()):
      raise ValueError(f"{fn}: {out} is not empty; a new directory is expected")
    (out / "checkpoints").mkdir()
    shutil.copytree(ckpt, out / "checkpoints" / str(step))
    for name in ("tokenizer.json", "tokenizer.source.json"):
      if (src / name).exists():
        shutil.copy2(src / name, out / name)
    if (src / "cache").is_dir():
      copy_tree_linked(src / "cache", out / "cache")
    metrics = read_metrics(fn, src / "metrics.jsonl")
    vals = [m for m in metrics if "val_loss" in m]
    if (src / "best_model").is_dir() and vals and min(vals, key=lambda m: m["val_loss"])["step"] <= step:
      shutil.copytree(src / "best_model", out / "best_model")
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics if m["step"] <= step))
    atomic_write_text(out / "train_config.json", json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
  return cfg


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> dict:
  """Runs (or resumes) a training run in ``cfg.out_dir``; returns the report dict.

  The run directory holds ``train_config.json`` (resolved config),
  ``tokenizer.json`` (and ``tokenizer.source.json``: the files and
  vocab_size it was trained from; a change retrains it), ``cache/`` (token
  ids), ``checkpoints/`` (orbax, the last ``keep``), ``metrics.jsonl``,
  ``loss.png``, ``report.json`` / ``report.md``, ``model/`` (the final model
  in tnjax's format), ``best_model/`` (the model at the lowest validation
  loss, the checkpoint chosen on validation: the one to use), each with its
  ``tokenizer.json`` and its fingerprint, and, when tensorboardX is
  installed, ``tensorboard/`` event files. The report gives the best
  validation perplexity and its step, test perplexity at the last step
  (``test_perplexity``) and at the best one (``test_perplexity_at_best``),
  and training FLOPs (3x the forward FLOPs of ``GPT.flops_per_token``).
  Every file is written under a temporary name and renamed.

  ``resume`` continues from the latest checkpoint. ``cfg`` may differ from the saved configuration only in
  the fields of `tnjax.train.config.RESUMABLE` (``steps``, ``out_dir``: a moved run directory resumes, and
  fields that keep the model and its data); ``resolve(..., resume=True)`` starts from the saved one. A
  change is said on stderr, with the learning rate at the resumed step before and after when the schedule
  changes (more ``steps`` stretch a cosine decay, so the rate rises again). Resuming with fewer steps than
  the run has trained (or as many, once it has finished) is refused and changes nothing.

  Before the first step, every file the run reads (``train_files``,
  ``valid_files``, ``test_files``) is read, decoded, tokenized and checked to
  hold a window (``block_size + 2`` tokens); a bad one is refused naming its
  field and file, before the config is saved. One run at a time writes into
  ``out_dir``: it holds ``out_dir/.tnjax.lock`` (`tnjax._io.dir_lock`; in a
  multi-host run, its first process) while it runs, and a second is refused.

  The loop never waits for the devices between log steps: each step's batch
  is drawn and put on the devices ``prefetch`` steps ahead on a background
  thread (the same batches, in the same order, as drawing them in the loop:
  the losses are bit-identical for every ``prefetch``), and losses stay on
  the devices until the next log step reads them. So a diverged loss stops
  the run at most ``log_every`` steps after the step that logged it, and
  before any later evaluation or checkpoint. An error in making a batch is
  raised by the loop as it was raised; the thread ends with the run, on
  every way out (errors and Ctrl-C included).

  Raises:
    ValueError: when the directory already has checkpoints and ``resume`` is
      False, when resuming with a change outside ``RESUMABLE`` or fewer steps, when
      another run holds the directory, for a missing, empty, non-UTF-8 or too
      short file, when a checkpoint cannot be restored, or when the loss
      becomes NaN or infinite (see above: up to ``log_every`` steps late).
  """
  cfg.validate()
  _check_host_memory(cfg)
  _check_files(cfg)
  out = pathlib.Path(cfg.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  # The processes of a multi-host run write one run directory together: the first holds its lock for all.
  with dir_lock("train", out) if jax.process_index() == 0 else contextlib.nullcontext():
    return _train(cfg, out, resume, progress)


def _train(cfg: TrainConfig, out: pathlib.Path, resume: bool, progress: bool) -> dict:
  """`train` in ``out``, whose lock the caller holds."""
  from tnjax.interop import load_model, save_model

  saved_cfg = out / "train_config.json"
  has_ckpt = (out / "checkpoints").exists() and any((out / "checkpoints").iterdir())
  saved = None
  if resume:
    saved = saved_config("train", out)
    now = json.loads(json.dumps(cfg.to_dict()))
    fixed = sorted(k for k in now if saved.get(k) != now[k] and k not in RESUMABLE)
    if fixed:
      raise ValueError(f"train: --resume with a configuration that differs from the saved one in {fixed} "
                       f"({saved_cfg}); they set the model or the data it trains on, which a resumed run keeps: only "
                       "steps, the optimizer's and the schedule's fields, grad_accum, fsdp, test_files and the "
                       "logging, evaluation and checkpoint fields may change (tnjax.train.config.RESUMABLE); start "
                       "a new run in another out_dir for the others")
    _check_steps_ahead(cfg, out)
  logged = read_metrics("train", out / "metrics.jsonl") if resume else []  # a corrupt log refused before any work
  if has_ckpt and not resume:
    raise ValueError(f"train: {out / 'checkpoints'} already has checkpoints; pass --resume to continue, or choose "
                     "another out_dir")

  # Every file the run reads, test files included, is tokenized and checked before the first step (and before the
  # config is saved): a bad one found after training would leave the run without its model and report.
  tok = _tokenizer(cfg, out, resume)
  tokens = {field: _tokens(cfg, tok, out, field) for field in FILE_FIELDS if getattr(cfg, field)}
  if not cfg.tokenizer and tok.get_vocab_size() < cfg.vocab_size:  # BPE stops when no pair is seen twice
    _say(f"train: the tokenizer trained on train_files has {tok.get_vocab_size():,} tokens, fewer than "
         f"vocab_size={cfg.vocab_size:,} (the text has no more merges seen twice); the model gets "
         f"{tok.get_vocab_size():,}")
  atomic_write_text(saved_cfg, json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
  valid = eval_batches(tokens["valid_files"], cfg.eval_batches, cfg.batch_size // cfg.grad_accum, cfg.block_size)
  trainer = Trainer(cfg, tok.get_vocab_size())
  metrics_path = out / "metrics.jsonl"
  manager = _checkpoint_manager(out, cfg)
  board = None
  # orbax's save threads log each failure with its traceback before the main thread sees it: held, so that a
  # failed save (a full disk) is the one line _checkpoint_error gives
  with _orbax_errors_held():
    try:
      start = _restore(manager, trainer) if resume and manager.latest_step() is not None else 0
      if saved is not None:
        note = _resume_note(saved, cfg, start)
        if note:
          _say(note)
      # A resumed run drops what was logged after its checkpoint, so no step appears twice.
      kept = [m for m in logged if m["step"] <= start]
      atomic_write_text(metrics_path, "".join(json.dumps(m) + "\n" for m in kept))
      board = _tensorboard(out / "tensorboard")
      best = min((m.get("val_loss", math.inf) for m in kept), default=math.inf)
      rates = _loop(cfg, trainer, manager, tokens["train_files"], valid, start, progress, metrics_path, board,
                    out / "best_model", best, tok)
    except BaseException:
      _close(manager, board, failing=True)
      raise
    _close(manager, board, failing=False)

  tokens_per_step = cfg.batch_size * cfg.block_size
  metrics = read_metrics("train", metrics_path)
  vals = [m["val_loss"] for m in metrics if "val_loss" in m]
  # a step's forward sees one micro-batch of rows; backward costs about twice the forward
  flops_per_token = 3 * trainer.model().flops_per_token(cfg.batch_size // cfg.grad_accum * cfg.block_size)
  report = {
      "parameters": trainer.num_params, "steps": cfg.steps, "tokens_seen": cfg.steps * tokens_per_step,
      "train_flops_per_token": flops_per_token, "train_flops": flops_per_token * cfg.steps * tokens_per_step,
      "tokens_per_s": float(np.median(rates)) if rates else None,
      "best_val_perplexity": math.exp(min(vals)) if vals else None,
      "final_val_perplexity": math.exp(vals[-1]) if vals else None,
      "first_val_perplexity": math.exp(vals[0]) if vals else None,
      "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
  }
  if vals:
    report["best_val_step"] = min((m for m in metrics if "val_loss" in m), key=lambda m: m["val_loss"])["step"]
  if cfg.test_files:
    test = eval_batches(tokens["test_files"], cfg.eval_batches, cfg.batch_size // cfg.grad_accum, cfg.block_size)
    report["test_perplexity"] = math.exp(_finite("test loss", trainer.evaluate(test), cfg.steps, cfg))
    if (out / "best_model").exists():
      best = trainer.flat.flat(nnx.state(load_model(out / "best_model"), nnx.Param))
      best = jax.device_put({k: jnp.asarray(v) for k, v in best.items()}, trainer.shardings)
      loss = _finite("test loss at the best checkpoint", trainer.evaluate(test, best), cfg.steps, cfg)
      report["test_perplexity_at_best"] = math.exp(loss)
  save_model(trainer.model(), out / "model", tokenizer=tok)
  _plot(metrics, out / "loss.png")
  atomic_write_text(out / "report.json", json.dumps(report, indent=2))
  atomic_write_text(out / "report.md", "# Training report\n\n" + "\n".join(
      f"- {k.replace('_', ' ')}: {v:,.2f}" if isinstance(v, float) else f"- {k.replace('_', ' ')}: {v}"
      for k, v in report.items()) + "\n\n![loss](loss.png)\n")
  return report


@contextlib.contextmanager
def _interrupt_after():
  """Holds Ctrl-C until the block ends, so it never lands inside orbax's save threads (which would log a traceback
  and could leave a save half-finalized). Only in the main thread with Python's default handler; restored after."""
  if threading.current_thread() is not threading.main_thread() or \
      signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
    yield
    return
  received = []
  signal.signal(signal.SIGINT, lambda *_: received.append(True))
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, signal.default_int_handler)
  if received:
    raise KeyboardInterrupt


def _finite(what: str, value: float, step: int, cfg: TrainConfig) -> float:
  if not math.isfinite(value):
    raise ValueError(f"train: {what}={value} at step {step}: training diverged; lower lr (now {cfg.lr}) or "
                     f"grad_clip (now {cfg.grad_clip}) and start again or resume from an earlier checkpoint")
  return value


class _Losses:
  """The logged steps' losses and gradient norms, kept on the devices until `read`: reading a step's values waits
  for that step, so the loop reads a log step's only at the next one, while the steps between run."""

  def __init__(self, cfg: TrainConfig, start: int):
    self.cfg, self.start, self.pending, self.rates = cfg, start, [], []
    self.last_step, self.last_time = start, time.perf_counter()

  def add(self, step: int, loss, grad_norm) -> None:
    self.pending.append((step, loss, grad_norm))

  def read(self, upto: int) -> list[dict]:
    """The metrics of the pending steps up to ``upto`` (loss, gradient norm, tokens/s since the previous read,
    which is when its step had finished); keeps each interval's tokens/s after the first (compilation) in
    ``rates``.

    Raises:
      ValueError: for a loss that is not finite (training diverged).
    """
    out = []
    while self.pending and self.pending[0][0] <= upto:
      step, loss, grad_norm = self.pending.pop(0)
      loss = _finite("loss", float(loss), step, self.cfg)
      now = time.perf_counter()
      rate = (step - self.last_step) * self.cfg.batch_size * self.cfg.block_size / (now - self.last_time)
      if self.last_step > self.start:  # the first interval includes compilation
        self.rates.append(rate)
      self.last_step, self.last_time = step, now
      out.append({"step": step, "loss": loss, "grad_norm": float(grad_norm), "tokens_per_s": rate})
    return out


def _loop(cfg: TrainConfig, trainer: Trainer, manager, train_tokens, valid, start: int, progress: bool,
          metrics_path: pathlib.Path, board, best_dir: pathlib.Path, best: float, tok) -> list[float]:
  """Steps ``start .. cfg.steps``: logs, evaluates (saving the model and its tokenizer ``tok`` to ``best_dir``
  whenever the validation loss beats ``best``) and checkpoints; returns the measured tokens/s.

  Nothing waits for the devices between log steps: batches come made and placed ahead (`Trainer.batches`), and a
  log step's loss is read at the next log step (`_Losses`). Evaluations and checkpoints read every pending loss
  first, so none follows a diverged one, and ``metrics.jsonl`` holds every logged step up to a checkpoint (what a
  resumed run keeps)."""
  import orbax.checkpoint as ocp
  from tqdm import tqdm

  from tnjax.interop import save_model

  def log(record):
    with open(metrics_path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if board is not None:
      for k, v in record.items():
        if k != "step":
          board.add_scalar(k, v, record["step"])

  def read(upto):
    for record in losses.read(upto):
      log(record)
      bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")

  losses, bar = _Losses(cfg, start), None
  with trainer.batches(train_tokens, start, cfg.steps) as batches:  # the thread stops on every way out
    for step in range(start, cfg.steps):
      loss, gnorm = trainer.step(step, train_tokens, next(batches))
      done = step + 1
      if bar is None:
        # The bar starts after the first step, which compiles: its rate and ETA are those of compiled steps.
        jax.block_until_ready(loss)
        bar = tqdm(total=cfg.steps, initial=done, disable=not progress, desc="train", unit="step",
                   dynamic_ncols=True)
      else:
        bar.update(1)
      last = done == cfg.steps
      if done % cfg.log_every == 0 or last:
        losses.add(done, loss, gnorm)
        read(done if last else done - 1)  # not this step's: reading it would wait for the step just dispatched
      evaluate, save = done % cfg.eval_every == 0 or last, done % cfg.checkpoint_every == 0 or last
      if evaluate or save:
        read(done)
      if evaluate:
        val = _finite("validation loss", trainer.evaluate(valid), done, cfg)
        log({"step": done, "val_loss": val, "val_ppl": math.exp(val)})
        bar.write(f"step {done}: validation loss {val:.4f}, perplexity {math.exp(val):.2f}")
        if val < best:  # the checkpoint chosen on validation, kept whatever the last K checkpoints are
          best = val
          with _interrupt_after():
            save_model(trainer.model(), best_dir, tokenizer=tok)
      if save:
        with _interrupt_after():
          with _checkpoint_error(manager):
            manager.save(done, args=ocp.args.StandardSave({"params": trainer.params,
                                                           "opt_state": trainer.opt_state}))
  if bar is not None:
    bar.close()
  return losses.rates
