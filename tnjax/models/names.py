"""The one grammar of layer names, shared by every model family.

A projection in block ``i`` is ``"h.{i}.{projection}"`` (e.g. ``"h.3.mlp.c_fc"``
in GPT-2, ``"h.3.attn.q_proj"`` in a Llama-style model); a projection name alone
(``"mlp.c_fc"``) means that projection in every block; ``"*"`` means every
projection of every block (whatever the family calls them); ``"embedding"``
and ``"lm_head"`` are global. In a config's ``layers`` the most specific key
wins: ``"h.{i}.{projection}"``, then ``"{projection}"``, then ``"*"``. Block sizes are keyed ``"h.{i}"``. Module paths
follow the names (``model.h[3].mlp.c_fc``), so the native file format, the
compression methods and the configs all read names the same way.
"""

from __future__ import annotations

import re

GLOBAL_ONLY = ("embedding", "lm_head")
EVERY_PROJECTION = "*"
_LAYER_KEY = re.compile(r"^h\.(\d+)\.(.+)$")
_BLOCK_KEY = re.compile(r"^h\.(\d+)$")


def layer_key(layer: int, projection: str) -> str:
  """The name of ``projection`` in block ``layer``.

  Examples:
    >>> layer_key(3, "mlp.c_fc")
    'h.3.mlp.c_fc'
  """
  return f"h.{layer}.{projection}"


def block_key(layer: int) -> str:
  """The key of block ``layer``'s sizes (``GPTConfig.dims``)."""
  return f"h.{layer}"


def parse_layer_key(key: str) -> tuple[int | None, str]:
  """``(block, projection)`` of a layer name; block is None for a name without ``"h.{i}."``.

  Examples:
    >>> parse_layer_key("h.3.mlp.c_fc"), parse_layer_key("mlp.c_fc"), parse_layer_key("lm_head")
    ((3, 'mlp.c_fc'), (None, 'mlp.c_fc'), (None, 'lm_head'))
  """
  m = _LAYER_KEY.match(key)
  return (int(m.group(1)), m.group(2)) if m else (None, key)


def parse_block_key(key: str) -> int | None:
  """The block index of a ``"h.{i}"`` key, or None for anything else."""
  m = _BLOCK_KEY.match(key)
  return int(m.group(1)) if m else None
