import json

import pytest

from tests.data.test_tokenizer import TEXT
from tests.hf_fixtures import make_hf_gpt2
from tnjax.cli import main
from tnjax.data import train_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture
def model_dir(tmp_path):
  text = tmp_path / "text.txt"
  text.write_text(TEXT)
  d = tmp_path / "model"
  make_hf_gpt2(d, vocab_size=300, n_positions=64)
  train_tokenizer([text], 300).save(str(d / "tokenizer.json"))
  return d, text


def test_eval_and_generate(model_dir, capsys):
  d, text = model_dir
  assert main(["eval", "--model", str(d), "--text", str(text), "--block-size", "32", "--stride", "16",
               "--max-tokens", "200"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["tokens"] == 199 and 1 < result["perplexity"] < 1000
  assert main(["generate", "--model", str(d), "--prompt", "In the beginning", "--max-new-tokens", "8"]) == 0
  assert capsys.readouterr().out.startswith("In the beginning")


def test_errors_exit_2(model_dir, tmp_path, capsys):
  d, _ = model_dir
  assert main(["eval", "--model", str(tmp_path / "nowhere"), "--text", "x"]) == 2
  assert "config.json does not exist" in capsys.readouterr().err
  assert main(["generate", "--model", str(d), "--prompt", "the", "--max-new-tokens", "100"]) == 2
  assert "but block_size=64" in capsys.readouterr().err
