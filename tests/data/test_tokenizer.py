import pytest

from tnjax.data import EOT, load_tokenizer, train_tokenizer

TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
        "and darkness was upon the face of the deep. ") * 40


@pytest.fixture
def corpus(tmp_path):
  f = tmp_path / "text.txt"
  f.write_text(TEXT)
  return f


def test_train_save_load_round_trip(corpus, tmp_path):
  tok = train_tokenizer([corpus], vocab_size=300)
  assert tok.get_vocab_size() == 300 and tok.token_to_id(EOT) == 0
  ids = tok.encode("And the earth was without form").ids
  assert tok.decode(ids) == "And the earth was without form"
  assert len(ids) < len("And the earth was without form")  # merges learned
  tok.save(str(tmp_path / "tokenizer.json"))
  assert load_tokenizer(tmp_path).encode("the deep").ids == tok.encode("the deep").ids
  assert load_tokenizer(tmp_path / "tokenizer.json").encode("the deep").ids == tok.encode("the deep").ids


def test_gpt2_vocab_and_merges(corpus, tmp_path):
  tok = train_tokenizer([corpus], vocab_size=300)
  out = tmp_path / "gpt2"
  out.mkdir()
  tok.model.save(str(out))  # writes vocab.json + merges.txt, GPT-2's layout
  again = load_tokenizer(out)
  text = "darkness was upon the face"
  assert again.encode(text).ids == tok.encode(text).ids
  assert again.decode(again.encode(text).ids) == text


def test_errors(tmp_path, corpus):
  with pytest.raises(ValueError, match=r"load_tokenizer: .* has no tokenizer.json and no vocab.json \+ merges.txt"):
    load_tokenizer(tmp_path)
  with pytest.raises(ValueError, match=r"train_tokenizer: file .*missing.txt does not exist"):
    train_tokenizer([tmp_path / "missing.txt"], 300)
  with pytest.raises(ValueError, match=r"train_tokenizer: vocab_size=100 but at least 257 is needed"):
    train_tokenizer([corpus], 100)
