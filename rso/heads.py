"""Output-head options: a causal-LM loss that never holds the vocab-wide logits of the whole batch.

Two ways to use it with a Hugging Face ``*ForCausalLM`` model (plain, ``rso.wrap``-ed or PEFT):

    loss = rso.heads.causal_lm_loss(model, input_ids, labels)      # in your own training loop

    rso.heads.use_chunked_head(model, chunk_size=1024)              # model(input_ids=…, labels=…).loss
    ...                                                             # now goes through the chunked head
    rso.heads.restore_head(model)

With labels, the patched forward returns ``logits=None`` (that is the point); without labels it is the
original forward. The loss equals Hugging Face's ``ForCausalLMLoss`` (labels shifted by one,
``-100`` ignored, mean over the remaining tokens or ``num_items_in_batch``).
"""
from __future__ import annotations

import types

import torch.nn.functional as F

from rso.layers.chunked_ce import MODES, chunked_linear_cross_entropy

__all__ = ["causal_lm_loss", "use_chunked_head", "restore_head", "uses_chunked_head"]

_ORIGINAL = "_rso_original_forward"


def _causal_lm(model):
    """The innermost ``*ForCausalLM`` module (unwrapping PEFT) with its decoder and head."""
    inner = model
    get_base = getattr(inner, "get_base_model", None)
    if callable(get_base):
        inner = get_base()
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    decoder = getattr(inner, getattr(inner, "base_model_prefix", "model"), None)
    if head is None or decoder is None or not hasattr(head, "weight"):
        raise TypeError(f"rso.heads: {type(model).__name__} is not a causal LM with a linear output head "
                        f"(get_output_embeddings() and .{getattr(inner, 'base_model_prefix', 'model')})")
    cfg = getattr(inner, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(cfg, attr, None) not in (None, 1.0):
            raise ValueError(f"rso.heads: {type(inner).__name__} uses {attr}; the chunked head does not apply it")
    return inner, decoder, head


def _shift(labels, ignore_index=-100):
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def causal_lm_loss(model, input_ids=None, labels=None, *, attention_mask=None, chunk_size: int = 1024,
                   mode: str = "recompute", num_items_in_batch=None, ignore_index: int = -100, **kwargs):
    """Next-token cross-entropy of a causal LM, its head applied ``chunk_size`` tokens at a time."""
    if labels is None:
        raise ValueError("rso.heads.causal_lm_loss: labels are required")
    _, decoder, head = _causal_lm(model)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    targets = _shift(labels.to(hidden.device), ignore_index)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    return chunked_linear_cross_entropy(hidden, head.weight, targets, getattr(head, "bias", None),
                                        chunk_size=chunk_size, ignore_index=ignore_index, reduction=reduction,
                                        divisor=num_items_in_batch, mode=mode)


def use_chunked_head(model, chunk_size: int = 1024, mode: str = "recompute"):
    """Patch ``model``'s forward (in place) so a call with ``labels`` computes the loss chunk by chunk."""
    if mode not in MODES:
        raise ValueError(f"rso.heads.use_chunked_head: mode must be one of {MODES}, got {mode!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"rso.heads.use_chunked_head: chunk_size must be a positive int, got {chunk_size!r}")
    inner, _, _ = _causal_lm(model)
    if uses_chunked_head(inner):
        restore_head(inner)
    original = inner.forward

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if labels is None or kwargs.get("use_cache") or kwargs.get("past_key_values") is not None:
            return original(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        kwargs.pop("logits_to_keep", None)
        kwargs.pop("return_dict", None)
        kwargs.pop("use_cache", None)
        num_items = kwargs.pop("num_items_in_batch", None)
        loss = causal_lm_loss(self, input_ids, labels, attention_mask=attention_mask, chunk_size=chunk_size,
                              mode=mode, num_items_in_batch=num_items, use_cache=False, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast
        return CausalLMOutputWithPast(loss=loss, logits=None)

    object.__setattr__(inner, _ORIGINAL, original)
    inner.forward = types.MethodType(forward, inner)
    return model


def uses_chunked_head(model) -> bool:
    try:
        inner = _causal_lm(model)[0]
    except (TypeError, ValueError):
        return False
    return _ORIGINAL in vars(inner)


def restore_head(model):
    """Undo :func:`use_chunked_head`."""
    inner = _causal_lm(model)[0]
    if _ORIGINAL in vars(inner):
        del inner.forward  # the instance attribute; the class's forward shows again
        object.__delattr__(inner, _ORIGINAL)
    return model


def _loss_fn(chunk_size=1024, mode="recompute"):
    """A ``loss_fn(model, batch)`` for :func:`rso.memory.measure_step` and the benchmark."""
    def fn(model, batch):
        return causal_lm_loss(model, batch["input_ids"], batch["labels"],
                              attention_mask=batch.get("attention_mask"), chunk_size=chunk_size, mode=mode)
    return fn

