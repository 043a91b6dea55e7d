"""Tokenizers: the demo sentencepiece model, a Hugging Face tokenizer.json, and validation."""

import json
import os
import pickle

import pytest

from nextstep_jax.data import tokenizer as T


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("demo_tok"))


@pytest.fixture(scope="module")
def demo(demo_dir):
  return T.build_demo_tokenizer(demo_dir, vocab_size=512)


def test_demo_specials_in_spec_order(demo):
  assert demo.vocab_size == 512
  assert [demo.special[t] for t in T.SPECIAL_TOKENS] == list(range(9))
  assert demo.pad_id == 0 and demo.area_id == 1 and demo.boi_id == 2
  assert demo.eoi_id == 3 and demo.placeholder_id == 4
  assert demo.eos_id == demo.special[T.DEMO_EOS] == 10


@pytest.mark.parametrize("text", ["a handwritten digit 7", "4*4", "draw a 3 next to it",
                                  "Return the value.\n\n    Indented line: x = f(1, 2)"])
def test_demo_roundtrip(demo, text):
  ids = demo.encode(text)
  assert all(isinstance(i, int) for i in ids)
  assert demo.decode(ids) == text
  assert not set(ids) & set(range(9)), "plain text must not produce special ids"


def test_demo_digits_split_for_area_text(demo):
  assert [demo.decode([i]) for i in demo.encode("12*12")] == ["1", "2", "*", "1", "2"]


def test_demo_reused_and_deterministic(demo, demo_dir, tmp_path):
  model = os.path.join(demo_dir, "tokenizer", T.SP_FILE)
  mtime = os.path.getmtime(model)
  again = T.build_demo_tokenizer(demo_dir, vocab_size=512)
  assert os.path.getmtime(model) == mtime, "an existing demo model must be reused"
  fresh = T.build_demo_tokenizer(str(tmp_path), vocab_size=512)
  assert fresh._proto == demo._proto == again._proto  # pylint: disable=protected-access
  other = T.build_demo_tokenizer(demo_dir, vocab_size=600)
  assert other.vocab_size == 600, "a different vocabulary size retrains"


def test_save_load_and_pickle(demo, tmp_path):
  demo.save(str(tmp_path / "tok"))
  back = T.load_tokenizer(str(tmp_path / "tok"), "sentencepiece")
  text = "the digit 5, written by hand"
  assert back.encode(text) == demo.encode(text) and back.special == demo.special
  unpickled = pickle.loads(pickle.dumps(demo))
  assert unpickled.encode(text) == demo.encode(text)


def test_missing_and_corrupt_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    T.load_tokenizer(str(tmp_path / "nope.model"))
  with pytest.raises(FileNotFoundError, match="no nextstep_tokenizer.json"):
    T.load_tokenizer(str(tmp_path))
  bad = tmp_path / "tokenizer.model"
  bad.write_bytes(b"\x00\x01 this is not a protobuf \xff" * 10)
  with pytest.raises(ValueError, match="not a valid sentencepiece model"):
    T.load_tokenizer(str(bad))
  empty = tmp_path / "empty.model"
  empty.write_bytes(b"")
  with pytest.raises(ValueError, match="empty"):
    T.load_tokenizer(str(empty))
  badjson = tmp_path / "tokenizer.json"
  badjson.write_text("{not json")
  with pytest.raises(ValueError, match="not a valid Hugging Face tokenizer.json"):
    T.load_tokenizer(str(badjson))


def test_sentencepiece_missing_special(tmp_path):
  import io

  import sentencepiece as spm
  writer = io.BytesIO()
  texts = [f"sentence number {i} about digits and images" for i in range(200)]
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=writer, model_type="bpe", vocab_size=60,
      user_defined_symbols=["<|image_area|>"], minloglevel=2, num_threads=1)
  path = tmp_path / "tokenizer.model"
  path.write_bytes(writer.getvalue())
  with pytest.raises(ValueError, match=r"special token '\[PAD\]' is missing"):
    T.load_tokenizer(str(path))


def _tiny_hf_json(tmp_path, with_specials: bool) -> str:
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  specials = ["<unk>", "<|endoftext|>"] + (list(T.SPECIAL_TOKENS) if with_specials else [])
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  texts = [f"a handwritten digit {d}, then {e}*{e}" for d in range(10) for e in range(10)]
  tok.train_from_iterator(texts, trainer)
  from tokenizers import decoders
  tok.decoder = decoders.ByteLevel()
  path = tmp_path / ("with" if with_specials else "without")
  path.mkdir()
  tok.save(str(path / "tokenizer.json"))
  return str(path / "tokenizer.json")


def test_hf_tokenizer(tmp_path):
  path = _tiny_hf_json(tmp_path, with_specials=True)
  tok = T.load_tokenizer(path, "hf")
  assert tok.kind == "hf" and tok.eos_token == "<|endoftext|>"
  for name in T.SPECIAL_TOKENS:
    assert tok.special[name] == tok._tok.token_to_id(name)  # pylint: disable=protected-access
  text = "a handwritten digit 3, then 4*4"
  assert tok.decode(tok.encode(text)) == text
  assert tok.encode("<|begin_of_image|>") == [tok.boi_id]
  tok.save(str(tmp_path / "saved"))
  back = T.load_tokenizer(str(tmp_path / "saved"))
  assert back.encode(text) == tok.encode(text) and back.vocab_size == tok.vocab_size
  assert pickle.loads(pickle.dumps(tok)).encode(text) == tok.encode(text)
  with pytest.raises(ValueError, match="tokenizer.kind is 'sentencepiece'"):
    T.load_tokenizer(path, "sentencepiece")


def test_hf_missing_special_and_extension(tmp_path):
  base = _tiny_hf_json(tmp_path, with_specials=False)
  with pytest.raises(ValueError, match=r"special token '\[PAD\]' is missing"):
    T.load_tokenizer(base)
  from tokenizers import Tokenizer
  n_base = Tokenizer.from_file(base).get_vocab_size(with_added_tokens=True)
  ext = T.extend_hf_tokenizer(base, str(tmp_path / "ext"))
  assert ext.vocab_size == n_base + len(T.SPECIAL_TOKENS)
  assert [ext.special[t] for t in T.SPECIAL_TOKENS] == list(range(n_base, n_base + 9))
  assert T.load_tokenizer(str(tmp_path / "ext")).special == ext.special


def test_hf_eos_from_tokenizer_config(tmp_path):
  path = _tiny_hf_json(tmp_path, with_specials=True)
  with open(os.path.join(os.path.dirname(path), "tokenizer_config.json"), "w") as f:
    json.dump({"eos_token": {"content": "<|end_of_thinking|>"}}, f)
  assert T.load_tokenizer(path).eos_token == "<|end_of_thinking|>"


def test_tokenizer_from_config_checks_model_vocab(demo_dir):
  import ml_collections
  c = ml_collections.ConfigDict(dict(
      workdir=demo_dir, model=dict(vocab_size=256),
      tokenizer=dict(kind="sentencepiece", path="", vocab_size=512)))
  with pytest.raises(ValueError, match="model.vocab_size is 256"):
    T.tokenizer_from_config(c)
  c.model.vocab_size = 512
  assert T.tokenizer_from_config(c).vocab_size == 512
  c.tokenizer.kind = "hf"
  with pytest.raises(ValueError, match="tokenizer.path is empty"):
    T.tokenizer_from_config(c)
