"""The offline tiny CLIP tokenizer: loads with transformers, one token per shapes word, any text works."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, CLIPTokenizer, CLIPTokenizerFast

from recipe_runner.data.builtin_shapes import PROMPT_WORDS, generate
from recipe_runner.models.tokenizer import (
    BOS_TOKEN,
    COMMON_WORDS,
    EOS_TOKEN,
    bytes_to_unicode,
    tiny_clip_vocab,
    write_tiny_clip_tokenizer,
)


@pytest.fixture(scope="module", params=[CLIPTokenizer, CLIPTokenizerFast, AutoTokenizer])
def tokenizer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tiny_clip_tokenizer(folder)
    assert sorted(p.name for p in folder.iterdir()) == [
        "merges.txt",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    return request.param.from_pretrained(folder)


def test_vocabulary_layout():
    vocab, merges = tiny_clip_vocab()
    alphabet = list(bytes_to_unicode().values())
    assert len(set(alphabet)) == 256
    assert all(vocab[c] == i and vocab[c + "</w>"] == 256 + i for i, c in enumerate(alphabet))
    assert vocab[BOS_TOKEN] == len(vocab) - 2 and vocab[EOS_TOKEN] == len(vocab) - 1
    assert len(vocab) == 512 + len(merges) + 2 and len(set(vocab.values())) == len(vocab)


def test_special_tokens_like_stable_diffusion(tokenizer):
    assert tokenizer.model_max_length == 77
    assert tokenizer.bos_token == BOS_TOKEN and tokenizer.eos_token == EOS_TOKEN
    assert tokenizer.pad_token == EOS_TOKEN and tokenizer.pad_token_id == tokenizer.eos_token_id
    ids = tokenizer("a red star", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.pad_token_id


def test_every_known_word_is_one_token(tokenizer):
    for word in {*PROMPT_WORDS, *COMMON_WORDS}:
        assert tokenizer.tokenize(word) == [word + "</w>"], word


def test_shapes_prompts_cost_one_token_per_word(tokenizer):
    for row in generate(50, seed=0):
        ids = tokenizer(row["prompt"]).input_ids
        assert len(ids) == len(row["prompt"].split()) + 2 <= 12, row["prompt"]
        assert tokenizer.decode(ids, skip_special_tokens=True) == row["prompt"]


@pytest.mark.parametrize("text", ["a quokka near the zebra", "héllo wörld 日本", "mixed CASE words"])
def test_other_text_falls_back_to_characters(tokenizer, text: str):
    ids = tokenizer(text).input_ids
    # <|endoftext|> doubles as the unknown token: it must appear only as the final EOS.
    assert ids.count(tokenizer.eos_token_id) == 1 and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text.lower()


def test_writing_is_deterministic(tmp_path: Path):
    write_tiny_clip_tokenizer(tmp_path / "a", model_max_length=16)
    write_tiny_clip_tokenizer(tmp_path / "b", model_max_length=16)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert CLIPTokenizer.from_pretrained(tmp_path / "a").model_max_length == 16
