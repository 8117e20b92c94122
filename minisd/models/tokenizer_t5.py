"""The T5 tokenizer: prompts -> SentencePiece (unigram) ids, then `</s>`, then `<pad>` up to max_length.

Read from the `tokenizer.json` that ships beside T5 checkpoints (SD 3's tokenizer_3/) with the `tokenizers`
library, which already carries the whole recipe: the normalizer, the split on whitespace with "▁" marking a
word start, the unigram model (Kudo 2018: the segmentation of highest total log-probability) and the rule
"append </s>". A folder with only SentencePiece's `spiece.model` works too: its pieces, scores and
normalization table are read from the protobuf file here (no sentencepiece or protobuf package) and the same
`tokenizers.Tokenizer` is built as transformers' T5Tokenizer builds from them. tokenizer.json wins when both
are present. Ids equal transformers' T5TokenizerFast with padding="max_length", truncation=True, as
diffusers' SD 3 pipeline calls it (max_length 256, no attention mask: the padding is attended).
"""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram
from torch import Tensor

# SentencePiece's piece types (sentencepiece_model.proto, SentencePiece.Type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
EXTRA_IDS = 100  # T5's sentinels <extra_id_99> … <extra_id_0>, appended after the pieces (transformers' extra_ids)


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """Protocol-buffer wire format -> (field number, value), in file order; the caller knows the schema.

    Each field is a varint key (field << 3 | wire type) then its value: wire 0 a varint (7 bits a byte, low
    first, high bit = "more"), 1 fixed64 and 5 fixed32 (8 / 4 little-endian bytes, returned raw), 2
    length-delimited (a varint length, then that many bytes: strings, bytes and nested messages).
    """
    def varint(i: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            if i >= len(buf) or shift > 63:
                raise ValueError(f"truncated or overlong varint at byte {i}")
            value, shift, i = value | (buf[i] & 0x7F) << shift, shift + 7, i + 1
            if buf[i - 1] < 0x80:
                return value, i

    i = 0
    while i < len(buf):
        key, i = varint(i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(i)
        elif wire in (1, 2, 5):
            size, i = (8, i) if wire == 1 else (4, i) if wire == 5 else varint(i)
            value, i = buf[i:i + size], i + size
            if i > len(buf):
                raise ValueError(f"field {field} runs past the end ({i} > {len(buf)} bytes)")
        else:
            raise ValueError(f"unsupported wire type {wire} (field {field})")
        if field == 0:
            raise ValueError("field number 0")
        yield field, value


def _read_spiece(file: Path) -> tuple[list[tuple[str, float, int]], bytes]:
    """spiece.model (ModelProto) -> ([(piece, score, type)], precompiled_charsmap); unknown fields skipped.

    ModelProto {1: repeated SentencePiece {1: piece, 2: score (float), 3: type}, 2: TrainerSpec {3: model_type},
    3: NormalizerSpec {2: precompiled_charsmap}}; proto2 defaults: score 0, type NORMAL, model_type UNIGRAM.
    """
    pieces, charsmap = [], b""
    try:
        for field, value in _proto_fields(file.read_bytes()):
            if field == 1:
                piece = dict(_proto_fields(value))
                score = struct.unpack("<f", piece.get(2, bytes(4)))[0]
                pieces.append((piece[1].decode("utf-8"), score, piece.get(3, NORMAL)))
            elif field == 2 and (model_type := dict(_proto_fields(value)).get(3, 1)) != 1:
                raise ValueError(f"model_type {model_type}, expected 1 (unigram, as T5's)")
            elif field == 3:
                charsmap = dict(_proto_fields(value)).get(2, b"")
        if not pieces:
            raise ValueError("no pieces")
    except (ValueError, TypeError, KeyError, AttributeError, struct.error) as err:  # bad bytes in any field
        raise ValueError(f"{file} is not a readable SentencePiece model: {err}; expected T5's spiece.model") from None
    return pieces, charsmap


def _tokenizer_from_spiece(file: Path) -> Tokenizer:
    """The tokenizers.Tokenizer that transformers' T5Tokenizer builds from a spiece.model's pieces and charsmap:
    Unigram over the pieces and the sentinels, the charsmap normalizer, whitespace split + Metaspace ("▁"
    before every word), control and unknown pieces special, user-defined pieces whole, "$A </s>"."""
    pieces, charsmap = _read_spiece(file)
    vocab = [(piece, score) for piece, score, _ in pieces]
    known = {piece for piece, _ in vocab}
    vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(EXTRA_IDS)) if f"<extra_id_{i}>" not in known]
    ids = {piece: i for i, (piece, _) in enumerate(vocab)}
    unk_id = next((i for i, (_, _, kind) in enumerate(pieces) if kind == UNKNOWN), None)
    if unk_id is None or "</s>" not in ids:
        raise ValueError(f"{file} has no <unk> piece or no </s> piece; expected T5's spiece.model")
    tokenizer = Tokenizer(Unigram(vocab, unk_id=unk_id, byte_fallback=False))
    if charsmap:  # SentencePiece's normalization rules (NFKC-like), a compiled trie
        try:
            tokenizer.normalizer = normalizers.Precompiled(charsmap)
        except Exception as err:  # tokenizers raises a bare Exception
            raise ValueError(f"{file}: unreadable precompiled_charsmap ({err}); expected T5's spiece.model") from None
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.add_special_tokens([piece for piece, _, kind in pieces if kind in (UNKNOWN, CONTROL)]
                                 + [piece for piece, _ in vocab[len(pieces):]])
    tokenizer.add_tokens([AddedToken(piece, normalized=False) for piece, _, kind in pieces if kind == USER_DEFINED])
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                            special_tokens=[("</s>", ids["</s>"])])
    return tokenizer


class T5Tokenizer:
    """Callable: list of prompts -> LongTensor (B, max_length)."""

    def __init__(self, path: str | os.PathLike, max_length: int = 256):
        """`path`: a tokenizer folder holding tokenizer.json or spiece.model (e.g. a diffusers tokenizer_3/), or
        either file itself; tokenizer.json is read when a folder has both."""
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not 2 <= max_length <= 4096:
            raise ValueError(f"max_length = {max_length!r}; expected an integer in 2..4096")
        path = Path(path)
        file = path
        if path.is_dir():
            file = path / "tokenizer.json" if (path / "tokenizer.json").is_file() else path / "spiece.model"
        if not file.is_file():
            raise ValueError(f"no T5 tokenizer.json or spiece.model at {path}; expected a tokenizer folder or file")
        if file.suffix == ".json":
            self.tokenizer = Tokenizer.from_file(str(file))
        else:  # SentencePiece's protobuf file (spiece.model, or any other name)
            self.tokenizer = _tokenizer_from_spiece(file)
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
