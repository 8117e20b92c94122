"""The T5 tokenizer: prompts -> SentencePiece (unigram) ids, then `</s>`, then `<pad>` up to max_length.

Read from the `tokenizer.json` that ships beside T5 checkpoints (SD 3's tokenizer_3/) with the `tokenizers`
library, which already carries the whole recipe: the normalizer, the split on whitespace with "▁" marking a
word start, the unigram model (Kudo 2018: the segmentation of highest total log-probability) and the rule
"append </s>". Ids equal transformers' T5TokenizerFast with padding="max_length", truncation=True, as
diffusers' SD 3 pipeline calls it (max_length 256, no attention mask: the padding is attended).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import Tensor


class T5Tokenizer:
    """Callable: list of prompts -> LongTensor (B, max_length)."""

    def __init__(self, path: str | os.PathLike, max_length: int = 256):
        """`path`: a tokenizer folder holding tokenizer.json (e.g. a diffusers tokenizer_3/), or the file itself."""
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not 2 <= max_length <= 4096:
            raise ValueError(f"max_length = {max_length!r}; expected an integer in 2..4096")
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            hint = " (only spiece.model: minisd reads tokenizer.json)" if (path / "spiece.model").is_file() else ""
            raise ValueError(f"no T5 tokenizer.json at {path}{hint}; expected a tokenizer folder or file")
        self.tokenizer = Tokenizer.from_file(str(file))
        self.tokenizer.no_truncation()  # a file may carry its own settings; __call__ truncates and pads itself
        self.tokenizer.no_padding()
        self.max_length = max_length
        self.pad_id = self.tokenizer.token_to_id("<pad>")
        self.eos_id = self.tokenizer.token_to_id("</s>")
        if self.pad_id is None or self.eos_id is None:
            raise ValueError(f"{file} has no <pad> or </s> token; expected a T5 tokenizer")

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size()

    def __call__(self, prompts: str | list[str], warn: bool = True) -> Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be strings, got {[type(p).__name__ for p in prompts]}")
        rows = []
        for prompt, encoding in zip(prompts, self.tokenizer.encode_batch(prompts)):
            ids = encoding.ids  # pieces, then </s>
            if len(ids) > self.max_length:  # keep max_length − 1 pieces and the closing </s>
                if warn:
                    warnings.warn(f"prompt is {len(ids)} tokens, longer than {self.max_length}; it was truncated: "
                                  f"{prompt[:60]!r}…", stacklevel=2)
                ids = ids[:self.max_length - 1] + [self.eos_id]
            rows.append(ids + [self.pad_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)

    def decode(self, ids: Tensor | list[int]) -> list[str]:
        rows = ids.tolist() if isinstance(ids, Tensor) else [ids]
        if rows and isinstance(rows[0], int):
            rows = [rows]
        special = {self.pad_id, self.eos_id}
        return self.tokenizer.decode_batch([[i for i in row if i not in special] for row in rows])
