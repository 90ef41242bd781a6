"""SentencePiece-style tokenizers against SentencePiece itself and transformers.

Tiny vocabularies are trained with ``sentencepiece`` on a multilingual corpus
(byte fallback on, so characters outside the vocabulary become ``<0xNN>``
tokens). A BPE model is written into a GGUF file the way llama.cpp's converter
does (pieces, scores, token types; no merges) and a Unigram model into a
``tokenizer.json``; our ids must equal SentencePiece's and transformers'.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from gguf import GGUFWriter
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers

from model.sentencepiece import recover_merges
from model.tokenizer import Tokenizer

CORPUS = [
    "Hello world, this is a test.",
    "Привет, как дела? Всё хорошо.",
    "日本語のテキストです。東京は大きい。",
    "emoji 🤖 café naïve",
    "Ελληνικά και हिन्दी भाषा",
    "العربية نص قصير جدا",
    "x = 1_000_000; print(f'{x:,}')",
    "The quick brown fox jumps over the lazy dog.",
]
# Unseen text too: characters the vocabulary lacks go through byte fallback.
TEXTS = [*CORPUS, "Ünïcödé ✓ 🚀 ß", "  leading spaces and\nnewlines\n", "中文 한국어 ไทย", "a"]


def spm_ids(sp: spm.SentencePieceProcessor, text: str) -> list[int]:
    """SentencePiece's ids, where transformers agrees with it: for text that starts
    with a space, SentencePiece adds one more ▁ than transformers' Metaspace does
    (the ids we match are transformers')."""
    return [1, *sp.encode(text)] if not text.startswith(" ") else []


def train(tmp: Path, kind: str) -> spm.SentencePieceProcessor:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_prefix=str(tmp / kind), vocab_size=400,
        model_type=kind, byte_fallback=True, character_coverage=0.98, bos_id=1, eos_id=2,
        unk_id=0, pad_id=-1, minloglevel=2, hard_vocab_limit=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False,  # as Llama's
    )  # fmt: skip
    return spm.SentencePieceProcessor(model_file=str(tmp / f"{kind}.model"))


def piece_type(sp: spm.SentencePieceProcessor, i: int) -> int:
    """llama.cpp's token type: 1 normal, 2 unknown, 3 control, 6 byte."""
    if sp.is_unknown(i):
        return 2
    if sp.is_control(i):
        return 3
    if sp.is_byte(i):
        return 6
    return 1


@pytest.fixture(scope="module")
def bpe_gguf(tmp_path_factory) -> tuple[Path, spm.SentencePieceProcessor]:
    tmp = tmp_path_factory.mktemp("spm-bpe")
    sp = train(tmp, "bpe")
    n = sp.get_piece_size()
    w = GGUFWriter(str(tmp / "tok.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types([piece_type(sp, i) for i in range(n)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_tensor("token_embd.weight", np.zeros((n, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tmp / "tok.gguf", sp


def test_gguf_bpe_ids_equal_sentencepiece_and_transformers(bpe_gguf):
    from transformers import AutoTokenizer

    path, sp = bpe_gguf
    ours = Tokenizer.from_gguf(path)
    reference = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert ours.sentencepiece and ours.add_bos and ours.bos_token_id == 1
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == (spm_ids(sp, text) or ids), text
        assert ids == reference.encode(text), text
        assert (
            ours.decode(ids)
            == sp.decode(ids[1:])
            == reference.decode(ids, skip_special_tokens=True)
        )
        detok = ours.detokenizer()
        assert "".join(detok.push(i) for i in ids) + detok.flush() == ours.decode(ids)
    assert any(sp.is_byte(i) for text in TEXTS for i in sp.encode(text)), "no byte fallback used"


def test_special_tokens_stay_whole_and_are_skipped_in_output(bpe_gguf):
    path, _ = bpe_gguf
    ours = Tokenizer.from_gguf(path)
    ids = ours.encode("</s>", add_special_tokens=False, parse_special=True)
    assert ids == [2] and ours.decode([1, *ours.encode("hi", False), 2]) == "hi"
    assert 2 in ours.eos_token_ids


def test_unigram_tokenizer_json_ids_equal_sentencepiece(tmp_path: Path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    sp = train(tmp_path, "unigram")
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    backend = Backend(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(tmp_path / "dir")
    config = tmp_path / "dir" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "add_bos_token": True}))
    ours = Tokenizer.from_dir(tmp_path / "dir")
    reference = AutoTokenizer.from_pretrained(tmp_path / "dir")
    assert ours.sentencepiece and ours.strip_first_space
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == (spm_ids(sp, text) or ids), text
        assert ids[1:] == reference.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == sp.decode(ids[1:])
        detok = ours.detokenizer()
        assert "".join(detok.push(i) for i in ids) + detok.flush() == ours.decode(ids)


def test_recovered_merges_rank_by_score_then_length():
    vocab = {"a": 0, "b": 1, "ab": 2, "abb": 3, "bb": 4}
    rank = {"a": 0.0, "b": 0.0, "ab": -1.0, "abb": -2.0, "bb": -1.0}
    merges = recover_merges(vocab, rank)
    assert merges[:2] == [("a", "b"), ("b", "b")]  # equal score: vocabulary order
    assert set(merges[2:]) == {("ab", "b"), ("a", "bb")} and merges[2] == ("ab", "b")


def test_unsupported_decoder_is_refused_by_name(tmp_path: Path):
    backend = Backend(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    backend.decoder = decoders.WordPiece()
    backend.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="WordPiece"):
        Tokenizer.from_dir(tmp_path)
