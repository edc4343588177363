"""Tokenizers built offline, for the editors' random-weight builds (no hub repository to load
one from).

* CLIP: the editors' CLIP text encoders (Stable Diffusion, SDXL, aMUSEd, FLUX) use OpenAI CLIP's
  BPE. We rebuild ``vocab.json`` / ``merges.txt`` from ``open_clip/bpe_simple_vocab_16e6.txt.gz``;
  the pair matches OpenAI's files exactly.
* T5 (FLUX's second text encoder): no T5 vocabulary ships with any installed package, so
  :func:`t5_tokenizer_offline` is a small character-level Unigram vocabulary with T5's special
  tokens at T5's ids (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2). Its ids are valid for any T5
  embedding at least :data:`T5_OFFLINE_VOCAB_SIZE` long (the published one has 32128 rows);
  the words it splits into are not T5's, which random weights cannot tell.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import string
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from lregions_core.loading import heavy_import, load_once

if TYPE_CHECKING:  # pragma: no cover
    from transformers import CLIPTokenizer, T5TokenizerFast

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # the vocabulary is 49408 = 2*256 bytes + merges + 2 specials
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (same order as CLIP's)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _bpe_path() -> Path:
    # find_spec locates the file without importing open_clip (which pulls in torchvision).
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip_torch is not installed; it provides CLIP's BPE vocabulary")
    return Path(next(iter(spec.submodule_search_locations))) / BPE_FILE


def _cache_dir() -> Path:
    root = os.environ.get("LREGIONS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lregions"
    )
    return Path(root) / "clip-tokenizer"


def _write_atomic(path: Path, text: str) -> None:
    # Several processes may build the cache at once: write aside, then rename.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
    os.replace(tmp, path)


def clip_tokenizer_files() -> Path:
    """A folder with CLIP's ``vocab.json`` and ``merges.txt``, written once from open_clip's BPE."""
    folder = _cache_dir()
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return folder
    try:
        return _write_files(folder)
    except OSError:  # a read-only home (CI sandboxes): a private temporary folder will do
        return _write_files(Path(tempfile.mkdtemp(prefix="lregions-clip-tokenizer-")))


def _write_files(folder: Path) -> Path:
    with gzip.open(_bpe_path(), "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    tokens = list(_bytes_to_unicode().values())
    tokens = tokens + [t + "</w>" for t in tokens] + ["".join(m.split()) for m in merges]
    tokens += [BOS, EOS]
    vocab = {token: index for index, token in enumerate(tokens)}
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomic(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    _write_atomic(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    return folder


@load_once()
def clip_tokenizer_offline(max_length: int = 77, pad_token: str = EOS) -> CLIPTokenizer:
    """OpenAI CLIP's tokenizer (49408 tokens) without any download. It pads with
    ``<|endoftext|>`` (SD 2, SDXL's first tokenizer, aMUSEd, FLUX) unless ``pad_token`` says
    otherwise (SDXL's second tokenizer pads with ``"!"``)."""
    CLIPTokenizer = heavy_import("transformers").CLIPTokenizer

    # transformers 5 ignores the old vocab_file=/merges_file= arguments; load from a folder.
    return CLIPTokenizer.from_pretrained(
        str(clip_tokenizer_files()),
        model_max_length=max_length,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=pad_token,
    )


# ----------------------------------------------------------------------------------------------
T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as in T5's SentencePiece vocabulary
_T5_CHARACTERS = string.ascii_letters + string.digits + string.punctuation
# specials, the word-start mark, and each character both starting a word and inside one
T5_OFFLINE_VOCAB_SIZE = len(T5_SPECIALS) + 1 + 2 * len(_T5_CHARACTERS)


@load_once()
def t5_tokenizer_offline(max_length: int = 512) -> T5TokenizerFast:
    """A T5 tokenizer (Unigram, SentencePiece-style word starts) over single characters:
    :data:`T5_OFFLINE_VOCAB_SIZE` tokens, no download, no sentencepiece. A character outside
    ASCII becomes ``<unk>``."""
    T5TokenizerFast = heavy_import("transformers").T5TokenizerFast

    # Unigram picks the segmentation with the highest summed score: a word-start piece
    # ("▁c") beats the bare mark plus the character.
    vocab = [(token, 0.0) for token in T5_SPECIALS] + [("▁", -5.0)]
    vocab += [("▁" + c, -3.0) for c in _T5_CHARACTERS]
    vocab += [(c, -4.0) for c in _T5_CHARACTERS]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)
