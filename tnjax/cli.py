"""The ``tnjax`` command: ``tnjax train``, ``tnjax eval``, ``tnjax generate``, ``tnjax compress``."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


def _load(model_dir: str, tokenizer: str | None):
  from tnjax.data import load_tokenizer
  from tnjax.interop import load_any

  return load_any(model_dir), load_tokenizer(tokenizer or model_dir)


def cmd_eval(args) -> int:
  from tnjax.eval import perplexity

  model, tok = _load(args.model, args.tokenizer)
  text = pathlib.Path(args.text).read_text(encoding="utf-8")
  ids = tok.encode(text).ids
  if args.max_tokens:
    ids = ids[: args.max_tokens]
  result = perplexity(model, ids, block_size=args.block_size, stride=args.stride)
  print(json.dumps({"model": args.model, "text": args.text, **result}))
  return 0


def cmd_generate(args) -> int:
  import jax

  from tnjax.models import generate

  model, tok = _load(args.model, args.tokenizer)
  prompt = tok.encode(args.prompt).ids
  if not prompt:
    raise SystemExit("tnjax generate: the prompt encodes to no tokens")
  out = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                 rng=jax.random.key(args.seed))
  print(tok.decode([int(t) for t in out]))
  return 0


def cmd_train(args) -> int:
  if args.distributed:
    import jax

    jax.distributed.initialize()  # reads the coordinator, process count and id from the environment
  from tnjax.train import resolve, train

  cfg = resolve(args.config, args.set)
  report = train(cfg, resume=args.resume, progress=not args.no_progress)
  print(json.dumps(report, indent=2))
  print(f"run directory: {cfg.out_dir} (report.md, loss.png, model/)")
  return 0


def _text_ids(tok, path: str | None, max_tokens: int | None):
  if path is None:
    return None
  ids = tok.encode(pathlib.Path(path).read_text(encoding="utf-8")).ids
  return ids[:max_tokens] if max_tokens else ids


def cmd_compress(args) -> int:
  from tnjax.compress.report import parse_targets, run

  targets = parse_targets(args.rank, args.ratio, args.rtol)
  model, tok = _load(args.model, args.tokenizer)
  layers = args.layers.split(",") if args.layers else None
  report = run(model, args.method, args.out, targets=targets, valid_ids=_text_ids(tok, args.valid, args.max_tokens),
               calib_ids=_text_ids(tok, args.calib, None), layers=layers, heal_steps=args.heal_steps,
               heal_lr=args.heal_lr, int8=args.int8, block_size=args.block_size, tokenizer=tok,
               layout=args.layout)
  for r in report["runs"]:
    s = r["summary"]
    ppl = "" if r["perplexity"] is None else f", val ppl {r['perplexity']:.3f}"
    print(f"{args.method} {r['target']}: compressed part {s['part_compression']:.2f}x, model "
          f"{s['params_before']:,} -> {s['params_after']:,} params{ppl}, {r['compress_s']:.2f} s")
  print(f"report: {args.out}/report.md")
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="tnjax", description="Tensor networks for language models.")
  sub = parser.add_subparsers(dest="command", required=True)

  tr = sub.add_parser("train", help="pre-train a (tensorized) GPT; no arguments: a tiny TTM-GPT on the sample corpus")
  tr.add_argument("--config", help="TOML file of TrainConfig fields")
  tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="override a field, e.g. steps=1000, layers.mlp.c_fc={\"kind\":\"ttm\",\"rank\":64}")
  tr.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
  tr.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() (multi-host)")
  tr.add_argument("--no-progress", action="store_true", help="no progress bar")
  tr.set_defaults(run=cmd_train)

  ev = sub.add_parser("eval", help="perplexity of a model on a text file")
  ev.add_argument("--model", required=True, help="tnjax or Hugging Face GPT-2 directory")
  ev.add_argument("--text", required=True, help="UTF-8 text file")
  ev.add_argument("--tokenizer", help="tokenizer file or directory (default: the model directory)")
  ev.add_argument("--block-size", type=int, default=None)
  ev.add_argument("--stride", type=int, default=None)
  ev.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
  ev.set_defaults(run=cmd_eval)

  gen = sub.add_parser("generate", help="continue a prompt")
  gen.add_argument("--model", required=True, help="tnjax or Hugging Face GPT-2 directory")
  gen.add_argument("--prompt", required=True)
  gen.add_argument("--tokenizer", help="tokenizer file or directory (default: the model directory)")
  gen.add_argument("--max-new-tokens", type=int, default=50)
  gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  gen.add_argument("--top-k", type=int, default=None)
  gen.add_argument("--seed", type=int, default=0)
  gen.set_defaults(run=cmd_generate)

  co = sub.add_parser("compress", help="compress a trained model (TensorGPT, MPO, MoDeGPT, SVD)")
  co.add_argument("--model", required=True, help="tnjax or Hugging Face GPT-2 directory")
  co.add_argument("--method", required=True, choices=["tensorgpt", "mpo", "modegpt", "svd"])
  co.add_argument("--rank", help="rank cap (mpo: bond dimension chi); comma-separated for a sweep")
  co.add_argument("--ratio", help="fraction of the compressed part's parameters kept, in (0, 1]; "
                  "comma-separated for a sweep (writes perplexity.png)")
  co.add_argument("--rtol", help="relative Frobenius error per layer (per row for tensorgpt)")
  co.add_argument("--layers", help="comma-separated layer names, e.g. mlp.c_fc,h.11.attn.c_proj (mpo, svd)")
  co.add_argument("--layout", choices=["balanced", "fused"], default=None,
                  help="mpo only: 'fused' makes two-core layers run by the fused GPU kernels (rank <= 16)")
  co.add_argument("--calib", help="text file: calibration for modegpt, training text for --heal-steps")
  co.add_argument("--valid", help="text file for validation perplexity before and after")
  co.add_argument("--max-tokens", type=int, default=None, help="score only the first N validation tokens")
  co.add_argument("--block-size", type=int, default=None, help="window for evaluation and calibration")
  co.add_argument("--heal-steps", type=int, default=0, help="fine-tune this many steps after compressing")
  co.add_argument("--heal-lr", type=float, default=1e-4)
  co.add_argument("--int8", action="store_true", help="weight-only int8 on top (after healing)")
  co.add_argument("--tokenizer", help="tokenizer file or directory (default: the model directory)")
  co.add_argument("--out", required=True, help="output directory (model/, report.json, report.md)")
  co.set_defaults(run=cmd_compress)

  args = parser.parse_args(argv)
  try:
    return args.run(args)
  except ValueError as e:
    print(f"tnjax {args.command}: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
