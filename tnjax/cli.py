"""The ``tnjax`` command: ``tnjax train``, ``tnjax eval``, ``tnjax generate``."""

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

  args = parser.parse_args(argv)
  try:
    return args.run(args)
  except ValueError as e:
    print(f"tnjax {args.command}: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
