"""Real model sizes: every CLI stage on random-weight Hugging Face checkpoints of public shapes, as a user runs it.

For each named shape it writes a checkpoint with ``transformers`` (bf16 safetensors, sharded above 2 GB, the
published ``config.json`` fields; no hub is reachable, so the weights are random) and a BPE tokenizer trained
on ``--train``, then runs each stage as its own process and records wall time (imports and compilation
included), the process's peak host RSS (its ``VmHWM``) and its peak device memory (the JAX allocator's
``peak_bytes_in_use``, read by the process at exit) as one JSON line:

* ``make``: the checkpoint (transformers, on the GPU when there is one);
* ``load``: `tnjax.interop.load_any` (with ``--param-dtype``);
* ``eval``: ``tnjax eval --max-tokens N`` with no ``--block-size`` (the default window);
* ``compress-<method>``: ``tnjax compress --method M --ratio R --calib FILE --calib-windows W``, no
  ``--block-size``;
* ``export`` and ``hf-reload``: `tnjax.interop.save_hf` of the svdllm model (loaded with ``--param-dtype``,
  written in that dtype (``dtype=None``: bf16 parameters make a bf16 checkpoint, half the bytes) in shards of
  ``--max-shard-size``; its row has ``shards``, the number of files), then
  ``transformers``' ``from_pretrained`` of it and one forward pass.

Random weights say nothing about quality: this measures time and memory only.

  python bench_scale.py --shapes llama-3.2-1b --train train.txt --valid valid.txt --out scale.jsonl
  python bench_scale.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import _common


def _llama3_rope(factor: float) -> dict:
  """Llama-3.x's published rope_scaling (the 1B/3B and 8B configs differ only in the factor)."""
  return dict(rope_type="llama3", factor=factor, high_freq_factor=4.0, low_freq_factor=1.0,
              original_max_position_embeddings=8192)


# config.json fields as published (hidden sizes, heads, context, rope, tying); weights random.
SHAPES = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True,
                         rope_scaling=_llama3_rope(32.0)),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=False,
                         rope_scaling=_llama3_rope(8.0)),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       max_position_embeddings=131072, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=False),
    # CI's smoke shapes: a long context (no window may be padded to it) at toy widths
    "smoke-llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                        max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                        tie_word_embeddings=True),
    "smoke-qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                        max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                        tie_word_embeddings=False),
}


def _dtype(dtype) -> dict:
  """The dtype keyword of this transformers version (``dtype`` from 4.56, ``torch_dtype`` before)."""
  import transformers

  major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
  return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def make_checkpoint(shape: str, path: pathlib.Path, train: pathlib.Path, vocab: int) -> None:
  """A random-init bf16 checkpoint of ``shape`` (sharded above 2 GB) and a BPE tokenizer of ``vocab`` ids."""
  import torch
  from transformers import AutoConfig, AutoModelForCausalLM

  from tnjax.data import train_tokenizer

  fields = dict(SHAPES[shape])
  config = AutoConfig.for_model(fields.pop("model_type"), **fields, bos_token_id=0, eos_token_id=0)
  torch.manual_seed(0)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  with torch.device(device):
    model = AutoModelForCausalLM.from_config(config, **_dtype(torch.bfloat16))
  model.save_pretrained(str(path), max_shard_size="2GB", safe_serialization=True)
  train_tokenizer([train], vocab).save(str(path / "tokenizer.json"))


def hf_reload(path: pathlib.Path) -> None:
  """``transformers`` loads the exported directory and runs one forward pass on it."""
  import torch
  from transformers import AutoModelForCausalLM

  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = AutoModelForCausalLM.from_pretrained(str(path), **_dtype(torch.bfloat16)).to(device)
  with torch.no_grad():
    logits = model(torch.arange(16, device=device)[None]).logits
  if not torch.isfinite(logits.float()).all():
    raise SystemExit("hf-reload: non-finite logits")


def stage_main(argv: list[str]) -> int:
  """Child process: runs one stage, then writes its peak device memory to the record file."""
  record, kind, *rest = argv
  rc, extra = 0, {}
  try:
    if kind == "make":
      make_checkpoint(rest[0], pathlib.Path(rest[1]), pathlib.Path(rest[2]), int(rest[3]))
    elif kind == "hf-reload":
      hf_reload(pathlib.Path(rest[0]))
    elif kind == "load":
      from tnjax.interop import load_any

      load_any(rest[0], param_dtype=rest[1] or None)
    elif kind == "export":
      from tnjax.interop import load_any, save_hf

      out = save_hf(load_any(rest[0], param_dtype=rest[2] or None), rest[1], max_shard_size=rest[3], dtype=None)
      extra["shards"] = len(list(out.glob("model-*-of-*.safetensors"))) or 1
    else:  # a CLI command
      from tnjax.cli import main

      rc = main([kind, *rest])
  finally:
    peak = None
    if kind in ("make", "hf-reload"):
      import torch

      peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    else:
      import jax

      stats = jax.devices()[0].memory_stats() or {}
      peak = stats.get("peak_bytes_in_use")
    # VmHWM is this process's own peak; wait4's ru_maxrss starts from the parent's RSS at fork
    with open("/proc/self/status") as f:
      hwm = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), None)
    pathlib.Path(record).write_text(json.dumps({"device_peak_bytes": peak, "peak_rss_bytes": hwm, "rc": rc,
                                                "extra": extra}))
  return rc


def run_stage(name: str, args: list[str], log: pathlib.Path) -> dict:
  """Runs one stage in its own process; wall time, peak host RSS and peak device memory."""
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
    record = f.name
  start = time.perf_counter()
  with open(log, "a") as out:
    proc = subprocess.Popen([sys.executable, __file__, "--stage", record, *args], stdout=out, stderr=out,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    _, status, usage = os.wait4(proc.pid, 0)
  wall = time.perf_counter() - start
  proc.returncode = os.waitstatus_to_exitcode(status)
  child = json.loads(pathlib.Path(record).read_text() or "{}") if os.path.getsize(record) else {}
  os.unlink(record)
  return {"stage": name, "rc": proc.returncode, "wall_s": round(wall, 2),
          "peak_rss_gb": round((child.get("peak_rss_bytes") or usage.ru_maxrss * 1024) / 2**30, 3),
          "device_peak_gb": None if child.get("device_peak_bytes") is None else
          round(child["device_peak_bytes"] / 2**30, 3), **child.get("extra", {})}


def environment() -> dict:
  """`_common.environment` without starting a JAX backend here: this process must leave the GPU to its stages."""
  import importlib.metadata
  import platform

  try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,count", "--format=csv,noheader"], capture_output=True,
                         text=True, check=True).stdout.splitlines()
  except (OSError, subprocess.CalledProcessError):
    gpu = []
  versions = {k: importlib.metadata.version(k) for k in ("jax", "jaxlib", "transformers", "torch")}
  return {"device": gpu[0].split(",")[0] if gpu else "cpu", "num_devices": max(len(gpu), 1),
          "cpus": os.cpu_count(), **versions, "python": platform.python_version(), "command": " ".join(sys.argv)}


def main() -> None:
  if len(sys.argv) > 1 and sys.argv[1] == "--stage":
    sys.exit(stage_main(sys.argv[2:]))
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--shapes", default="llama-3.2-1b", help=f"comma-separated, of {sorted(SHAPES)}")
  p.add_argument("--methods", default="svd,svdllm,modegpt,mpo-data")
  p.add_argument("--train", help="training text: the tokenizer and the calibration file (its first --calib-mb)")
  p.add_argument("--valid", help="validation text for eval")
  p.add_argument("--calib-mb", type=float, default=4.0, help="MB of --train given to --calib")
  p.add_argument("--calib-windows", type=int, default=64)
  p.add_argument("--eval-tokens", type=int, default=32768)
  p.add_argument("--ratio", default="0.8")
  p.add_argument("--param-dtype", choices=["float32", "bfloat16"], default=None,
                 help="passed to load, eval, compress and export (default: theirs, float32)")
  p.add_argument("--max-shard-size", default="5GB", help="export's largest shard (save_hf's max_shard_size)")
  p.add_argument("--skip", default="", help="comma-separated stages not to run (e.g. load,eval)")
  p.add_argument("--vocab", type=int, default=8192, help="tokenizer size (at most the shape's vocabulary)")
  p.add_argument("--work", help="directory for checkpoints (default a temporary one); reused when it holds them")
  p.add_argument("--out", help="JSON-lines file to append to")
  p.add_argument("--smoke", action="store_true", help="toy widths with long contexts (CI)")
  args = p.parse_args()
  if args.smoke:
    from tnjax.data import SAMPLE_DIR

    args.shapes, args.methods = "smoke-llama,smoke-qwen2", "svd,svdllm"
    args.train, args.valid = args.train or str(SAMPLE_DIR / "train.txt"), args.valid or str(SAMPLE_DIR / "valid.txt")
    args.vocab, args.eval_tokens, args.calib_mb, args.calib_windows = 400, 2048, 0.1, 4
    args.max_shard_size = "100KB"  # the toy export in shards too, reloaded by transformers
  if not args.train or not args.valid:
    p.error("--train and --valid are needed (or --smoke)")
  work = pathlib.Path(args.work or tempfile.mkdtemp(prefix="bench_scale-"))
  work.mkdir(parents=True, exist_ok=True)
  log = work / "stages.log"
  calib = work / "calib.txt"
  calib.write_text(pathlib.Path(args.train).read_text(encoding="utf-8")[: int(args.calib_mb * 1e6)])
  env = environment()
  for shape in args.shapes.split(","):
    model = work / shape
    stages = []
    if not (model / "config.json").exists():
      stages.append(("make", ["make", shape, str(model), str(calib), str(args.vocab)]))
    stages += [("load", ["load", str(model), args.param_dtype or ""]),
               ("eval", ["eval", "--model", str(model), "--text", args.valid, "--max-tokens", str(args.eval_tokens)])]
    dtype = [] if args.param_dtype is None else ["--param-dtype", args.param_dtype]
    stages[-1][1].extend(dtype)
    for method in args.methods.split(","):
      stages.append((f"compress-{method}", [
          "compress", "--model", str(model), "--method", method, "--ratio", args.ratio, "--calib", str(calib),
          "--calib-windows", str(args.calib_windows), "--out", str(work / f"{shape}-{method}"), "--overwrite",
          *dtype]))
    if "svdllm" in args.methods.split(","):
      small, hf = work / f"{shape}-svdllm" / "model", work / f"{shape}-svdllm-hf"
      stages += [("export", ["export", str(small), str(hf), args.param_dtype or "", args.max_shard_size]),
                 ("hf-reload", ["hf-reload", str(hf)])]
    for name, stage_args in stages:
      if name in args.skip.split(","):
        continue
      row = run_stage(name, stage_args, log)
      _common.emit({"bench": "scale", "shape": shape, **row, "ratio": args.ratio, "calib_windows": args.calib_windows,
                    "param_dtype": args.param_dtype, "max_shard_size": args.max_shard_size,
                    "eval_tokens": args.eval_tokens, **env}, args.out)
      if row["rc"] != 0:
        print(f"bench_scale: stage {name} of {shape} failed (exit {row['rc']}); see {log}", file=sys.stderr)
        print(log.read_text()[-3000:], file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
  main()
