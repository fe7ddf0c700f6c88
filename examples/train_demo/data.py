"""The demo corpus (the Python standard library's own source) and its byte-level BPE tokenizer.

Every machine with Python has this corpus offline, and its licence (PSF License) permits this use. Files are
split into train and held-out sets by a hash of their path, so the split is the same everywhere.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import torch

SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "lib2to3", "__pycache__"}
NUM_RESERVED = 128  # ids 0..127: <unk>=0, <s>=1, </s>=11, <mask>=100, the rest reserved
SPECIALS = {0: "<unk>", 1: "<s>", 11: "</s>", 100: "<mask>"}


def corpus_files() -> tuple[list[Path], list[Path]]:
    """(train, held-out) stdlib source files; about 1 in 16 files is held out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not SKIP_PARTS & set(p.relative_to(root).parts))
    train, held = [], []
    for path in files:
        digest = hashlib.sha256(str(path.relative_to(root)).encode()).digest()
        (held if digest[0] % 16 == 0 else train).append(path)
    return train, held


def read_text(path: Path) -> str:
    """A source file's text; a stray undecodable byte must not stop the recipe, so it is replaced."""
    return path.read_text(encoding="utf-8", errors="replace")


def special_tokens() -> list[str]:
    """The 128 reserved tokens in id order; the BPE trainer assigns special tokens their list positions."""
    return [SPECIALS.get(i, f"<reserved_{i}>") for i in range(NUM_RESERVED)]


def train_tokenizer(files: list[Path], vocab_size: int):
    """Byte-level BPE whose first 128 ids are the special/reserved tokens (so the config's ids hold)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens(), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator((read_text(p) for p in files), trainer=trainer)
    for token_id, token in SPECIALS.items():
        assert tokenizer.token_to_id(token) == token_id, (token, tokenizer.token_to_id(token))
    return tokenizer


def token_stream(tokenizer, files: list[Path], eos_id: int) -> torch.Tensor:
    """All files tokenized and joined into one stream, each file followed by EOS."""
    encoded = tokenizer.encode_batch([read_text(p) for p in files])
    ids: list[int] = []
    for item in encoded:
        ids.extend(item.ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)
