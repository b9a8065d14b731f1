"""A word-level tokenizer for the digits model.

The digits prompts use a few dozen words, so a BPE vocabulary would be noise. This class offers
the slice of the ``transformers`` tokenizer interface that pipelines and methods use:
``tok(texts, padding="max_length", max_length=..., truncation=True, return_tensors="pt")``
returning ``input_ids`` / ``attention_mask``, plus ``model_max_length``, ``pad_token_id``,
``decode`` and ``len()``. Like CLIP it adds BOS/EOS and pads to a fixed length, so the text
encoder always sees ``model_max_length`` positions (Stable Diffusion does the same with 77).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
_WORD = re.compile(r"[a-z0-9]+")


class Encoding(dict):
    """``dict`` with attribute access (``enc.input_ids``), like transformers' ``BatchEncoding``."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as e:
            raise AttributeError(key) from e


class WordTokenizer:
    """Lower-cases, splits on anything that is not ``[a-z0-9]``, maps words to ids.

    Args:
        words: the vocabulary (special tokens are prepended; order is kept, so ids are stable).
        model_max_length: padded length including BOS and EOS; 16 leaves room for prompts of
            up to 14 words, which is more than any template uses.
    """

    def __init__(self, words: Iterable[str], model_max_length: int = 16):
        words = [w for w in words if w not in SPECIAL_TOKENS]
        if len(set(words)) != len(words):
            raise ValueError("duplicate words in the tokenizer vocabulary")
        self.vocab = list(SPECIAL_TOKENS) + words
        self._ids = {w: i for i, w in enumerate(self.vocab)}
        self.model_max_length = int(model_max_length)
        self.pad_token_id, self.bos_token_id, self.eos_token_id, self.unk_token_id = range(4)

    def __len__(self) -> int:
        return len(self.vocab)

    @classmethod
    def from_texts(cls, texts: Iterable[str], model_max_length: int = 16) -> WordTokenizer:
        """Vocabulary = the words of ``texts`` in first-seen order."""
        seen: dict[str, None] = {}
        for t in texts:
            for w in _WORD.findall(t.lower()):
                seen.setdefault(w, None)
        return cls(seen, model_max_length)

    def to_config(self) -> dict:
        return {"words": self.vocab[len(SPECIAL_TOKENS) :], "model_max_length": self.model_max_length}

    @classmethod
    def from_config(cls, cfg: dict) -> WordTokenizer:
        return cls(cfg["words"], cfg["model_max_length"])

    def tokenize(self, text: str) -> list[str]:
        return _WORD.findall(text.lower())

    def encode(self, text: str, max_length: int | None = None, truncation: bool = True) -> list[int]:
        """BOS + word ids + EOS (unknown words map to ``<unk>``), without padding."""
        ids = [self._ids.get(w, self.unk_token_id) for w in self.tokenize(text)]
        max_length = max_length or self.model_max_length
        if len(ids) + 2 > max_length:
            if not truncation:
                raise ValueError(f"prompt {text!r} is longer than {max_length} tokens")
            ids = ids[: max_length - 2]
        return [self.bos_token_id, *ids, self.eos_token_id]

    def __call__(
        self,
        text: str | list[str],
        padding: str | bool = "max_length",
        max_length: int | None = None,
        truncation: bool = True,
        return_tensors: str | None = "pt",
    ) -> Encoding:
        """Tokenize a prompt or a batch; pads to ``max_length`` (default ``model_max_length``)."""
        texts = [text] if isinstance(text, str) else list(text)
        seqs = [self.encode(t, max_length, truncation) for t in texts]
        length = max_length or self.model_max_length
        if padding in (False, "do_not_pad", "longest", True):
            length = max(map(len, seqs))
        ids = [s + [self.pad_token_id] * (length - len(s)) for s in seqs]
        mask = [[1] * len(s) + [0] * (length - len(s)) for s in seqs]
        if return_tensors == "pt":
            return Encoding(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
        return Encoding(input_ids=ids, attention_mask=mask)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        toks = [self.vocab[i] for i in ids]
        if skip_special_tokens:
            toks = [t for t in toks if t not in SPECIAL_TOKENS]
        return " ".join(toks)
