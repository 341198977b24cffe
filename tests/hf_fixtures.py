"""Tiny random Hugging Face GPT-2 checkpoints created by the tests themselves (no hub access)."""

import numpy as np


def make_hf_gpt2(path, *, seed=0, **overrides):
  """Saves a random-init GPT2LMHeadModel to ``path`` and returns the torch model (eval mode)."""
  import torch
  from transformers import GPT2Config, GPT2LMHeadModel

  cfg = dict(vocab_size=101, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
  cfg.update(overrides)
  torch.manual_seed(seed)
  model = GPT2LMHeadModel(GPT2Config(**cfg)).eval()
  with torch.no_grad():  # random biases and LayerNorm params, so their loading is checked too
    for name, p in model.named_parameters():
      if name.endswith("bias") or "ln_" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(str(path))
  return model


def hf_logits(model, ids):
  import torch

  with torch.no_grad():
    return model(torch.tensor(np.asarray(ids))).logits.numpy()
