"""A tiny CLIP BPE tokenizer written from scratch, so builtin models never touch the network.

The vocabulary is CLIP's byte-level alphabet (any text still tokenizes, one character at a time)
plus whole-word tokens for the shapes prompts and some common English words, so that a shapes
prompt costs about one token per word. Pure Python on purpose: no transformers import here.
"""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

from recipe_runner.data.builtin_shapes import PROMPT_WORDS

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

COMMON_WORDS: tuple[str, ...] = (
    "a", "an", "the", "on", "of", "with", "in", "and", "at", "to", "is", "by", "for", "from",
    "background", "photo", "picture", "image", "drawing", "painting", "sketch", "render",
    "shape", "color", "colour", "light", "dark", "bright", "small", "large", "big", "high",
    "quality", "detailed", "simple", "plain", "person", "man", "woman", "face", "hand", "dog",
    "cat", "house", "tree", "sky", "street", "room", "city", "landscape", "portrait", "edge",
    "edges", "line", "lines", "depth", "pose", "map", "mask", "gray", "grey", "brown", "blue",
    "green", "red", "yellow", "orange", "purple", "pink", "white", "black",
)  # fmt: skip


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE: repeatedly merge the adjacent pair with the lowest rank."""
    while len(symbols) > 1:
        pairs = [(ranks.get(p, len(ranks)), i) for i, p in enumerate(pairwise(symbols))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        first, second = symbols[i], symbols[i + 1]
        out: list[str] = []
        j = 0
        # Merge every occurrence of this pair, left to right, as CLIP does.
        while j < len(symbols):
            if j + 1 < len(symbols) and symbols[j] == first and symbols[j + 1] == second:
                out.append(first + second)
                j += 2
            else:
                out.append(symbols[j])
                j += 1
        symbols = out
    return symbols


def _merges_for(words: list[str]) -> list[tuple[str, str]]:
    """Merges that turn each word into one token.

    Each new merge ranks after all earlier ones, so words that are already one token stay one token;
    each round joins the first two pieces of the word and so strictly shortens it.
    """
    byte_chars = bytes_to_unicode()
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        chars = [byte_chars[b] for b in word.encode("utf-8")]
        symbols = [*chars[:-1], chars[-1] + END_OF_WORD]
        while len(pieces := _bpe(symbols, ranks)) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
    return list(ranks)


def tiny_clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary (token -> id) and the ranked merges of the tiny tokenizer."""
    words = list(dict.fromkeys([*PROMPT_WORDS, *COMMON_WORDS]))
    merges = _merges_for(words)
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + END_OF_WORD for c in alphabet] + [a + b for a, b in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]  # last, as in CLIP
    return {token: i for i, token in enumerate(tokens)}, merges


def write_tiny_clip_tokenizer(out_dir: Path, *, model_max_length: int = 77) -> None:
    """Write the four tokenizer files; `CLIPTokenizer.from_pretrained(out_dir)` loads them offline."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = tiny_clip_vocab()
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (out_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    # SD uses <|endoftext|> for padding and as the unknown token.
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
