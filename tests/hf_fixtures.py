"""Tiny random Hugging Face GPT-2 checkpoints created by the tests themselves (no hub access)."""

import numpy as np


def make_hf_gpt2(path, *, seed=0, **overrides):
  """Saves a random-init GPT2LMHeadModel to ``path`` and returns the torch model (eval mode)."""
  import torch
  from transformers import GPT2Config, GPT2LMHeadModel

  cfg = dict(vocab_size=101, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
  cfg.update(overrides)
  torch.manual_seed(seed)
  return _perturb_and_save(GPT2LMHeadModel(GPT2Config(**cfg)).eval(), path, ("ln_",))


def _perturb_and_save(model, path, norms):
  """Random biases and norm scales (so their loading is checked too), then ``save_pretrained``."""
  import torch

  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or any(n in name for n in norms):
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(str(path))
  return model


def hf_logits(model, ids):
  import torch

  with torch.no_grad():
    return model(torch.tensor(np.asarray(ids))).logits.numpy()


def make_hf_llama(path, *, seed=0, qwen2=False, **overrides):
  """Saves a random-init LlamaForCausalLM (or Qwen2ForCausalLM) to ``path`` and returns the torch model (eval)."""
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

  cfg = dict(vocab_size=101, max_position_embeddings=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=0, pad_token_id=None,
             tie_word_embeddings=False)
  cfg.update(overrides)
  torch.manual_seed(seed)
  config, cls = (Qwen2Config, Qwen2ForCausalLM) if qwen2 else (LlamaConfig, LlamaForCausalLM)
  return _perturb_and_save(cls(config(**cfg)).eval(), path, ("norm",))
