"""Text tokenizers: one small interface over sentencepiece and Hugging Face ``tokenizer.json``.

Both kinds expose ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``,
``pad_id``, ``eos_id``, the special ids of SPEC §1 by name (``tok.special["<|begin_of_image|>"]``)
and as properties (``area_id``, ``boi_id``, ``eoi_id``, ``placeholder_id``), and ``save(dir)``;
``load_tokenizer(path)`` reads either kind back and validates it (missing or corrupt file, a
special token missing) with errors that name the file.

The demo uses a small sentencepiece BPE model trained by ``build_demo_tokenizer`` on the digit
captions, edit instructions and interleaved texts plus the docstrings of Python's standard
library; the stages use Qwen2.5's vocabulary (a ``tokenizer.json``) extended with the NextStep
special tokens (``extend_hf_tokenizer``).

A saved tokenizer directory holds the model file (``tokenizer.model`` or ``tokenizer.json``) and
``nextstep_tokenizer.json`` (kind, file, eos token, vocabulary size, and for the demo model the
training recipe it was built with).

A Hugging Face directory as the NextStep-1 release lays it out (``tokenizer/`` beside the model:
``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``) loads as it is:
``find_tokenizer(model_dir)`` says which directory to load, and the EOS comes from
``tokenizer_config.json``, else ``special_tokens_map.json`` (``eos_token`` as a string or as
``{"content": ...}``), else a known end-of-text string. ``tokenizer_config.json``'s
``added_tokens_decoder`` ({id: {"content": ...}}) must agree with ``tokenizer.json``'s ids.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import io
import json
import os
import sys
import tempfile
from typing import Any, Iterable, Mapping, Sequence

from nextstep_jax.data import digits

# SPEC §1: the special tokens of the release, in order.
SPECIAL_TOKENS: tuple[str, ...] = (
  "[PAD]",
  "<|image_area|>",
  "<|begin_of_image|>",
  "<|end_of_image|>",
  "<|image_placeholder|>",
  "<|begin_of_prompt_refinement|>",
  "<|end_of_prompt_refinement|>",
  "<|begin_of_thinking|>",
  "<|end_of_thinking|>",
)
PAD, IMAGE_AREA, BOI, EOI, PLACEHOLDER = SPECIAL_TOKENS[:5]
# End of text for the demo model (the Qwen2.5 base vocabulary uses the same string).
DEMO_EOS = "<|endoftext|>"
DEMO_UNK = "<unk>"
META_FILE = "nextstep_tokenizer.json"
SP_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
# Hugging Face's side files of a tokenizer.json directory.
HF_CONFIG_FILE = "tokenizer_config.json"
HF_SPECIAL_MAP_FILE = "special_tokens_map.json"
# A model directory's tokenizer lives here (the release's layout), else in the directory itself.
TOKENIZER_SUBDIR = "tokenizer"
# End-of-text guesses for a tokenizer.json whose side files name none, in this order.
FALLBACK_EOS: tuple[str, ...] = (DEMO_EOS, "</s>", "<eos>")
# Bump when the demo corpus or training options change, so stale demo models are retrained.
DEMO_RECIPE_VERSION = 1


class Tokenizer(abc.ABC):
  """Text <-> ids, with the NextStep special tokens resolvable by name."""

  kind: str = ""

  def __init__(self, special: dict[str, int], eos_token: str, source: str):
    self.special = dict(special)
    self.eos_token = eos_token
    self.source = source   # the file it came from, for error messages

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Ids of `text` (plain text: no BOS/EOS added)."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids` (special tokens are kept where the backend renders them)."""

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids (the model's embedding must have at least this many rows)."""

  @abc.abstractmethod
  def save(self, directory: str) -> None:
    """Writes the model file and the metadata file into `directory` (created if needed)."""

  @property
  def pad_id(self) -> int:
    return self.special[PAD]

  @property
  def eos_id(self) -> int:
    return self.special[self.eos_token]

  @property
  def area_id(self) -> int:
    return self.special[IMAGE_AREA]

  @property
  def boi_id(self) -> int:
    return self.special[BOI]

  @property
  def eoi_id(self) -> int:
    return self.special[EOI]

  @property
  def placeholder_id(self) -> int:
    return self.special[PLACEHOLDER]

  def _write_meta(self, directory: str, file: str, extra: dict | None = None) -> None:
    meta = dict(kind=self.kind, file=file, eos_token=self.eos_token, vocab_size=self.vocab_size)
    meta.update(extra or {})
    _atomic_write(os.path.join(directory, META_FILE), json.dumps(meta, indent=2).encode())

  def __repr__(self) -> str:
    return f"{type(self).__name__}(vocab_size={self.vocab_size}, source={self.source!r})"


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model whose pieces include every SPEC §1 special token and an EOS."""

  kind = "sentencepiece"

  def __init__(self, model_proto: bytes, source: str = "<memory>", eos_token: str = DEMO_EOS,
               meta_extra: dict | None = None):
    import sentencepiece as spm  # pylint: disable=import-outside-toplevel
    sp = spm.SentencePieceProcessor()
    try:
      sp.LoadFromSerializedProto(model_proto)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError with a terse message
      raise ValueError(f"{source}: not a valid sentencepiece model ({e})") from e
    self._sp = sp
    self._proto = bytes(model_proto)
    self._meta_extra = dict(meta_extra or {})
    special = {}
    for token in SPECIAL_TOKENS + (eos_token,):
      i = sp.piece_to_id(token)
      if sp.id_to_piece(i) != token:
        raise ValueError(f"{source}: special token {token!r} is missing from the sentencepiece "
                         f"vocabulary ({sp.get_piece_size()} pieces)")
      special[token] = i
    super().__init__(special, eos_token, source)

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text))

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  @property
  def vocab_size(self) -> int:
    return int(self._sp.get_piece_size())

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    _atomic_write(os.path.join(directory, SP_FILE), self._proto)
    self._write_meta(directory, SP_FILE, self._meta_extra)

  def __getstate__(self):
    return dict(proto=self._proto, source=self.source, eos_token=self.eos_token,
                meta_extra=self._meta_extra)

  def __setstate__(self, state):
    self.__init__(state["proto"], state["source"], state["eos_token"], state["meta_extra"])


class HFTokenizer(Tokenizer):
  """A Hugging Face ``tokenizers`` model (``tokenizer.json``), e.g. Qwen2.5's vocabulary.

  ``config_dir``: the directory whose ``tokenizer_config.json`` / ``special_tokens_map.json`` are
  read (``HFSpecialTokens``): the EOS when ``eos_token`` is not given, the declared pad token,
  and the ``added_tokens_decoder`` ids, which must match this vocabulary.

  PAD: ``pad_id`` is always the id of ``[PAD]``, the release's first special token (SPEC §1), with
  which packed rows are filled. A ``pad_token`` that the side files name is recorded as
  ``declared_pad_token`` / ``declared_pad_id`` (it must be in the vocabulary) but does not replace
  ``[PAD]``: Qwen2.5's files name ``<|endoftext|>``, the EOS, and padding with the EOS would make
  padding and real ends of text the same id.
  """

  kind = "hf"

  def __init__(self, json_text: str, source: str = "<memory>", eos_token: str | None = None,
               config_dir: str | None = None, declared_pad_token: str | None = None):
    from tokenizers import Tokenizer as _HF  # pylint: disable=import-outside-toplevel
    try:
      tok = _HF.from_str(json_text)
    except Exception as e:
      raise ValueError(f"{source}: not a valid Hugging Face tokenizer.json ({e})") from e
    self._tok = tok
    self._json = json_text
    side = read_hf_special_tokens(config_dir) if config_dir else HFSpecialTokens()
    _check_added_tokens(tok, side, source)
    if eos_token is None:
      eos_token = _default_hf_eos(tok, source, side)
    if declared_pad_token is None and side.pad_token is not None:
      if tok.token_to_id(side.pad_token) is None:
        raise ValueError(f"{side.pad_from}: pad_token {side.pad_token!r} is not in the vocabulary "
                         f"of {source}")
      declared_pad_token = side.pad_token
    self.declared_pad_token = declared_pad_token
    special = {}
    for token in SPECIAL_TOKENS + (eos_token,):
      i = tok.token_to_id(token)
      if i is None:
        raise ValueError(f"{source}: special token {token!r} is missing from the vocabulary "
                         "(extend a base tokenizer with extend_hf_tokenizer)")
      special[token] = i
    super().__init__(special, eos_token, source)

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  @property
  def vocab_size(self) -> int:
    return int(self._tok.get_vocab_size(with_added_tokens=True))

  @property
  def declared_pad_id(self) -> int | None:
    """Id of the pad token the side files named (None if they named none); see the class doc."""
    if self.declared_pad_token is None:
      return None
    return self._tok.token_to_id(self.declared_pad_token)

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    _atomic_write(os.path.join(directory, HF_FILE), self._json.encode("utf-8"))
    extra = {} if self.declared_pad_token is None else {"declared_pad_token": self.declared_pad_token}
    self._write_meta(directory, HF_FILE, extra)

  def __getstate__(self):
    return dict(json=self._json, source=self.source, eos_token=self.eos_token,
                declared_pad_token=self.declared_pad_token)

  def __setstate__(self, state):
    self.__init__(state["json"], state["source"], state["eos_token"],
                  declared_pad_token=state.get("declared_pad_token"))


@dataclasses.dataclass(frozen=True)
class HFSpecialTokens:
  """What a tokenizer.json directory's side files say: each token with the file it came from
  (``tokenizer_config.json`` first, then ``special_tokens_map.json``), and ``added_tokens``
  ({id: content}) from tokenizer_config.json's ``added_tokens_decoder``."""

  eos_token: str | None = None
  eos_from: str = ""
  pad_token: str | None = None
  pad_from: str = ""
  bos_token: str | None = None
  bos_from: str = ""
  added_tokens: Mapping[int, str] = dataclasses.field(default_factory=dict)
  added_from: str = ""


def _read_json_object(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      obj = json.load(f)
  except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    raise ValueError(f"{path}: unreadable {os.path.basename(path)} ({e})") from e
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
  return obj


def _token_content(value: Any, path: str, field: str) -> str | None:
  """A special-token field: a string, ``{"content": "..."}`` (an AddedToken), or null."""
  if value is None:
    return None
  if isinstance(value, str):
    return value
  if isinstance(value, Mapping) and isinstance(value.get("content"), str):
    return value["content"]
  raise ValueError(f"{path}: {field} must be a string or {{\"content\": \"...\"}}, got {value!r}")


def read_hf_special_tokens(directory: str) -> HFSpecialTokens:
  """Reads ``tokenizer_config.json`` and ``special_tokens_map.json`` in `directory` (either may be
  absent). A field in tokenizer_config.json wins over the same field in special_tokens_map.json.
  A corrupt file or field raises ValueError naming the file."""
  found: dict[str, Any] = {}
  added: dict[int, str] = {}
  added_from = ""
  for name in (HF_SPECIAL_MAP_FILE, HF_CONFIG_FILE):  # later files override earlier ones
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      continue
    obj = _read_json_object(path)
    for field in ("eos_token", "pad_token", "bos_token"):
      content = _token_content(obj.get(field), path, field)
      if content is not None:
        found[field] = content
        found[field[:3] + "_from"] = path
    if name == HF_CONFIG_FILE and obj.get("added_tokens_decoder") is not None:
      decoder = obj["added_tokens_decoder"]
      if not isinstance(decoder, Mapping):
        raise ValueError(f"{path}: added_tokens_decoder must be an object {{id: {{\"content\": ...}}}}, "
                         f"got {type(decoder).__name__}")
      for key, entry in decoder.items():
        try:
          i = int(key)
        except (TypeError, ValueError):
          raise ValueError(f"{path}: added_tokens_decoder key {key!r} is not an integer id") from None
        content = _token_content(entry, path, f"added_tokens_decoder[{key!r}]")
        if content is None:
          raise ValueError(f"{path}: added_tokens_decoder[{key!r}] has no content")
        added[i] = content
      added_from = path
  return HFSpecialTokens(added_tokens=added, added_from=added_from, **found)


def _check_added_tokens(tok, side: HFSpecialTokens, source: str) -> None:
  """Each added_tokens_decoder entry whose token is in the vocabulary must have the same id."""
  for i, content in sorted(side.added_tokens.items()):
    have = tok.token_to_id(content)
    if have is not None and have != i:
      raise ValueError(f"{side.added_from}: added_tokens_decoder gives {content!r} id {i}, but "
                       f"{source} has it at id {have}; the two files are not from one tokenizer")


def _default_hf_eos(tok, source: str, side: HFSpecialTokens) -> str:
  """EOS of a tokenizer.json without project metadata: the side files' eos_token (it must be in
  the vocabulary), else the first of FALLBACK_EOS in the vocabulary."""
  if side.eos_token is not None:
    if tok.token_to_id(side.eos_token) is None:
      raise ValueError(f"{side.eos_from}: eos_token {side.eos_token!r} is not in the vocabulary "
                       f"of {source}")
    return side.eos_token
  for candidate in FALLBACK_EOS:
    if tok.token_to_id(candidate) is not None:
      return candidate
  raise ValueError(f"{source}: cannot tell the end-of-text token; none of "
                   f"{', '.join(map(repr, FALLBACK_EOS))} is in the vocabulary and no "
                   f"{HF_CONFIG_FILE} or {HF_SPECIAL_MAP_FILE} beside it names one")


# ---------------------------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------------------------

def find_tokenizer(directory: str) -> str:
  """The tokenizer to load for a model directory: ``directory/tokenizer/`` (the release's layout)
  when it holds a ``tokenizer.json`` (or this project's ``nextstep_tokenizer.json`` /
  ``tokenizer.model``), else `directory` itself when it holds one; else FileNotFoundError naming
  both places."""
  places = (os.path.join(directory, TOKENIZER_SUBDIR), directory)
  for place in places:
    if any(os.path.isfile(os.path.join(place, f)) for f in (HF_FILE, META_FILE, SP_FILE)):
      return place
  raise FileNotFoundError(f"no tokenizer for {directory}: looked for {HF_FILE} (or {META_FILE}, "
                          f"{SP_FILE}) in {places[0]} and in {places[1]}")


def load_tokenizer(path: str, kind: str | None = None) -> Tokenizer:
  """Loads a tokenizer from a saved directory, a ``tokenizer.model`` or a ``tokenizer.json``.

  `kind` ("sentencepiece" | "hf") is checked against the files when given. For a tokenizer.json,
  the EOS is the project metadata's when the directory has ``nextstep_tokenizer.json``, else the
  one ``tokenizer_config.json`` / ``special_tokens_map.json`` beside it name (see ``HFTokenizer``
  for the pad token), else a known end-of-text string.
  """
  if not path:
    raise ValueError("tokenizer path is empty")
  meta: dict = {}
  if os.path.isdir(path):
    meta_path = os.path.join(path, META_FILE)
    if os.path.exists(meta_path):
      try:
        with open(meta_path, encoding="utf-8") as f:
          meta = json.load(f)
      except (OSError, ValueError) as e:
        raise ValueError(f"{meta_path}: corrupt tokenizer metadata ({e})") from e
      file = os.path.join(path, meta.get("file", ""))
    elif os.path.exists(os.path.join(path, SP_FILE)):
      file = os.path.join(path, SP_FILE)
    elif os.path.exists(os.path.join(path, HF_FILE)):
      file = os.path.join(path, HF_FILE)
    else:
      raise FileNotFoundError(f"{path}: no {META_FILE}, {SP_FILE} or {HF_FILE} in this directory")
  else:
    file = path
  if not os.path.isfile(file):
    raise FileNotFoundError(f"tokenizer file {file} does not exist")
  found = meta.get("kind") or ("hf" if file.endswith(".json") else "sentencepiece")
  if kind is not None and kind != found:
    raise ValueError(f"{file}: config tokenizer.kind is {kind!r} but the file is a {found!r} "
                     "tokenizer")
  with open(file, "rb") as f:
    data = f.read()
  if not data:
    raise ValueError(f"{file}: tokenizer file is empty")
  if found == "sentencepiece":
    extra = {k: v for k, v in meta.items() if k not in ("kind", "file", "eos_token", "vocab_size")}
    tok: Tokenizer = SentencePieceTokenizer(data, file, meta.get("eos_token", DEMO_EOS), extra)
  elif found == "hf":
    try:
      text = data.decode("utf-8")
    except UnicodeDecodeError as e:
      raise ValueError(f"{file}: tokenizer.json is not UTF-8 text ({e})") from e
    tok = HFTokenizer(text, file, meta.get("eos_token"),
                      config_dir=os.path.dirname(os.path.abspath(file)),
                      declared_pad_token=meta.get("declared_pad_token"))
  else:
    raise ValueError(f"{file}: unknown tokenizer kind {found!r} (sentencepiece | hf)")
  if "vocab_size" in meta and meta["vocab_size"] != tok.vocab_size:
    raise ValueError(f"{file}: metadata says vocab_size {meta['vocab_size']}, the model has "
                     f"{tok.vocab_size}")
  return tok


def tokenizer_from_config(config) -> Tokenizer:
  """The tokenizer a config asks for: ``tokenizer.path`` or, when empty, the demo model in workdir.

  Checks that the model's embedding (``model.vocab_size``) has room for every id.
  """
  tcfg = config.tokenizer
  if tcfg.path:
    tok = load_tokenizer(tcfg.path, tcfg.kind)
  else:
    if tcfg.kind != "sentencepiece":
      raise ValueError(f"config tokenizer.path is empty but tokenizer.kind is {tcfg.kind!r}: only "
                       "the demo sentencepiece model is trained on the fly; set tokenizer.path")
    tok = build_demo_tokenizer(config.workdir, vocab_size=tcfg.vocab_size)
  model_vocab = config.model.vocab_size if "model" in config and "vocab_size" in config.model \
      else None
  if model_vocab is not None and tok.vocab_size > model_vocab:
    raise ValueError(f"tokenizer {tok.source} has {tok.vocab_size} ids but config "
                     f"model.vocab_size is {model_vocab}")
  return tok


# ---------------------------------------------------------------------------------------------
# Building.
# ---------------------------------------------------------------------------------------------

def _paragraphs(texts: Iterable[str], max_bytes: int = 4000) -> Iterable[str]:
  """Training sentences for sentencepiece: paragraphs (blank-line separated), capped in bytes."""
  for text in texts:
    for para in text.split("\n\n"):
      para = para.strip("\n")
      while para:
        head = para.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
        if not head:
          break
        yield head
        para = para[len(head):]


def train_sentencepiece(texts: Iterable[str], vocab_size: int,
                        eos_token: str = DEMO_EOS) -> SentencePieceTokenizer:
  """Trains a BPE sentencepiece model with the SPEC §1 special tokens at ids 0..8.

  Ids: 0 ``[PAD]``, 1..8 the other special tokens in SPEC order, 9 ``<unk>``, 10 `eos_token`,
  then the learned pieces. Text is kept as is (identity normalisation, no dummy prefix, no
  whitespace folding), digits are split, so ``decode(encode(t)) == t`` for text made of covered
  characters. Deterministic (single thread, no input sampling).
  """
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  min_vocab = len(SPECIAL_TOKENS) + 2 + 64
  if vocab_size < min_vocab:
    raise ValueError(f"sentencepiece vocab_size must be at least {min_vocab}, got {vocab_size}")
  writer = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_paragraphs(texts)), model_writer=writer, model_type="bpe",
        vocab_size=vocab_size, pad_id=0, pad_piece=PAD, unk_id=len(SPECIAL_TOKENS),
        unk_piece=DEMO_UNK, bos_id=-1, eos_id=len(SPECIAL_TOKENS) + 1, eos_piece=eos_token,
        user_defined_symbols=list(SPECIAL_TOKENS[1:]), normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True,
        character_coverage=0.9995, num_threads=1, shuffle_input_sentence=False,
        input_sentence_size=0, max_sentence_length=8192, minloglevel=2)
  except RuntimeError as e:
    raise ValueError(f"sentencepiece training failed for vocab_size={vocab_size}: {e}") from e
  return SentencePieceTokenizer(writer.getvalue(), "<trained>", eos_token)


def demo_corpus(cache_dir: str | None = None) -> list[str]:
  """The demo tokenizer's training text: every digit caption, instruction and interleaved text,
  then the docstrings of Python's standard library."""
  return list(digits.demo_texts()) + list(digits.stdlib_docstrings(cache_dir))


def _demo_recipe(vocab_size: int) -> dict:
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  return dict(recipe="nextstep-demo", recipe_version=DEMO_RECIPE_VERSION, vocab_size=vocab_size,
              python=".".join(map(str, sys.version_info[:3])),
              sentencepiece=getattr(spm, "__version__", "?"))


def build_demo_tokenizer(workdir: str, vocab_size: int = 512) -> SentencePieceTokenizer:
  """Trains (or reuses) the demo sentencepiece model in ``{workdir}/tokenizer``.

  Reused when the directory holds a model built by the same recipe (vocabulary size, corpus
  version, Python and sentencepiece versions); otherwise trained in about a second (plus a
  couple of seconds to read the stdlib docstrings the first time) and written atomically, so
  concurrent processes on one host are safe.
  """
  if not workdir:
    raise ValueError("build_demo_tokenizer needs a workdir (config.workdir is empty)")
  directory = os.path.join(workdir, "tokenizer")
  recipe = _demo_recipe(vocab_size)
  meta_path = os.path.join(directory, META_FILE)
  if os.path.exists(meta_path):
    try:
      with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    except (OSError, ValueError):
      meta = {}
    if all(meta.get(k) == v for k, v in recipe.items()):
      return load_tokenizer(directory, "sentencepiece")  # type: ignore[return-value]
  corpus = demo_corpus(cache_dir=os.path.join(workdir, "cache"))
  tok = train_sentencepiece(corpus, vocab_size)
  digest = hashlib.sha256("\x00".join(corpus).encode("utf-8")).hexdigest()[:16]
  tok = SentencePieceTokenizer(tok._proto, os.path.join(directory, SP_FILE), DEMO_EOS,  # pylint: disable=protected-access
                               dict(recipe, corpus_sha256=digest))
  tok.save(directory)
  return tok


def extend_hf_tokenizer(tokenizer_json: str, out_dir: str,
                        eos_token: str | None = None) -> HFTokenizer:
  """Adds the SPEC §1 special tokens (those not present) to a base ``tokenizer.json`` such as
  Qwen2.5's, and saves the result in `out_dir`. New ids follow the base vocabulary (for Qwen2.5:
  151665.., inside its padded 151936-row embedding)."""
  from tokenizers import AddedToken  # pylint: disable=import-outside-toplevel
  from tokenizers import Tokenizer as _HF  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(tokenizer_json):
    raise FileNotFoundError(f"tokenizer file {tokenizer_json} does not exist")
  try:
    tok = _HF.from_file(tokenizer_json)
  except Exception as e:
    raise ValueError(f"{tokenizer_json}: not a valid Hugging Face tokenizer.json ({e})") from e
  side = read_hf_special_tokens(os.path.dirname(os.path.abspath(tokenizer_json)))
  if eos_token is None:
    eos_token = _default_hf_eos(tok, tokenizer_json, side)
  missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
  hf = HFTokenizer(tok.to_str(), os.path.join(out_dir, HF_FILE), eos_token)
  hf.save(out_dir)
  return hf


def _atomic_write(path: str, data: bytes) -> None:
  """Writes via a temporary file and rename, so readers never see a half-written file."""
  directory = os.path.dirname(path) or "."
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
