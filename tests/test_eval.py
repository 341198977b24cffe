import jax.numpy as jnp
import numpy as np
import pytest

from tests.hf_fixtures import make_hf_gpt2
from tnjax.eval import perplexity, windows
from tnjax.interop import load_hf_gpt2

pytestmark = pytest.mark.filterwarnings("ignore")


def _hf_guide_nll(hf, ids, block, stride):
  """The sliding-window loop of Hugging Face's perplexity guide, with exact token counts."""
  import torch

  seq = torch.tensor(ids)[None]
  nll_sum, n_tokens, prev_end = 0.0, 0, 0
  for begin in range(0, seq.size(1), stride):
    end = min(begin + block, seq.size(1))
    trg_len = end - prev_end
    inp = seq[:, begin:end]
    target = inp.clone()
    target[:, :-trg_len] = -100
    with torch.no_grad():
      logits = hf(inp).logits[:, :-1]
    labels = target[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    nll_sum += float(loss)
    n_tokens += int((labels != -100).sum())
    prev_end = end
    if end == seq.size(1):
      break
  return nll_sum / n_tokens, n_tokens


@pytest.mark.parametrize("block, stride", [pytest.param(32, 32, marks=pytest.mark.slow), (32, 8),
                                           pytest.param(16, 16, marks=pytest.mark.slow), (20, 7)])
def test_perplexity_matches_hugging_face_guide(tmp_path, block, stride):
  hf = make_hf_gpt2(tmp_path)
  model = load_hf_gpt2(tmp_path)
  ids = np.random.default_rng(0).integers(0, 101, 90)
  ref_nll, ref_n = _hf_guide_nll(hf, ids, block, stride)
  out = perplexity(model, ids, block_size=block, stride=stride)
  assert out["tokens"] == ref_n
  np.testing.assert_allclose(out["nll"], ref_nll, rtol=1e-5)
  np.testing.assert_allclose(out["perplexity"], np.exp(ref_nll), rtol=1e-5)


def test_batches_of_windows_give_the_same_result(tmp_path):
  make_hf_gpt2(tmp_path)
  model = load_hf_gpt2(tmp_path)
  ids = np.random.default_rng(2).integers(0, 101, 90)  # 12 windows: batches of 5 leave a padded last call
  outs = [perplexity(model, ids, block_size=20, stride=7, batch_size=b) for b in (1, 5, None)]
  assert len({o["tokens"] for o in outs}) == 1
  for o in outs[1:]:
    np.testing.assert_allclose(o["nll"], outs[0]["nll"], rtol=1e-6)
  with pytest.raises(ValueError, match=r"perplexity: batch_size=0 but a positive integer is expected"):
    perplexity(model, ids, batch_size=0)


def test_single_window_equals_direct_computation(tmp_path):
  make_hf_gpt2(tmp_path)
  model = load_hf_gpt2(tmp_path)
  ids = np.random.default_rng(1).integers(0, 101, 30)
  logits = np.asarray(model(jnp.asarray(ids)[None]), np.float64)[0, :-1]
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  nll = -np.mean(logp[np.arange(29), ids[1:]])
  out = perplexity(model, ids)
  assert out["tokens"] == 29
  np.testing.assert_allclose(out["nll"], nll, rtol=1e-5)


def test_every_token_scored_once():
  for length, block, stride in [(100, 32, 8), (100, 32, 31), (33, 32, 5), (5, 32, 32)]:
    scored = []
    for begin, end, first in windows(length, block, stride):
      scored += list(range(begin + first, end))
    assert scored == list(range(1, length))
  # Without overlap (stride == block) a window's first token has no context and, as in
  # Hugging Face's guide, is not scored.
  scored = [t for b, e, f in windows(100, 32, 32) for t in range(b + f, e)]
  assert scored == [t for t in range(1, 100) if t % 32]


def test_errors(tmp_path):
  make_hf_gpt2(tmp_path)
  model = load_hf_gpt2(tmp_path)
  with pytest.raises(ValueError, match=r"perplexity: token_ids contain 101 but 0 <= id < vocab_size=101"):
    perplexity(model, [1, 101])
  with pytest.raises(ValueError, match=r"perplexity: token_ids.shape=\(1,\), dtype=int64 but 1-d integer ids"):
    perplexity(model, [1])
  with pytest.raises(ValueError, match=r"perplexity: block_size=64 but 2 <= block_size <= 32"):
    perplexity(model, [1, 2, 3], block_size=64)
  with pytest.raises(ValueError, match=r"perplexity: stride=40 but 1 <= stride <= block_size=3 "):
    perplexity(model, [1, 2, 3], stride=40)  # the default window is the text's 3 tokens


def _window_shapes(monkeypatch):
  """Records the (batch, window) shape of every device call `perplexity` makes."""
  import tnjax.eval as ev

  shapes, real = [], ev._window_nll
  monkeypatch.setattr(ev, "_window_nll", lambda g, s, ids, w: (shapes.append(ids.shape), real(g, s, ids, w))[1])
  return shapes


def test_default_window_fits_the_text_not_the_context(monkeypatch):
  """A long-context model (Llama-3.x, Qwen2.5) is never padded to its context: the default window is the
  smallest of the context, DEFAULT_WINDOW and the text, and scores what the same explicit window scores."""
  from flax import nnx

  import tnjax.eval as ev
  from tnjax.models import Llama, preset

  model = Llama(preset("llama-tiny", block_size=1 << 17), rngs=nnx.Rngs(0))
  ids = np.random.default_rng(0).integers(0, 512, 300)
  shapes = _window_shapes(monkeypatch)
  default = perplexity(model, ids)
  assert shapes == [(1, 300)] and default["tokens"] == 299
  padded = perplexity(model, ids, block_size=4096)  # longer than the text: scored as far as the text goes
  np.testing.assert_allclose(padded["nll"], default["nll"], rtol=1e-6)
  assert shapes[-1] == (1, 300)
  monkeypatch.setattr(ev, "DEFAULT_WINDOW", 64)  # a text longer than the default window
  shapes.clear()
  default = perplexity(model, ids)
  explicit = perplexity(model, ids, block_size=64)
  assert {s[1] for s in shapes} == {64} and default == explicit and default["tokens"] == 300 - 5


def test_window_size_refusals():
  from tnjax.eval import DEFAULT_WINDOW, window_size

  assert window_size("f", 1 << 17, 10**6) == DEFAULT_WINDOW == 2048
  assert window_size("f", 1 << 17, 100, reads_past=2) == 98
  with pytest.raises(ValueError, match=r"f: block_size=4096 but 2 <= block_size <= 2048 \(the model's context\)"):
    window_size("f", 2048, 10**6, 4096)
  with pytest.raises(ValueError, match=r"f: calib \(--calib\) has 100 tokens but a window of 512 needs at least "
                                       r"514; give more text or a smaller block_size \(--block-size\)"):
    window_size("f", 2048, 100, 512, reads_past=2, text="calib (--calib)")
  with pytest.raises(ValueError, match=r"f: tokens has 3 tokens but a window of 2 needs at least 4"):
    window_size("f", 2048, 3, reads_past=2, text="tokens")
