"""Exact-length prompts from the corpus, and `gptserve-bench` end to end against the stub."""

import json
from collections.abc import Sequence

import pytest

from bench import cli
from bench.prompts import build_prompts, corpus_text, exact_prompt


class WordCodec:
    """One token per word, plus a BOS the "server" adds, like many Llama tokenizers."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.words: list[str] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = []
        for w in text.split():
            if w not in self.vocab:
                self.vocab[w] = len(self.words) + 1
                self.words.append(w)
            ids.append(self.vocab[w])
        return [0, *ids] if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return " ".join(self.words[i - 1] for i in ids if i != 0)


def test_prompts_count_exactly_as_the_server_counts_including_bos():
    codec = WordCodec()
    prompts = build_prompts(codec, 50, count=5, seed=3)
    assert [p.num_tokens for p in prompts] == [50] * 5
    assert all(len(codec.encode(p.prompt)) == 50 for p in prompts)  # type: ignore[arg-type]
    assert len({p.prompt for p in prompts}) == 5  # different offsets, different text
    assert build_prompts(codec, 50, count=5, seed=3) == prompts


def test_prompts_longer_than_the_corpus_repeat_it():
    codec = WordCodec()
    n = 3 * len(corpus_text().split())
    (p,) = build_prompts(codec, n, count=1)
    assert p.num_tokens == n


def test_exact_prompt_reports_the_closest_length_when_none_fits():
    class Pairs(WordCodec):  # every window of k tokens encodes to 2k: 7 is unreachable
        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return super().encode(text, False) * 2

    codec = Pairs()
    ids = codec.encode(corpus_text(), add_special_tokens=False)[:100]
    p = exact_prompt(codec, ids, 0, 7)
    assert p.num_tokens in (6, 8)


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError):
        build_prompts(WordCodec(), 0, count=1)


def test_cli_sweep_against_stub_writes_results_and_plots(
    stub_server, tmp_path, monkeypatch, capsys
):
    url, state = stub_server
    monkeypatch.setattr(cli, "load_tokenizer", lambda name: WordCodec())
    out = tmp_path / "r.json"
    argv = [
        "--base-url",
        url,
        "--model",
        "stub",
        "--concurrency",
        "1,2",
        "--num-prompts",
        "3",
        "--input-len",
        "16",
        "--output-len",
        "5",
        "--goodput",
        "ttft:10000",
        "tpot:1000",
        "--out",
        str(out),
        "--plots",
        str(tmp_path),
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    data = json.loads(out.read_text())
    assert [p["level"] for p in data["points"]] == [1.0, 2.0]
    assert all(p["completed"] == 3 and p["total_output_tokens"] == 15 for p in data["points"])
    assert all(p["goodput"] > 0 for p in data["points"])
    assert data["machine"]["cores"] >= 1 and data["commit"] and data["date"]
    assert {f.name for f in tmp_path.glob("*.png")} == {
        "sweep-throughput.png",
        "sweep-latency.png",
        "sweep-ttft-cdf.png",
    }
    assert state.bodies[-1]["prompt"].count(" ") == 14  # 16 tokens: BOS + 15 words
    printed = capsys.readouterr().out
    assert "out tok/s" in printed


def test_cli_rejects_bad_goodput(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--goodput", "latency:5"])
    assert "--goodput takes" in capsys.readouterr().err


def test_cli_unreachable_server_exits_2(capsys):
    assert cli.main(["--base-url", "http://127.0.0.1:9", "--no-progress"]) == 2
    assert "cannot reach" in capsys.readouterr().err
