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


def test_compress_sweep_writes_report_plot_and_models(model_dir, tmp_path, capsys):
  from tnjax.interop import load_model

  d, text = model_dir
  out = tmp_path / "svd"
  assert main(["compress", "--model", str(d), "--method", "svd", "--ratio", "0.5,0.9", "--valid", str(text),
               "--max-tokens", "300", "--block-size", "32", "--out", str(out)]) == 0
  assert "svd ratio=0.5: compressed part 2.0" in capsys.readouterr().out
  report = json.loads((out / "report.json").read_text())
  assert [r["target"] for r in report["runs"]] == ["ratio=0.5", "ratio=0.9"]
  assert report["runs"][0]["summary"]["part_kept"] <= 0.51 and report["perplexity_before"] > 1
  assert (out / "perplexity.png").stat().st_size > 0 and "| ratio=0.9 |" in (out / "report.md").read_text()
  small = load_model(out / "ratio-0.5" / "model")
  assert small.num_params == report["runs"][0]["summary"]["params_after"]
  assert (out / "ratio-0.5" / "model" / "tokenizer.json").exists()


def test_compress_modegpt_heal_int8(model_dir, tmp_path, capsys):
  d, text = model_dir
  out = tmp_path / "mode"
  assert main(["compress", "--model", str(d), "--method", "modegpt", "--ratio", "0.6", "--calib", str(text),
               "--heal-steps", "2", "--int8", "--block-size", "32", "--out", str(out)]) == 0
  report = json.loads((out / "report.json").read_text())
  assert report["runs"][0]["summary"]["bytes_after"] < report["runs"][0]["summary"]["bytes_before"] / 2
  assert (out / "model" / "model.safetensors").exists()


@pytest.mark.parametrize("extra,match", [
    (["--method", "modegpt", "--ratio", "0.5"], "needs calibration text"),
    (["--method", "mpo", "--ratio", "0.5", "--rank", "3"], "at most one of --rank, --ratio, --rtol"),
    (["--method", "svd", "--ratio", "1.5"], "ratio=1.5 but 0 < ratio <= 1"),
    (["--method", "mpo", "--ratio", "0.5,x"], "not a comma-separated list"),
    (["--method", "svd", "--rank", "2", "--layers", "mlp.up"], "unknown layer name 'mlp.up'"),
    (["--method", "svd", "--rank", "2", "--layout", "fused"], "layout='fused' but only mpo takes a layout"),
    (["--method", "mpo", "--rank", "4", "--layout", "fused"], "fused_dims: in_features="),
])
def test_compress_errors_exit_2(model_dir, tmp_path, capsys, extra, match):
  d, _ = model_dir
  assert main(["compress", "--model", str(d), "--out", str(tmp_path / "o")] + extra) == 2
  assert match in capsys.readouterr().err
