"""The ``tnjax`` command: ``tnjax train``, ``tnjax eval``, ``tnjax generate``, ``tnjax compress``.

One error boundary (`main`): an expected failure (a missing, unreadable
or undecodable file, a corrupt or mismatched model or checkpoint, a bad value)
prints one line naming the file or argument and exits 2, and so does running out of host or device memory
(naming the option that lowers it); Ctrl-C prints one
line and exits 130; anything else keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


def _load(model_dir: str, tokenizer: str | None, param_dtype: str | None = None):
  """The model of ``--model`` and its tokenizer (``--tokenizer``, or the model directory's), checked to be the one
  the model was written with when its directory records it."""
  from tnjax.data import check_fingerprint, load_tokenizer
  from tnjax.interop import load_any
  from tnjax.interop.native import saved_tokenizer

  if not pathlib.Path(model_dir).is_dir():
    raise ValueError(f"--model {model_dir} is not a directory; a tnjax or Hugging Face (GPT-2, Llama, Qwen2) model "
                     "directory is expected")
  recorded = saved_tokenizer(model_dir)
  if recorded is None:  # nothing to check: the model's own errors (no config, too large) come first
    model = load_any(model_dir, param_dtype=param_dtype)
    return model, load_tokenizer(tokenizer or model_dir)
  tok = load_tokenizer(tokenizer or model_dir)  # checked before any weight is read
  check_fingerprint("--tokenizer" if tokenizer else "--model", tok, tokenizer or f"{model_dir}/tokenizer.json",
                    recorded, model_dir)
  return load_any(model_dir, param_dtype=param_dtype), tok


def _text_ids(tok, model, command: str, arg: str, path: str | None, max_tokens: int | None = None):
  from tnjax._io import read_text

  if path is None:
    return None
  ids = tok.encode(read_text(command, arg, path)).ids
  if not ids:
    raise ValueError(f"{command}: {arg} file {path} encodes to no tokens; a non-empty text file is expected")
  return _check_ids(model, command, f"{arg} file {path}", ids[:max_tokens] if max_tokens else ids)


def _check_ids(model, command: str, what: str, ids: list[int]) -> list[int]:
  """Refuses ids past the model's vocabulary (the embedding would read past its table: NaN or nonsense)."""
  top, vocab = max(ids), model.config.vocab_size
  if top >= vocab:
    raise ValueError(f"{command}: {what} encodes to id {top:,} but the model has vocab_size={vocab:,}; the "
                     "tokenizer is not the model's (--tokenizer)")
  return ids


def cmd_eval(args) -> int:
  from tnjax.eval import perplexity

  model, tok = _load(args.model, args.tokenizer, args.param_dtype)
  ids = _text_ids(tok, model, "eval", "--text", args.text, args.max_tokens)
  result = perplexity(model, ids, block_size=args.block_size, stride=args.stride, batch_size=args.batch_size)
  print(json.dumps({"model": args.model, "text": args.text, **result}, allow_nan=False))
  return 0


def _until_stop(ids, stops) -> list[int]:
  """New ids up to their first stop token, excluded (what follows it is padding)."""
  ids = [int(t) for t in ids]
  return ids[: next((i for i, t in enumerate(ids) if t in stops), len(ids))]


def _one_line_text(text: str) -> str:
  r"""A continuation on one output line: backslashes, newlines and carriage returns written as ``\\``, ``\n``,
  ``\r``."""
  return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def cmd_generate(args) -> int:
  import jax

  from tnjax._io import read_text
  from tnjax.models import generate

  if args.prompts is not None:  # read and check the file before loading the model
    lines = read_text("generate", "--prompts", args.prompts).splitlines()
    if not lines:
      raise ValueError(f"generate: --prompts file {args.prompts} has no lines; one prompt per line is expected")
  model, tok = _load(args.model, args.tokenizer, args.param_dtype)
  stops = set(args.stop_id)
  options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, stop_tokens=sorted(stops),
                 dtype=args.param_dtype)
  key = jax.random.key(args.seed)
  if args.prompts is None:
    prompt = tok.encode(args.prompt).ids
    if not prompt:
      raise ValueError(f"--prompt {args.prompt!r} encodes to no tokens; a non-empty prompt is expected")
    _check_ids(model, "generate", f"--prompt {args.prompt!r}", prompt)
    out = generate(model, prompt, args.max_new_tokens, rng=key, **options)
    print(tok.decode(prompt + _until_stop(out[len(prompt):], stops)))
    return 0
  prompts = [tok.encode(line).ids for line in lines]
  empty = next((i for i, p in enumerate(prompts) if not p), None)
  if empty is not None:
    raise ValueError(f"generate: --prompts file {args.prompts} line {empty + 1} ({lines[empty]!r}) encodes to no "
                     "tokens; a non-empty prompt on every line is expected")
  for i, p in enumerate(prompts):
    _check_ids(model, "generate", f"--prompts file {args.prompts} line {i + 1}", p)
  for chunk, first in enumerate(range(0, len(prompts), args.batch_size)):
    batch = prompts[first:first + args.batch_size]
    out = generate(model, batch, args.max_new_tokens, rng=jax.random.fold_in(key, chunk), **options)
    longest = max(len(p) for p in batch)
    for row in out:
      print(_one_line_text(tok.decode(_until_stop(row[longest:], stops))), flush=True)
  return 0


def cmd_train(args) -> int:
  if args.distributed:
    import jax

    jax.distributed.initialize()  # reads the coordinator, process count and id from the environment
  from tnjax.train import branch, resolve, train

  if args.list_fields:
    print(_fields_help())
    return 0
  if (args.branch is None) != (args.at is None):
    raise ValueError("--branch RUN and --at STEP go together (branch RUN's checkpoint STEP into a new run)")
  if args.branch is not None:
    if args.config or args.resume:
      raise ValueError("--branch takes its configuration from RUN; --config and --resume do not apply")
    sets = dict(item.split("=", 1) for item in args.set if "=" in item)
    if set(sets) != {"steps", "out_dir"} or len(args.set) != 2:
      raise ValueError(f"--branch needs exactly --set steps=N and --set out_dir=DIR (given {args.set})")
    if not sets["steps"].isdigit():
      raise ValueError(f"--set steps={sets['steps']!r} but a positive integer is expected")
    cfg = branch(args.branch, args.at, int(sets["steps"]), sets["out_dir"])
    resume = True
  else:
    cfg, resume = resolve(args.config, args.set, resume=args.resume), args.resume
  report = train(cfg, resume=resume, progress=not args.no_progress)
  print(json.dumps(report, indent=2, allow_nan=False))
  print(f"run directory: {cfg.out_dir} (report.md, loss.png; best_model/: lowest validation loss, model/: last step)")
  return 0


def _method_options(m, given: list[str], layout: str | None) -> dict:
  """``--option KEY=VALUE`` items (and ``--layout``) as the keyword options of method ``m``, checked against the
  registry before anything loads; a value is read as JSON when it parses (``1e-4``, ``true``), else kept as a
  string (``ttm``)."""
  from tnjax.compress.registry import check_options

  options = {}
  for item in given:
    key, eq, value = item.partition("=")
    if not eq or not key:
      raise ValueError(f"--option {item!r} but KEY=VALUE is expected (e.g. --option form=ttm)")
    try:
      options[key] = json.loads(value)
    except json.JSONDecodeError:
      options[key] = value
  if layout is not None:
    if "layout" in options:
      raise ValueError("--layout and --option layout= both given; give one")
    options["layout"] = layout
  check_options("compress", m, options)
  return options


def cmd_compress(args) -> int:
  from tnjax.compress import progress_bars
  from tnjax.compress.methods import refactored, refactoring_note
  from tnjax.compress.registry import method
  from tnjax.compress.report import compressed_part, parse_targets, run

  targets = parse_targets(args.rank, args.ratio, args.rtol)
  m = method(args.method)
  options = _method_options(m, args.option, args.layout)
  model, tok = _load(args.model, args.tokenizer, args.param_dtype)
  layers = args.layers.split(",") if args.layers else None
  writes = m.writes
  if writes and layers is None:  # tensorized layers re-factored by default: refused unless asked, or named
    names = compressed_part(model, args.method, None)
    found = refactored(model.config, names, writes)
    if found and not args.refactor_tensorized:
      raise ValueError(refactoring_note("compress", found, writes, f"--method {args.method}") + "; pass "
                       "--refactor-tensorized to do so, or name the layers to compress with --layers")
    if found:
      layers = names  # named: consent given
  with progress_bars(False if args.no_progress else None):  # bars on a terminal only: piped stderr stays one line
    report = run(model, args.method, args.out, targets=targets,
                 valid_ids=_text_ids(tok, model, "compress", "--valid", args.valid, args.max_tokens),
                 calib_ids=_text_ids(tok, model, "compress", "--calib", args.calib), layers=layers,
                 heal_steps=args.heal_steps, heal_lr=args.heal_lr, int8=args.int8, block_size=args.block_size,
                 tokenizer=tok, overwrite=args.overwrite, allocation=args.allocation, sequential=args.sequential,
                 if_larger=args.if_larger, calib_windows=args.calib_windows, max_shard_size=args.max_shard_size,
                 **options)
  for r in report["runs"]:
    s = r["summary"]
    ppl = "" if r["perplexity"] is None else f", val ppl {r['perplexity']:.3f}"
    print(f"{args.method} {r['target']}: compressed part {s['part_compression']:.2f}x, model "
          f"{s['params_before']:,} -> {s['params_after']:,} params{ppl}, {r['compress_s']:.2f} s")
  print(f"report: {args.out}/report.md")
  return 0


def _fields_help() -> str:
  """Every TrainConfig field with its type and default, and how to ask for a dense or a TT-matrix model."""
  import dataclasses

  from tnjax.nn import kinds
  from tnjax.train import TrainConfig

  cfg = TrainConfig()
  rows = [f"  {f.name} ({f.type}) = {json.dumps(getattr(cfg, f.name))}" for f in dataclasses.fields(cfg)]
  return "\n".join([
      "fields (set with --set KEY=VALUE, values in JSON, or as top-level keys of a --config TOML file):", *rows, "",
      "examples:",
      "  tnjax train                                    # the defaults: a tiny TTM-GPT on the packaged sample",
      "  tnjax train --set 'layers={}'                  # the same GPT, dense (no tensorized layer)",
      "  tnjax train --set model=llama-tiny             # a tiny Llama-style model (RoPE, SwiGLU, GQA), TTM rank 16",
      "  tnjax train --set 'layers.mlp.c_fc={\"kind\": \"ttm\", \"rank\": 64}' --set steps=1000",
      "  tnjax train --set 'train_files=[\"my.txt\"]' --set 'valid_files=[\"my_valid.txt\"]' --set out_dir=runs/mine",
      f"  layer kinds: {', '.join(k.summary for k in map(kinds.get, kinds.kind_names()))}; layer keys: '*' "
      "(every projection), a projection, 'h.<i>.<projection>'; 'model_overrides.n_layer=4' sets a config field"])


def _int_at_least(low: int):
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} but an integer >= {low} is expected") from None
    if value < low:
      raise argparse.ArgumentTypeError(f"{value} but an integer >= {low} is expected")
    return value
  return parse


def _float_at_least(low: float, strict: bool):
  expected = f"a number {'>' if strict else '>='} {low}"

  def parse(text: str) -> float:
    try:
      value = float(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} but {expected} is expected") from None
    if not (value > low if strict else value >= low) or value != value or value == float("inf"):
      raise argparse.ArgumentTypeError(f"{value} but {expected} (finite) is expected")
    return value
  return parse


def _probability(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} but a number in (0, 1] is expected") from None
  if not 0 < value <= 1:
    raise argparse.ArgumentTypeError(f"{value} but a number in (0, 1] is expected")
  return value


def _param_dtype_option(parser, computation: str = " (the computation stays float32)") -> None:
  from tnjax.interop.native import PARAM_DTYPES

  parser.add_argument("--param-dtype", choices=PARAM_DTYPES, default=None,
                      help="dtype the loaded parameters are kept in (default float32); bfloat16 holds a bf16 "
                      f"checkpoint at its own size{computation}")


def _parser() -> argparse.ArgumentParser:
  from tnjax import __version__

  parser = argparse.ArgumentParser(prog="tnjax", description="Tensor networks for language models.")
  parser.add_argument("--version", action="version", version=f"tnjax {__version__}")
  sub = parser.add_subparsers(dest="command", required=True)

  tr = sub.add_parser("train", help="pre-train a (tensorized) model; no arguments: a tiny TTM-GPT on the sample corpus",
                      epilog=_fields_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
  tr.add_argument("--config", help="TOML file of TrainConfig fields, or a run's train_config.json")
  tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="override a field, e.g. steps=1000, layers.mlp.c_fc={\"kind\":\"ttm\",\"rank\":64}")
  tr.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir, with its "
                  "saved train_config.json; --set changes steps and fields that keep the model and its data")
  tr.add_argument("--branch", metavar="RUN", help="continue the wsd run RUN's checkpoint --at into a new run of "
                  "--set steps=N in --set out_dir=DIR (one run, several budgets)")
  tr.add_argument("--at", type=_int_at_least(0), metavar="STEP", help="the checkpoint step that --branch continues")
  tr.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() (multi-host)")
  tr.add_argument("--no-progress", action="store_true", help="no progress bar")
  tr.add_argument("--list-fields", action="store_true", help="print every field with its default, and exit")
  tr.set_defaults(run=cmd_train)

  positive, at_least_2, non_negative = _int_at_least(1), _int_at_least(2), _int_at_least(0)
  ev = sub.add_parser("eval", help="perplexity of a model on a text file")
  ev.add_argument("--model", required=True, help="tnjax or Hugging Face (GPT-2, Llama, Qwen2) directory")
  ev.add_argument("--text", required=True, help="UTF-8 text file")
  ev.add_argument("--tokenizer", help="tokenizer file or directory (default: the model directory)")
  ev.add_argument("--block-size", type=at_least_2, default=None,
                  help="window (default: the smallest of the model's context, 2048 and the text)")
  ev.add_argument("--stride", type=positive, default=None, help="step between windows (default: the window)")
  ev.add_argument("--batch-size", type=positive, default=None,
                  help="windows per device call (default: as many as keep the logits within 32M floats, at most 64)")
  ev.add_argument("--max-tokens", type=at_least_2, default=None, help="score only the first N tokens")
  _param_dtype_option(ev)
  ev.set_defaults(run=cmd_eval)

  gen = sub.add_parser("generate", help="continue a prompt, or every line of a file (batched)")
  gen.add_argument("--model", required=True, help="tnjax or Hugging Face (GPT-2, Llama, Qwen2) directory")
  given = gen.add_mutually_exclusive_group(required=True)
  given.add_argument("--prompt", help="one prompt: prints it with its continuation")
  given.add_argument("--prompts", metavar="FILE", help="UTF-8 file of one prompt per line: prints one continuation "
                     "per line, in order (newlines in it written as \\n, backslashes as \\\\)")
  gen.add_argument("--tokenizer", help="tokenizer file or directory (default: the model directory)")
  gen.add_argument("--max-new-tokens", type=positive, default=50)
  gen.add_argument("--temperature", type=_float_at_least(0.0, strict=False), default=0.0, help="0 = greedy")
  gen.add_argument("--top-k", type=positive, default=None, help="sample among the k most likely tokens")
  gen.add_argument("--top-p", type=_probability, default=None,
                   help="sample from the smallest set of tokens whose probability reaches p, in (0, 1]")
  gen.add_argument("--stop-id", type=non_negative, action="append", default=[], metavar="ID",
                   help="a token id that ends a continuation (repeat for several)")
  gen.add_argument("--seed", type=non_negative, default=0)
  gen.add_argument("--batch-size", type=positive, default=16, help="--prompts lines per compiled call (default 16)")
  _param_dtype_option(gen, "; generation computes in it too (bfloat16 halves the bytes each step reads)")
  gen.set_defaults(run=cmd_generate)

  from tnjax.compress.registry import REGISTRY  # the one list of methods
  from tnjax.compress.targets import ALLOCATIONS, IF_LARGER

  co = sub.add_parser("compress", help="compress a trained model (" + ", ".join(REGISTRY) + ")",
                      formatter_class=argparse.RawDescriptionHelpFormatter,
                      description="methods:\n" + "\n".join(f"  {k:10s} {m.summary}" for k, m in REGISTRY.items()))
  co.add_argument("--model", required=True, help="tnjax or Hugging Face (GPT-2, Llama, Qwen2) directory")
  co.add_argument("--method", required=True, choices=list(REGISTRY))
  co.add_argument("--rank", help="rank cap (mpo: bond dimension); comma-separated for a sweep")
  co.add_argument("--ratio", help="fraction of the compressed part's parameters kept, in (0, 1]; "
                  "comma-separated for a sweep (writes perplexity.png)")
  co.add_argument("--rtol", help="relative Frobenius error per layer (per row for tensorgpt)")
  co.add_argument("--layers", help="comma-separated layer names, e.g. mlp.c_fc,h.11.attn.c_proj (mpo, svd)")
  co.add_argument("--refactor-tensorized", action="store_true",
                  help="let svd, svdllm, mpo and mpo-data re-factor tensorized layers of another kind (a TT-matrix "
                  "model's layers into low-rank ones, from their dense reconstruction); without it, refused unless "
                  "--layers names them")
  co.add_argument("--layout", choices=["balanced", "fused"], default=None,
                  help="mpo only: 'fused' makes two-core layers run by the fused GPU kernels (rank <= 16)")
  takes = "; ".join(f"{k}: {', '.join(m.options)}" for k, m in REGISTRY.items() if m.options)
  co.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                  help=f"a method's own option, repeatable ({takes}); a value is read as JSON when it parses")
  co.add_argument("--calib", help="text file: calibration (modegpt, svdllm, mpo-data, --allocation importance), "
                  "training text for --heal-steps")
  co.add_argument("--allocation", choices=ALLOCATIONS, default="uniform",
                  help="how a --ratio is spread over layers (default uniform)")
  co.add_argument("--sequential", action="store_true",
                  help="svdllm, mpo-data: calibrate each block on the outputs of the compressed blocks before it")
  co.add_argument("--if-larger", choices=IF_LARGER, default="error",
                  help="a layer the target would not make smaller: refuse (default), keep it, or allow growth")
  co.add_argument("--valid", help="text file for validation perplexity before and after")
  co.add_argument("--max-tokens", type=at_least_2, default=None, help="score only the first N validation tokens")
  co.add_argument("--block-size", type=at_least_2, default=None, help="window for evaluation, calibration and "
                  "healing (default: the smallest of the model's context, 2048 and the text)")
  co.add_argument("--calib-windows", type=positive, default=64,
                  help="calibration windows read from --calib, evenly spaced (default 64)")
  co.add_argument("--heal-steps", type=non_negative, default=0, help="fine-tune this many steps after compressing")
  co.add_argument("--heal-lr", type=_float_at_least(0.0, strict=True), default=1e-4)
  co.add_argument("--int8", action="store_true", help="weight-only int8 on top (after healing)")
  co.add_argument("--tokenizer", help="tokenizer file or directory (default: the model directory)")
  co.add_argument("--out", required=True, help="output directory (model/, report.json, report.md); refused when it "
                  "already holds a model or a report, unless --overwrite, and while another run writes into it; a "
                  "failed run removes what it wrote there")
  co.add_argument("--no-progress", action="store_true", help="no progress bars (shown only on a terminal)")
  co.add_argument("--overwrite", action="store_true", help="replace the models and reports already in --out")
  co.add_argument("--max-shard-size", default="5GB", help="largest file of a saved model, e.g. 5GB, 500MB "
                  "(default 5GB); a larger model is written as shards with an index")
  _param_dtype_option(co)
  co.set_defaults(run=cmd_compress)
  return parser


def _one_line(e: BaseException) -> str:
  if isinstance(e, OSError) and e.filename is not None:
    text = f"{e.filename}: {e.strerror or e}"
  else:
    text = str(e) or type(e).__name__
  return " ".join(text.split())


# What lowers each command's memory, named when the host or the device runs out of it.
_MEMORY_OPTIONS = {"eval": "--block-size or --batch-size", "compress": "--block-size or --calib-windows",
                   "generate": "--max-new-tokens", "train": "--set batch_size (with --set grad_accum to keep the "
                   "batch) or --set block_size"}


# What Ctrl-C leaves where it is not the default (a compression removes its partial outputs: a retry then runs).
_INTERRUPTED = {"compress": "what this run had written to --out was removed"}


def _out_of_memory(e: BaseException) -> str | None:
  """The first line of a host or device out-of-memory error (XLA's RESOURCE_EXHAUSTED), else None."""
  if isinstance(e, MemoryError):
    return f"the host ran out of memory ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})"
  if isinstance(e, RuntimeError) and "RESOURCE_EXHAUSTED" in str(e):  # jax.errors.JaxRuntimeError
    line = next(line for line in str(e).splitlines() if "RESOURCE_EXHAUSTED" in line)
    return f"the device ran out of memory ({' '.join(line.split())[:300]})"
  return None


def main(argv=None) -> int:
  """Runs one command; returns its exit code: 0, 2 for an expected failure (one line on stderr), 130 for Ctrl-C."""
  args = _parser().parse_args(argv)
  try:
    return args.run(args)
  except KeyboardInterrupt:
    left = _INTERRUPTED.get(args.command, "checkpoints and files already written are intact")
    print(f"tnjax {args.command}: interrupted; {left}", file=sys.stderr)
    return 130
  except (ValueError, OSError) as e:  # expected: bad values, files missing, unreadable, corrupt or mismatched
    print(f"tnjax {args.command}: {_one_line(e)}", file=sys.stderr)
    return 2
  except (MemoryError, RuntimeError) as e:
    why = _out_of_memory(e)
    if why is None:
      raise
    print(f"tnjax {args.command}: {why}; lower {_MEMORY_OPTIONS[args.command]}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
