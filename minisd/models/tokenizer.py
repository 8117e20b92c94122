"""The CLIP tokenizer: text -> 77 token ids, through transformers' `CLIPTokenizer`.

    "a red circle" -> [<|startoftext|>, a, red, circle, <|endoftext|>, <|endoftext|>, ... ]  (77 ids)

Byte-pair encoding (Sennrich et al. 2016) on lower-cased text; every prompt is padded with the EOS
token to exactly 77 ids (SD 1.x; SD 2.x pads with "!"), or truncated with a warning.

SD 1.x uses OpenAI's CLIP ViT-L/14 vocabulary. minisd ships its BPE merge list (MIT licence, as
bundled by open_clip: `assets/bpe_simple_vocab_16e6.txt.gz`) and derives the Hugging Face
`vocab.json`/`merges.txt` from it, so single-file checkpoints load with no download.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import tempfile
import warnings
from pathlib import Path

from torch import Tensor


ASSETS = Path(__file__).resolve().parent.parent / "assets"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


class Tokenizer:
    """Callable: list of prompts -> LongTensor (B, max_length)."""

    def __init__(self, folder: str | os.PathLike, max_length: int = 77):
        from transformers import CLIPTokenizer  # the BPE itself; transformers is a runtime dependency

        folder = Path(folder)
        has_bpe_files = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
        if not has_bpe_files and not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(f"tokenizer folder {folder} has neither vocab.json + merges.txt nor tokenizer.json")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not 2 <= max_length <= 4096:
            raise ValueError(f"max_length = {max_length!r}; expected an integer in 2..4096")
        self.folder = folder
        self.max_length = max_length
        if has_bpe_files:  # the classic layout of SD repos
            _check_vocab(folder / "vocab.json")
            pad = EOS
            special = folder / "special_tokens_map.json"
            if special.is_file():  # SD 2.x tokenizers pad with "!"
                pad = _pad_token(special)
            self.hf = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                    model_max_length=max_length, bos_token=BOS, eos_token=EOS, unk_token=EOS,
                                    pad_token=pad)
            self._add_saved_tokens(folder / "tokenizer.json")
        else:  # transformers >= 5 saves a single tokenizer.json
            self.hf = CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length)
        self.bos_id, self.eos_id, self.pad_id = self.hf.bos_token_id, self.hf.eos_token_id, self.hf.pad_token_id
        self._before_added = None  # the tokenizer as built, kept by add_tokens for remove_added_tokens

    @classmethod
    def clip_vit_l(cls) -> Tokenizer:
        """The SD 1.x tokenizer (openai/clip-vit-large-patch14), built from the bundled BPE file."""
        return cls(_derive_clip_vocab())

    def __len__(self) -> int:
        return len(self.hf)

    def __call__(self, prompts: str | list[str], warn: bool = True) -> Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        prompts = [self.expand_multi_vector(p) for p in prompts]
        if warn:
            for prompt in prompts:
                full = self.hf(prompt, verbose=False).input_ids  # untruncated, to measure (no library warning)
                n = len(full)
                if n > self.max_length:
                    kept = self.hf.decode(full[1: self.max_length - 1])
                    warnings.warn(f"prompt is {n} tokens, longer than {self.max_length}; it was truncated to "
                                  f"{kept!r}", stacklevel=2)
        out = self.hf(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                      return_tensors="pt")
        return out.input_ids.long()

    # ─── added tokens (textual inversion) ──────────────────────────────────────────────────────────
    def __contains__(self, token: str) -> bool:
        """Whether `token` is a vocabulary entry (a BPE piece such as "cat</w>", or an added token)."""
        return token in self.hf.get_vocab()

    def add_tokens(self, tokens: list[str]) -> list[int]:
        """Add new tokens, each matched whole in a prompt; returns their ids, len(self) onwards.
        One at a time, as diffusers' `load_textual_inversion` adds them, so the ids are the same."""
        for token in tokens:
            if not isinstance(token, str) or token.split() != [token]:
                raise ValueError(f"token {token!r} must be a non-empty string without spaces")
            if token in self:
                raise ValueError(f"token {token!r} is already in the tokenizer's vocabulary; choose another")
        if self._before_added is None:
            self._before_added = copy.deepcopy(self.hf)
        for token in tokens:
            self.hf.add_tokens(token)
        return self.hf.convert_tokens_to_ids(list(tokens))

    def remove_added_tokens(self) -> None:
        """Back to the tokenizer as built: every token that add_tokens added is gone."""
        if self._before_added is not None:
            self.hf, self._before_added = self._before_added, None

    def expand_multi_vector(self, prompt: str) -> str:
        """A multi-vector embedding is one added token per vector: "a <cat>" -> "a <cat> <cat>_1 <cat>_2"
        when <cat>_1 and <cat>_2 exist (diffusers' `maybe_convert_prompt`, exactly: the string is
        replaced wherever it occurs in the prompt)."""
        added = self.hf.added_tokens_encoder
        if not any(f"{token}_1" in added for token in added):
            return prompt
        for token in dict.fromkeys(self.hf.tokenize(prompt)):
            if token in added and f"{token}_1" in added:
                n = 1
                while f"{token}_{n}" in added:
                    n += 1
                prompt = prompt.replace(token, " ".join([token] + [f"{token}_{i}" for i in range(1, n)]))
        return prompt

    def _add_saved_tokens(self, path: Path) -> None:
        """Tokens added before `save` (a textual inversion) come back from tokenizer.json, with their ids."""
        if not path.is_file():
            return
        try:
            saved = json.loads(path.read_text(encoding="utf-8")).get("added_tokens", [])
            saved = sorted((t["id"], t["content"]) for t in saved if not t.get("special", False))
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError, KeyError) as e:
            raise ValueError(f"{path}: unreadable added_tokens ({e!r})") from e
        for i, token in saved:
            if not isinstance(token, str) or len(self.hf) != i or self.hf.add_tokens(token) != 1:
                raise ValueError(f"{path}: added token {token!r} has id {i}; expected id {len(self.hf)} "
                                 f"for a new token")

    def decode(self, ids: Tensor | list[int]) -> list[str]:
        """ids (T,) -> the token strings, for looking at what the model reads."""
        ids = ids.tolist() if isinstance(ids, Tensor) else ids
        return self.hf.convert_ids_to_tokens(ids)

    def save(self, folder: str | os.PathLike) -> None:
        """Write a diffusers `tokenizer/` folder (vocab.json and merges.txt where we have them, configs).
        Each file is replaced atomically: an error leaves the old files intact."""
        import shutil

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".tokenizer.") as tmp:
            self.hf.save_pretrained(tmp)
            for name in ("vocab.json", "merges.txt"):
                if (self.folder / name).is_file() and not (Path(tmp) / name).exists():
                    shutil.copy(self.folder / name, Path(tmp) / name)
            _move_into(Path(tmp), folder)


def _pad_token(special: Path) -> str:
    try:
        value = json.loads(special.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{special} is not valid JSON ({e})") from e
    value = value.get("pad_token", EOS) if isinstance(value, dict) else None
    value = value.get("content") if isinstance(value, dict) else value
    if not isinstance(value, str) or not value:
        raise ValueError(f"{special}: pad_token must be a token string, got {value!r}")
    return value


def _check_vocab(path: Path) -> None:
    """vocab.json must be a JSON object of token -> id; transformers' own error would be a traceback."""
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a valid JSON vocabulary ({e})") from e
    if not isinstance(vocab, dict) or not vocab or \
            not all(isinstance(i, int) and not isinstance(i, bool) for i in vocab.values()):
        raise ValueError(f"{path} must be a non-empty JSON object of token -> integer id")


def _move_into(tmp: Path, folder: Path) -> None:
    """Sync each file written under `tmp` and rename it into `folder` (same file system: one atomic step each)."""
    for f in sorted(tmp.iterdir()):
        if f.is_file():
            with open(f, "rb+") as handle:
                os.fsync(handle.fileno())
            os.chmod(f, 0o644)
            os.replace(f, folder / f.name)


def _write_files(folder: Path, files: dict[str, str]) -> None:
    """Write text files into `folder` atomically (a temporary folder beside them, then renames)."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".write.") as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_text(text, encoding="utf-8")
        _move_into(Path(tmp), folder)


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable characters, so BPE never sees raw bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _derive_clip_vocab() -> Path:
    """vocab.json + merges.txt of CLIP ViT-L/14 from the bundled merge list, cached on first use.

    The vocabulary is, in order: the 256 byte characters, the same with the end-of-word mark `</w>`,
    one token per merge (48,894 of them), then <|startoftext|> and <|endoftext|>: 49,408 ids
    (OpenAI CLIP's `SimpleTokenizer`, which the Hugging Face files were converted from).
    """
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "minisd" / "clip-vit-large-patch14"
    if (cache / "vocab.json").is_file() and (cache / "merges.txt").is_file():
        return cache
    lines = gzip.open(ASSETS / "bpe_simple_vocab_16e6.txt.gz").read().decode("utf-8").split("\n")
    merges = lines[1: 49152 - 256 - 2 + 1]
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    _write_files(cache, {"merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n"})
    # vocab.json last, so a half-written cache is never taken as complete
    _write_files(cache, {"vocab.json": json.dumps({token: i for i, token in enumerate(vocab)})})
    return cache


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply merges the way BPE does: always the lowest-ranked adjacent pair first."""
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == float("inf"):
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2:]
    return pieces


def build_word_tokenizer(words: list[str], folder: str | os.PathLike) -> Tokenizer:
    """A CLIP-format tokenizer for a closed vocabulary: each word one token, any other text spelled
    out in bytes. Used by the shapes world and the tests; loaded by the same code as SD's tokenizer.

    Vocabulary: the 512 byte characters (with and without `</w>`), the merged pieces, then BOS, EOS.
    Merges are added word by word: run BPE with the merges so far, and while the word is still in
    several pieces, merge its first two (BPE applies merges by rank, so a pair learnt for "right"
    would otherwise split "triangle" for good).
    """
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    ranks: dict[tuple[str, str], int] = {}
    seen = set(vocab)
    for word in words:
        if word != word.lower() or not word.isascii() or not word.isalpha():
            raise ValueError(f"words must be lower-case ASCII letters, got {word!r}")
        pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
            if pieces[0] + pieces[1] not in seen:
                seen.add(pieces[0] + pieces[1])
                vocab.append(pieces[0] + pieces[1])
            pieces = _bpe(pieces, ranks)
    vocab += [BOS, EOS]
    merges = [f"{a} {b}" for (a, b), _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    _write_files(Path(folder), {"vocab.json": json.dumps({t: i for i, t in enumerate(vocab)}),
                                "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n"})
    return Tokenizer(folder)
