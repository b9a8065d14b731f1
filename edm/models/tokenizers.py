"""The real CLIP tokenizer, built offline from the BPE file that open_clip ships.

Every Stable Diffusion text encoder (CLIP-L, OpenCLIP-H, OpenCLIP-bigG) uses the same 49 408-token
byte-level BPE vocabulary. ``open_clip`` ships its merges as ``bpe_simple_vocab_16e6.txt.gz``;
the vocabulary is fully determined by them (256 byte symbols, the same with ``</w>``, one token
per merge, then the two special tokens), so a ``transformers.CLIPTokenizer`` built from
``vocab=`` / ``merges=`` reproduces the hub tokenizers' ids without any download.

``model_max_length`` must be set (77 for every SD model): the default is effectively infinite,
and the pipelines pad to it, which overflows the text encoder's position table.
"""

from __future__ import annotations

import functools
import gzip
import inspect
import json
import tempfile
from pathlib import Path

# open_clip keeps 49152 - 256 - 2 merges (the file holds a few more); the vocabulary is then
# 2 * 256 byte symbols + 48 894 merges + 2 specials = 49 408 tokens.
_NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 49408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bpe_path() -> Path:
    """Path of open_clip's bundled ``bpe_simple_vocab_16e6.txt.gz``."""
    import open_clip.tokenizer

    return Path(open_clip.tokenizer.default_bpe())


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table, in CLIP's vocabulary order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``(vocab, merges)`` of the CLIP tokenizer, parsed once per process from open_clip's file."""
    with gzip.open(bpe_path()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]  # line 0: version
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == VOCAB_SIZE, f"CLIP vocabulary has {len(vocab)} tokens, want {VOCAB_SIZE}"
    return vocab, merges


@functools.lru_cache(maxsize=1)
def _files_dir() -> tempfile.TemporaryDirectory:
    """``vocab.json`` + ``merges.txt`` written once per process (for the ``from_pretrained`` path).

    The cached ``TemporaryDirectory`` keeps the folder alive and removes it at interpreter exit.
    """
    vocab, merges = clip_vocab_and_merges()
    tmp = tempfile.TemporaryDirectory(prefix="edm_clip_bpe_")
    folder = Path(tmp.name)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    lines = ["#version: 0.2"] + [" ".join(m) for m in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp


def clip_tokenizer(
    model_max_length: int = 77, pad_token: str = EOS, via_files: bool | None = None
):
    """A ``transformers.CLIPTokenizer`` with the real CLIP vocabulary, built offline.

    Args:
        model_max_length: padding/truncation length; 77 for every Stable Diffusion model.
        pad_token: ``<|endoftext|>`` for SD1.x's CLIP-L (the default); SDXL's and SD3's second
            tokenizer (OpenCLIP-bigG) pad with ``"!"`` (id 0). Only the pad ids differ.
        via_files: build from ``vocab.json``/``merges.txt`` written to a temporary folder with
            ``from_pretrained`` (works on transformers 4 and 5) instead of the in-memory
            ``CLIPTokenizer(vocab=..., merges=...)`` (transformers >= 5). Default: in memory
            when the installed transformers supports it.
    """
    from transformers import CLIPTokenizer

    if via_files is None:
        via_files = "merges" not in inspect.signature(CLIPTokenizer.__init__).parameters
    kwargs = {"model_max_length": model_max_length, "pad_token": pad_token}
    if via_files:
        return CLIPTokenizer.from_pretrained(_files_dir().name, **kwargs)
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), **kwargs)
