"""Generation at the hardware limit: tnjax's compiled decode loop against Hugging Face transformers, on random-weight
models of public shapes, bf16, greedy, a 16-token prompt and 128 new tokens at batch 1 / 16 / 64, one GPU, one run.

Shapes: SmolLM-135M (Llama: width 576, 30 blocks, 9 query / 3 key-value heads, MLP 1536, vocab 49152, tied) and
Llama-3.2-1B (width 2048, 16 blocks, 32 / 8 heads, MLP 8192, vocab 128256, tied, rope_theta 500000 with llama3
rope scaling). For the 1B shape also svdllm and modegpt at 0.5 and 0.7 of the block weights kept, and an MPO of
the fused layout at rank 16 (compressed from random weights with a few calibration windows of random ids: this
measures speed, not quality).

Each row: tokens/s (batch x new tokens over the wall time of the whole call, prefill included), time to first
token (TTFT: tnjax, the same call with one new token; Hugging Face, a streamer's first new token), decode steps/s
((new - 1) / (wall - TTFT)), and the roofline fraction: the bytes of the parameters (read once per step) times the
steps/s, over the device bandwidth measured here (a large on-device copy: bytes read + written per second);
``roofline_with_cache`` counts the KV cache too (attention reads every slot of it each step).

Hugging Face recipes, each in its own process (a failure, crash or hang is recorded, never fatal; each is timed
after two warm-up calls):
  eager                   ``generate`` with its default dynamic cache;
  static                  ``cache_implementation="static"``: transformers compiles the decode step itself
                          (``CompileConfig`` defaults: inductor, reduce-overhead, i.e. CUDA graphs);
  static-compile-default  the same with ``CompileConfig(mode="default")`` (no CUDA graphs), run when static fails;
  forward-compile         the older recipe, ``model.forward = torch.compile(model.forward, mode="reduce-overhead",
                          fullgraph=True)`` with a static cache (it failed on transformers 5.17 / torch 2.11 with
                          "accessing tensor output of CUDAGraphs that has been overwritten").
Whether a recipe really compiled is recorded (``compiled``); transformers compiles only on an accelerator.

The full run keeps to ``--budget-s`` (default 450 s) of wall time: what does not fit is recorded as skipped, in
this order of priority: bandwidth, tnjax dense, Hugging Face eager and static, the compressed 1B variants, the
other Hugging Face recipes. A table closes the run. XLA's command buffers (CUDA graphs of the loop body) follow
XLA_FLAGS; compare ``XLA_FLAGS=--xla_gpu_enable_command_buffer=`` (off) with the default.

Run: python benchmarks/bench_generate.py [--smoke] [--out results.jsonl]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # the Hugging Face processes share the GPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from tnjax.compress import input_grams, modegpt_compress, mpo_compress, svdllm_compress  # noqa: E402
from tnjax.interop.hf import mapping_of  # noqa: E402
from tnjax.models import Llama, LlamaConfig, generate  # noqa: E402

from _common import emit, environment  # noqa: E402

LLAMA3_1B_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}
SHAPES = {
    "smollm-135m": dict(vocab_size=49152, block_size=2048, n_layer=30, n_head=9, n_kv_head=3, d_model=576, d_ff=1536,
                        rope_theta=10000.0),
    "llama-3.2-1b": dict(vocab_size=128256, block_size=131072, n_layer=16, n_head=32, n_kv_head=8, d_model=2048,
                         d_ff=8192, rope_theta=500000.0, rope_scaling=LLAMA3_1B_ROPE),
    # CPU smoke: every width a multiple of 256, so the fused MPO layout applies too
    "smoke": dict(vocab_size=512, block_size=64, n_layer=1, n_head=4, n_kv_head=4, d_model=256, d_ff=512),
}
RECIPES = ("eager", "static", "static-compile-default", "forward-compile")


# --- the device ------------------------------------------------------------------------------------------------------

def copy_bandwidth(nbytes: int, repeats: int = 10) -> float:
  """Bytes per second an on-device copy of ``nbytes`` moves (read + written), best of ``repeats``."""
  x = jnp.ones((nbytes // 2,), jnp.bfloat16)
  copy = jax.jit(lambda x: x * jnp.bfloat16(2))  # not donated: a read of x and a write of a new buffer
  jax.block_until_ready(copy(x))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(copy(x))
    best = min(best, time.perf_counter() - start)
  return 2 * x.nbytes / best


def param_bytes(model) -> int:
  return sum(x.nbytes for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))


def cache_bytes(model, batch: int, length: int) -> int:
  cfg = model.config
  itemsize = jnp.dtype(cfg.dtype or "float32").itemsize
  return sum(batch * length * cfg.kv_heads * (cfg.block_dims(i)[1] + cfg.block_dims(i)[2]) * itemsize
             for i in range(cfg.n_layer))


# --- tnjax -----------------------------------------------------------------------------------------------------------

def _median_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def time_tnjax(model, batch: int, prompt: int, new: int, repeats: int) -> dict:
  ids = np.random.default_rng(batch).integers(0, model.config.vocab_size, (batch, prompt)).astype(np.int32)
  runs = {n: (lambda n=n: jax.block_until_ready(generate(model, ids, n, temperature=0.0))) for n in (new, 1)}
  for run in runs.values():  # compile
    run()
  seconds, ttft = _median_seconds(runs[new], repeats), _median_seconds(runs[1], repeats)
  return {"seconds": seconds, "ttft_s": ttft, "tokens_per_s": batch * new / seconds,
          "steps_per_s": (new - 1) / max(seconds - ttft, 1e-9)}


def compressed_variants(model, calib, smoke: bool):
  """(label, thunk) of each compressed 1B variant, in the order of priority (0.5 kept first: issue 28's target)."""
  cal = {}

  def grams():
    if "cal" not in cal:
      cal["cal"] = input_grams(model, calib)
    return cal["cal"]

  mpo_rank = 4 if smoke else 16
  return [("svdllm 0.5", lambda: svdllm_compress(model, grams(), ratio=0.5)),
          ("modegpt 0.5", lambda: modegpt_compress(model, calib, ratio=0.5, allocation="uniform", multiple_of=8)),
          (f"mpo fused r{mpo_rank}", lambda: mpo_compress(model, rank=mpo_rank, layout="fused")),
          ("svdllm 0.7", lambda: svdllm_compress(model, grams(), ratio=0.7)),
          ("modegpt 0.7", lambda: modegpt_compress(model, calib, ratio=0.7, allocation="uniform", multiple_of=8))]


# --- Hugging Face, in worker processes -------------------------------------------------------------------------------

def hf_worker(spec: dict) -> None:
  """Runs one recipe on each model of ``spec``, printing one JSON line per event (start, result, failure)."""
  import torch
  import transformers
  from transformers import AutoConfig, AutoModelForCausalLM
  from transformers.generation.streamers import BaseStreamer

  device = "cuda" if torch.cuda.is_available() else "cpu"
  say = lambda **kw: print(json.dumps(kw), flush=True)  # noqa: E731
  say(event="versions", torch=torch.__version__, transformers=transformers.__version__, hf_device=device)
  recipe = spec["recipe"]

  class FirstToken(BaseStreamer):
    """The time the first new token reaches the host (generate's second ``put``; the first is the prompt)."""

    def __init__(self):
      self.puts, self.at = 0, None

    def put(self, value):
      self.puts += 1
      if self.puts == 2:
        self.at = time.perf_counter()

    def end(self):
      pass

  for item in spec["items"]:
    name = item["model"]
    try:
      config = dict(item["config"])
      config = AutoConfig.for_model(config.pop("model_type"), **config)
      torch.manual_seed(0)
      with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
      model.generation_config.eos_token_id = None  # random weights: never stop early
      model.generation_config.pad_token_id = 0
      kwargs = {}
      if recipe in ("static", "static-compile-default", "forward-compile"):
        kwargs["cache_implementation"] = "static"
      if recipe == "static-compile-default":
        kwargs["compile_config"] = transformers.CompileConfig(mode="default", fullgraph=True)
      if recipe == "forward-compile":
        model.generation_config.disable_compile = True  # the recipe compiles forward itself
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    except Exception as e:  # any failure is the result, recorded
      say(event="failed", model=name, batch=None, error=_first_line(e))
      continue
    for batch in item["batches"]:
      say(event="start", model=name, batch=batch)
      try:
        result = _hf_time(model, batch, spec, kwargs, device, FirstToken)
        say(event="result", model=name, batch=batch, **result,
            compiled=recipe == "forward-compile" or getattr(model, "_compiled_call", None) is not None)
      except Exception as e:
        say(event="failed", model=name, batch=batch, error=_first_line(e))
    del model
    if device == "cuda":
      torch.cuda.empty_cache()


def _hf_time(model, batch: int, spec: dict, kwargs: dict, device: str, streamer_class) -> dict:
  """Seconds of a whole ``generate`` call (median after two warm-up calls: compilation, CUDA-graph recording),
  and the time to its first new token (a streamer's)."""
  import torch

  g = torch.Generator().manual_seed(batch)
  ids = torch.randint(0, model.config.vocab_size, (batch, spec["prompt"]), generator=g).to(device)

  def run(streamer=None):
    with torch.no_grad():
      out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=spec["new"], do_sample=False,
                           streamer=streamer, **kwargs)
    if device == "cuda":
      torch.cuda.synchronize()
    if out.shape != (batch, spec["prompt"] + spec["new"]):
      raise RuntimeError(f"generate returned shape {tuple(out.shape)}")

  for _ in range(2):
    run()
  seconds = _median_seconds(run, spec["repeats"])
  first = streamer_class()
  start = time.perf_counter()
  run(first)
  ttft = first.at - start
  return {"seconds": seconds, "ttft_s": ttft, "tokens_per_s": batch * spec["new"] / seconds,
          "steps_per_s": (spec["new"] - 1) / max(seconds - ttft, 1e-9)}


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def run_hf(recipe: str, items: list, args, timeout: float) -> tuple[dict, list[dict]]:
  """Runs ``recipe`` in a worker process; returns its versions and one record per (model, batch) asked for."""
  spec = {"recipe": recipe, "items": items, "prompt": args.prompt, "new": args.new, "repeats": args.hf_repeats}
  asked = [(i["model"], b) for i in items for b in i["batches"]]
  got, versions, started, why = {}, {}, None, None
  try:
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--hf-worker", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout)
    out, err = done.stdout, done.stderr
    if done.returncode != 0:
      tail = [line for line in err.strip().splitlines() if line.strip()]
      why = f"worker exited {done.returncode}: {tail[-1][:300] if tail else 'no message'}"
  except subprocess.TimeoutExpired as e:
    out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    why = f"timed out after {timeout:.0f} s"
  for line in out.splitlines():
    if not line.startswith("{"):
      continue
    event = json.loads(line)
    kind = event.pop("event")
    if kind == "versions":
      versions = event
    elif kind == "start":
      started = (event["model"], event["batch"])
    elif kind == "result":
      got[(event.pop("model"), event.pop("batch"))] = {"status": "ok", **event}
    elif kind == "failed":
      keys = [(event["model"], b) for m, b in asked if m == event["model"]] if event["batch"] is None else \
          [(event["model"], event["batch"])]
      for key in keys:
        got[key] = {"status": f"failed: {event['error']}"}
  records = []
  for key in asked:
    if key not in got:
      got[key] = {"status": f"failed: {why}" if key == started or why is None else f"not run: {why}"}
    records.append({"model": key[0], "batch": key[1], **got[key]})
  return versions, records


# --- the run ---------------------------------------------------------------------------------------------------------

def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--smoke", action="store_true", help="one tiny model on the CPU")
  parser.add_argument("--batches", default="1,16,64")
  parser.add_argument("--prompt", type=int, default=16)
  parser.add_argument("--new", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--hf-repeats", type=int, default=2)
  parser.add_argument("--variants", default=None, help="comma-separated compressed variants (default: all), or none")
  parser.add_argument("--recipes", default=",".join(RECIPES), help="Hugging Face recipes to try (none: skip them)")
  parser.add_argument("--budget-s", type=float, default=450.0, help="wall time for the whole run (see above)")
  parser.add_argument("--out", default=None, help="append JSON lines here")
  parser.add_argument("--hf-worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.hf_worker is not None:
    return hf_worker(json.loads(args.hf_worker))
  deadline = time.perf_counter() + args.budget_s
  left = lambda: deadline - time.perf_counter()  # noqa: E731
  env = environment()
  gpu = env["platform"] == "gpu"
  batches = [int(b) for b in args.batches.split(",")]
  if args.smoke:
    batches, args.prompt, args.new, args.repeats, args.hf_repeats = [2], 4, 8, 1, 1
    shapes, big = ["smoke"], "smoke"
  else:
    shapes, big = ["smollm-135m", "llama-3.2-1b"], "llama-3.2-1b"
  recipes = [r for r in args.recipes.split(",") if r in RECIPES]
  head = [16] if 16 in batches else batches[:1]  # issue 28's comparisons are at batch 16: measured first
  rest = [b for b in batches if b not in head]
  records = []

  def record(**r):
    r = {"bench": "generate", "prompt": args.prompt, "new_tokens": args.new, **r, **env}
    records.append(r)
    emit(r, args.out)

  bandwidth = copy_bandwidth(2**24 if args.smoke else 2**31)
  record(impl="device", variant="copy bandwidth", bandwidth_Bps=bandwidth)
  dense_tps = {}

  def measure(name, variant, model, batches):
    for batch in batches:
      if left() < 15:
        record(model=name, variant=variant, impl="tnjax", batch=batch, status="skipped: time budget")
        continue
      r = time_tnjax(model, batch, args.prompt, args.new, args.repeats)
      pb, cb = param_bytes(model), cache_bytes(model, batch, args.prompt + args.new)
      dense = dense_tps.get((name, batch))
      record(model=name, variant=variant, impl="tnjax", batch=batch, status="ok", **r, param_bytes=pb,
             cache_bytes=cb, roofline=pb * r["steps_per_s"] / bandwidth,
             roofline_with_cache=(pb + cb) * r["steps_per_s"] / bandwidth,
             vs_dense=r["tokens_per_s"] / dense if dense and variant != "dense" else None)
      if variant == "dense":
        dense_tps[(name, batch)] = r["tokens_per_s"]

  # 1. tnjax, dense, in bfloat16 (the float32 models stay: compression starts from them)
  models = {}
  for name in shapes:
    models[name] = Llama(LlamaConfig(**SHAPES[name], tie_embeddings=True), rngs=nnx.Rngs(0))
    measure(name, "dense", models[name].astype("bfloat16"), head + rest)

  hf_items = {n: {"model": n, "config": mapping_of(models[n]).hf_config(models[n].config), "batches": head + rest}
              for n in shapes}
  ran = {}

  def hf(recipe, items, cap):
    if recipe not in recipes:
      return
    if left() < 30:
      versions, out = {}, [{"model": i["model"], "batch": b, "status": "skipped: time budget"}
                           for i in items for b in i["batches"]]
    else:
      versions, out = run_hf(recipe, items, args, timeout=min(cap, left() - 5))
    for r in out:
      ran.setdefault(recipe, []).append(r["status"] == "ok")
      record(impl=f"hf {recipe}", variant="dense", **versions, **r)

  # 2. Hugging Face eager, both shapes in one process
  hf("eager", list(hf_items.values()), 150)

  # 3. the compressed 1B variants, batch 16 first, with Hugging Face's static cache between
  calib = [np.random.default_rng(1).integers(0, SHAPES[big]["vocab_size"], (8, 64) if args.smoke else (4, 2048))]
  variants = compressed_variants(models[big], calib, args.smoke)
  if args.variants is not None:
    wanted = args.variants.split(",")
    variants = [(label, make) for label, make in variants if label in wanted]
  elif args.smoke:
    variants = variants[:3]
  small, took = {}, [30.0]

  def compressed(label, make):
    if label not in small:
      if left() < 30 + max(took):
        return None
      start = time.perf_counter()
      small[label] = make().astype("bfloat16")
      took.append(time.perf_counter() - start)
      record(model=big, variant=label, impl="tnjax", stage="compress", seconds=took[-1],
             params=small[label].num_params, param_bytes=param_bytes(small[label]))
    return small[label]

  def measure_variant(label, make, batches):
    model = compressed(label, make)
    if model is None:
      for batch in batches:
        record(model=big, variant=label, impl="tnjax", batch=batch, status="skipped: time budget")
    else:
      measure(big, label, model, batches)

  for label, make in variants[:2]:
    measure_variant(label, make, head)
  for name in shapes:  # one process per shape: one slow compilation does not starve the other
    hf("static", [hf_items[name]], 150)
  for label, make in variants[:2]:
    measure_variant(label, make, rest)
  for label, make in variants[2:]:
    measure_variant(label, make, head + rest)
    small.pop(label, None)

  # 4. the other Hugging Face recipes
  if not all(ran.get("static", [True])):
    hf("static-compile-default", list(hf_items.values()), 150)
  if gpu:
    hf("forward-compile", [{**i, "batches": head} for i in hf_items.values()], 120)
  elif "forward-compile" in recipes:
    for name in shapes:
      record(impl="hf forward-compile", variant="dense", model=name, batch=None, status="skipped: needs a GPU")
  print_table(records, bandwidth)


def _num(r: dict, key: str, fmt: str, scale: float = 1.0) -> str:
  return format(r[key] * scale, fmt) if r.get(key) is not None else "-"


def print_table(records, bandwidth: float) -> None:
  rows = [r for r in records if r.get("batch") is not None and r.get("impl") != "device"]
  print(f"\n# {records[0]['device']}, copy bandwidth {bandwidth / 1e9:,.0f} GB/s; prefill included in tokens/s")
  print(f"{'model':<14} {'variant':<16} {'impl':<28} {'batch':>5} {'tokens/s':>10} {'TTFT ms':>8} {'steps/s':>8} "
        f"{'roofline':>8} {'vs dense':>8}  status")
  for r in rows:
    print(f"{r['model']:<14} {r.get('variant', ''):<16} {r['impl']:<28} {r['batch']:>5} "
          f"{_num(r, 'tokens_per_s', ',.0f'):>10} {_num(r, 'ttft_s', '.1f', 1e3):>8} "
          f"{_num(r, 'steps_per_s', ',.0f'):>8} {_num(r, 'roofline', '.1%'):>8} {_num(r, 'vs_dense', '.2f'):>8}  "
          f"{r.get('status', '')}")
  best = {}  # the fastest Hugging Face recipe that ran, per model and batch
  for r in rows:
    if r["impl"].startswith("hf ") and r.get("status") == "ok":
      key = (r["model"], r["batch"])
      if r["tokens_per_s"] > best.get(key, (0.0, ""))[0]:
        best[key] = (r["tokens_per_s"], r["impl"])
  for r in rows:
    key = (r["model"], r["batch"])
    if r["impl"] == "tnjax" and r.get("variant") == "dense" and r.get("status") == "ok" and key in best:
      tps, impl = best[key]
      print(f"tnjax / fastest Hugging Face ({impl}): {r['model']} batch {r['batch']}: {r['tokens_per_s'] / tps:.2f}x")


if __name__ == "__main__":
  main()
