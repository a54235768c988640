"""Offline data pipeline: embedded corpus, real tokenizers, packing, checkpointable batch order."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from rso.train import data  # noqa: E402
from rso.train.models import ConfigError, available_configs, build_model, load_config  # noqa: E402


def test_embedded_corpus_is_real_text_with_disjoint_heldout():
    train, held = data.load_documents("embedded")
    assert len(train) > 10_000 and len(held) > 200
    assert not set(train) & set(held)
    words = sum(len(d.split()) for d in train[:500])
    assert words > 50_000  # real paragraphs, not stubs
    assert data.load_documents("embedded")[1] == held  # the split does not depend on anything else


def test_single_sources_and_paths(tmp_path):
    for name in ("wiki", "bbc", "xsum"):
        train, held = data.load_documents(name, max_docs=20)
        assert len(train) + len(held) == 20
    text = tmp_path / "corpus.txt"
    text.write_text("first document here.\n\nsecond one.\n\nthird one, a bit longer.\n")
    train, held = data.load_documents(str(text), eval_fraction=0.34)
    assert len(train) == 2 and len(held) == 1
    jl = tmp_path / "c.jsonl"
    jl.write_text('{"body": "a b c"}\n{"body": "d e f"}\n')
    with pytest.raises(data.DataError, match="no string field 'text'"):
        data.load_documents(str(jl))
    assert len(data.load_documents(str(jl), text_field="body", eval_fraction=0.5)[0]) == 1
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\x00\x01\x02 not text")
    with pytest.raises(data.DataError, match="NUL bytes"):
        data.load_documents(str(binary))


def test_real_tokenizers_load_offline(tmp_path):
    gpt2 = data.load_tokenizer("gpt2")
    assert len(gpt2) == 50257
    assert gpt2("Hello world, this is a test.")["input_ids"] == [15496, 995, 11, 428, 318, 257, 1332, 13]
    llama = data.load_tokenizer("llama2", cache_dir=tmp_path)
    assert len(llama) == 32000
    assert llama("Hello world", add_special_tokens=False)["input_ids"] == [15043, 3186]
    again = data.load_tokenizer("llama2", cache_dir=tmp_path)  # from the saved copy
    assert again("Hello world", add_special_tokens=False)["input_ids"] == [15043, 3186]


def test_bpe_training_is_cached_and_deterministic(tmp_path):
    docs, _ = data.load_documents("embedded", max_docs=100)
    a = data.load_tokenizer("bpe300", cache_dir=tmp_path, docs=docs)
    b = data.load_tokenizer("bpe300", cache_dir=tmp_path, docs=docs)
    assert len(a) == 300 and a(docs[0])["input_ids"] == b(docs[0])["input_ids"]
    assert a.decode(a(docs[0])["input_ids"]) == docs[0]  # byte-level: lossless


def test_token_cache_roundtrip_and_corrupt_cache(tmp_path):
    tok = data.load_tokenizer("gpt2")
    train, held = data.load_documents("bbc", max_docs=30)
    t1, e1 = data.prepare_tokens(tok, train, held, tmp_path, log=lambda *_: None)
    files = list((tmp_path / "tokens").rglob("*.npy"))
    assert len(files) == 2
    for f in files:
        f.write_bytes(b"garbage")
    t2, e2 = data.prepare_tokens(tok, train, held, tmp_path, log=lambda *_: None)
    assert np.array_equal(t1, t2) and np.array_equal(e1, e2)


def test_block_loader_position_resumes_exactly():
    tokens = np.arange(1000, dtype=np.uint16)
    a = data.BlockLoader(tokens, seq_len=10, batch_size=7, seed=3)
    seq = [a.next_batch() for _ in range(30)]  # crosses several epochs (100 blocks / 7 per batch)
    b = data.BlockLoader(tokens, seq_len=10, batch_size=7, seed=3)
    for _ in range(17):
        b.next_batch()
    c = data.BlockLoader(tokens, seq_len=10, batch_size=7, seed=3)
    c.load_state_dict(b.state_dict())
    for i in range(17, 30):
        assert torch.equal(c.next_batch(), seq[i])
    first_epoch = torch.cat(seq[:15])[:100]
    assert sorted(first_epoch[:, 0].tolist()) == list(range(0, 1000, 10))  # each block once per epoch


def test_configs_exist_and_match_reference():
    assert {"tiny", "60m", "130m", "350m", "1b", "7b"} <= set(available_configs())
    ref = {"60m": (512, 1376, 8, 8), "130m": (768, 2048, 12, 12), "350m": (1024, 2736, 16, 24),
           "1b": (2048, 5461, 32, 24), "7b": (4096, 11008, 32, 32)}
    for name, (h, i, heads, layers) in ref.items():
        cfg = load_config(name)
        assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"],
                cfg["num_hidden_layers"], cfg["vocab_size"]) == (h, i, heads, layers, 32000)
        assert cfg["training"]["tokenizer"] == "llama2"
    with pytest.raises(ConfigError, match="unknown config"):
        load_config("3b")


def test_sixty_m_parameter_count():
    with torch.device("meta"):
        model = build_model(load_config("60m"))
    n = sum(p.numel() for p in model.parameters())
    assert 55e6 < n < 62e6


def test_streaming_loader_resumes_and_keeps_eval_fixed(monkeypatch):
    """The C4 path, with datasets.load_dataset replaced by a local stream (no network in tests)."""
    datasets = pytest.importorskip("datasets")
    docs, _ = data.load_documents("bbc", max_docs=60)

    def fake_load_dataset(name, config=None, split=None, streaming=False):
        assert (name, config, streaming) == ("allenai/c4", "en", True)
        rows = docs if split == "train" else docs[::-1]
        return datasets.IterableDataset.from_generator(lambda: ({"text": d} for d in rows))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    tok, train, held = data.build_pretraining_data("c4", "gpt2", 32, 4, 0, None)
    seq = [train.next_batch() for _ in range(8)]
    other = data.StreamingLoader(tok, 32, 4, seed=0, shuffle_buffer=10_000)  # as build_pretraining_data makes it
    for _ in range(5):
        other.next_batch()
    resumed = data.StreamingLoader(tok, 32, 4, seed=0, shuffle_buffer=10_000)
    resumed.load_state_dict(other.state_dict())
    for i in range(5, 8):
        assert torch.equal(resumed.next_batch(), seq[i])
    first = [b.clone() for b in held.eval_batches(3)]
    again = list(held.eval_batches(3))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
