import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _restore_global_state():
    """Every test starts from the same process-wide state, whatever ran before it (order independence,
    checked with ``--random-order``): torch's CPU threads, default dtype, grad mode and global CPU RNG,
    and the environment variables are put back after each test. Code under test changes them
    (``--threads`` sets ``torch.set_num_threads``, ``run()`` calls ``torch.manual_seed``)."""
    threads, dtype, grad = torch.get_num_threads(), torch.get_default_dtype(), torch.is_grad_enabled()
    rng, env = torch.get_rng_state(), dict(os.environ)
    yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
    torch.set_grad_enabled(grad)
    torch.set_rng_state(rng)
    if dict(os.environ) != env:
        os.environ.clear()
        os.environ.update(env)


def tiny_llama(dtype=torch.float32, seed=0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager")
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).to(dtype)


MICRO_LLAMA = {
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
    "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 512, "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "training": {"tokenizer": "bpe512", "seq_len": 16, "batch_size": 4, "total_batch_size": 4, "lr": 3e-3,
                 "rank": 8, "tau": 2, "max_steps": 4},
}


def micro_llama_config(**overrides) -> dict:
    """The micro LLaMA the training-pipeline tests run, as a ``train/configs``-style dict (a fresh copy):
    2 layers, hidden 32, the 512-token BPE, 4 steps of 16-token sequences at rank 8, tau 2. Keyword
    arguments replace top-level keys; ``training=`` replaces the whole ``training`` section."""
    cfg = {**MICRO_LLAMA, "training": dict(MICRO_LLAMA["training"])}
    cfg.update(overrides)
    return cfg


def write_micro_llama_config(path, **overrides) -> str:
    """:func:`micro_llama_config` written as JSON to ``path`` (for ``--config``); returns the path as a string."""
    path.write_text(json.dumps(micro_llama_config(**overrides)))
    return str(path)


def tiny_gpt2(dtype=torch.float32, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, attn_implementation="eager")
    return GPT2LMHeadModel(cfg).to(dtype)


def tiny_bert(dtype=torch.float32, seed=0):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=32, num_labels=2, attn_implementation="eager")
    return BertForSequenceClassification(cfg).to(dtype)


def assert_close_hf(actual, expected, ulps=32, msg=None):
    """Compare outputs or gradients of a float64 HF model at float32 precision.

    HF LLaMA computes RMSNorm and the rotary embedding in float32 even when its weights are float64
    (it casts there and back), so two equal functions of a "float64" LLaMA agree only to a few float32
    ulps. Tolerance: ``ulps`` float32 epsilons, relative and times the largest expected magnitude, absolute
    (measured: at most 3.6 ulps of the largest value, in the tests that use it).
    """
    eps = ulps * torch.finfo(torch.float32).eps
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=eps, atol=eps * scale, msg=msg)


def lm_batch(batch=2, seq=8, vocab=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


@pytest.fixture
def llama():
    return tiny_llama()


def measure_method(method, cfg, rank, batch, seq, attn="sdpa", dtype=torch.float32, seed=1, **setup_options):
    """One steady training step of ``rso.train.bench.recipes.setup(method, **setup_options)`` on a LLaMA built from
    ``cfg``, measured with ``rso.memory.measure_step`` (no peak tracking); returns (report, setup)."""
    import warnings
    from transformers import LlamaConfig, LlamaForCausalLM
    from rso.memory import measure_step
    from rso.train.bench.recipes import setup
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation=attn)).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = setup(method, model, rank=rank, **setup_options)
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))
    return measure_step(s.model, {"input_ids": ids, "labels": ids}, s.optimizer, track_peak=False), s


class OpRecorder(TorchDispatchMode):
    """Every aten op run inside the mode: ``calls`` holds (op name, operand shapes), ``made`` the (shape, dtype)
    of each tensor an op returns in new storage (not a view or an in-place/out= result)."""

    def __init__(self):
        super().__init__()
        self.calls, self.made = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        self.calls.append((func.overloadpacket.__name__, [tuple(t.shape) for t in inputs]))
        storages = {t.untyped_storage().data_ptr() for t in inputs}
        self.made += [(tuple(t.shape), t.dtype) for t in tree_leaves(out)
                      if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in storages]
        return out

    def ops_reading(self, shape):
        """Names of the ops that took a tensor of ``shape``."""
        return {name for name, shapes in self.calls if shape in shapes}
