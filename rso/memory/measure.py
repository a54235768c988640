"""Exact memory accounting of one training step: what each part of training memory holds.

``measure_step`` runs forward, backward and ``optimizer.step()`` once and counts, in bytes, each
underlying storage once:

* parameters / trainable parameters / buffers,
* gradients (``p.grad`` after backward),
* optimizer state (tensors in ``optimizer.state`` after the step, also those held inside Python
  objects such as galore-torch's projectors),
* activations: tensors autograd saved for backward, seen through
  ``torch.autograd.graph.saved_tensors_hooks``, excluding storages of parameters and buffers
  (saving a weight costs no extra memory); under activation checkpointing (``torch.utils.checkpoint``,
  non-reentrant, as ``model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant":
  False})`` sets up) that is what the checkpointed step keeps: each checkpointed block's input, and what
  runs outside the blocks,
* recomputed: with activation checkpointing, the most bytes one checkpointed block's recomputation in
  the backward pass saves on top of those (parameters, buffers and kept tensors not counted again);
  ``activations + recomputed`` is then the step's activation memory at its peak,
* peak live bytes: the CUDA allocator's peak on GPU; on CPU the peak of live tensor storages tracked
  by a ``TorchDispatchMode`` (every storage an op creates, released when it is freed).
"""
from __future__ import annotations

import types
from dataclasses import asdict, dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["MemoryReport", "measure_step", "storage_bytes", "format_bytes", "LiveTensorTracker", "tensors_in"]


def _storage(t: torch.Tensor):
    if not isinstance(t, torch.Tensor) or t.is_sparse or t.device.type == "meta":
        return None
    s = t.untyped_storage()
    return s if s.nbytes() > 0 else None


def storage_bytes(tensors, exclude=()) -> int:
    """Bytes of the distinct storages behind ``tensors`` (skipping data pointers in ``exclude``)."""
    seen, total = set(exclude), 0
    for t in tensors:
        s = _storage(t)
        if s is None or s.data_ptr() in seen:
            continue
        seen.add(s.data_ptr())
        total += s.nbytes()
    return total


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024


class LiveTensorTracker(TorchDispatchMode):
    """Tracks live tensor storages created by ops (plus ``baseline`` tensors) and their peak bytes."""

    def __init__(self, baseline=()):
        super().__init__()
        self._live = {}
        self.live = 0
        for t in baseline:
            self._add(t)
        self.peak = self.live

    def _add(self, t):
        s = _storage(t)
        if s is None:
            return False
        ref = StorageWeakRef(s)
        if ref.cdata in self._live:
            return False
        self._live[ref.cdata] = (ref, s.nbytes())
        self.live += s.nbytes()
        return True

    def _sweep(self):
        dead = [k for k, (ref, _) in self._live.items() if ref.expired()]
        for k in dead:
            self.live -= self._live.pop(k)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()
        if any([self._add(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]):
            self.peak = max(self.peak, self.live)
        return out


@dataclass
class MemoryReport:
    parameters: int
    trainable_parameters: int
    buffers: int
    gradients: int
    optimizer_state: int
    activations: int
    peak: int
    peak_source: str
    recomputed: int = 0

    @property
    def activation_peak(self) -> int:
        """Saved activations at the step's peak: what the step keeps plus one block's recomputation."""
        return self.activations + self.recomputed

    def as_dict(self) -> dict:
        return asdict(self)

    def table(self, title: str = "memory of one training step") -> str:
        rows = [("parameters", self.parameters), ("  trainable", self.trainable_parameters),
                ("buffers", self.buffers), ("gradients", self.gradients),
                ("optimizer state", self.optimizer_state), ("activations (saved for backward)", self.activations),
                (f"peak live ({self.peak_source})", self.peak)]
        if self.recomputed:
            rows.insert(6, ("  + one block's recomputation", self.recomputed))
        width = max(len(r[0]) for r in rows)
        lines = [title, "-" * (width + 20)]
        lines += [f"{name:<{width}}  {format_bytes(v):>16}" for name, v in rows]
        return "\n".join(lines)

    def __str__(self):
        return self.table()


def _default_loss(model, batch):
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    loss = out.loss if hasattr(out, "loss") else out
    if not torch.is_tensor(loss):
        raise TypeError("rso.memory.measure_step: pass loss_fn=(model, batch) -> scalar loss; the model's "
                        f"output {type(out).__name__} has no .loss")
    return loss if loss.dim() == 0 else loss.float().pow(2).mean()


def tensors_in(obj, depth=0):
    """Tensors inside containers and (up to 3 levels of) plain objects, e.g. galore-torch's projector."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v, depth)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            yield from tensors_in(v, depth)
    elif depth < 3 and hasattr(obj, "__dict__") and not isinstance(obj, (type, types.ModuleType)):
        for v in vars(obj).values():
            yield from tensors_in(v, depth + 1)


def _optimizer_tensors(optimizer):
    if optimizer is None:
        return []
    return [t for st in optimizer.state.values() for t in tensors_in(st)]


def measure_step(model: torch.nn.Module, batch, optimizer=None, loss_fn=None, track_peak: bool = True) -> MemoryReport:
    """Run one training step (forward, backward, ``optimizer.step()``, ``zero_grad``) and count its bytes.

    ``loss_fn(model, batch) -> loss`` defaults to ``model(**batch).loss`` (or ``model(batch)``; a
    non-scalar output is reduced by its mean square). The step really trains the model.
    """
    loss_fn = loss_fn or _default_loss
    params = list({id(p): p for p in model.parameters()}.values())
    buffers = list(model.buffers())
    fixed = {s.data_ptr() for s in map(_storage, params + buffers) if s is not None}
    cuda = any(p.is_cuda for p in params)

    saved, saved_refs = {}, {}

    def pack(t):
        s = _storage(t)
        if s is not None and s.data_ptr() not in fixed:
            saved[s.data_ptr()] = s.nbytes()
            saved_refs[s.data_ptr()] = StorageWeakRef(s)
        return t

    def known(s):  # a parameter, a buffer, or a tensor the step keeps that is still alive (addresses get reused)
        ptr = s.data_ptr()
        return ptr in fixed or (ptr in saved_refs and not saved_refs[ptr].expired())

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        tracker = None
    elif track_peak:
        baseline = params + buffers + [p.grad for p in params if p.grad is not None] + _optimizer_tensors(optimizer)
        tracker = LiveTensorTracker(baseline)
    else:
        tracker = None

    with tracker if tracker is not None else _Null():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn(model, batch)
        with _count_recomputation(known) as recomputed:
            loss.backward()
        gradients = storage_bytes([p.grad for p in params if p.grad is not None])
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
        peak, source = torch.cuda.max_memory_allocated(), "CUDA allocator"
    else:
        peak, source = (tracker.peak, "tracked tensors") if tracker is not None else (0, "not tracked")
    return MemoryReport(
        parameters=storage_bytes(params),
        trainable_parameters=storage_bytes([p for p in params if p.requires_grad]),
        buffers=storage_bytes(buffers, exclude={s.data_ptr() for s in map(_storage, params) if s is not None}),
        gradients=gradients,
        optimizer_state=storage_bytes(_optimizer_tensors(optimizer)),
        activations=sum(saved.values()),
        peak=peak, peak_source=source, recomputed=max(recomputed, default=0))


class _count_recomputation:
    """Bytes each non-reentrant checkpoint recomputation saves (storages for which ``known(storage)`` is
    false), one entry per recomputed region; the list it yields fills during the backward pass.

    ``torch.utils.checkpoint`` saves a recomputed block's tensors through its own ``_recomputation_hook``
    (a ``saved_tensors_hooks`` pushed above any of ours); its pack hook is wrapped here to see them. If a
    torch version lacks that class, nothing is counted (``recomputed`` stays 0).
    """

    def __init__(self, known):
        self.known = known
        self.counts = []

    def __enter__(self):
        import torch.utils.checkpoint as tuc
        self._module = tuc
        self._original = original = getattr(tuc, "_recomputation_hook", None)
        if original is None:
            return self.counts
        known, counts = self.known, self.counts

        class _Counting(original):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                inner, mine = self.pack_hook, {}
                counts.append(0)
                index = len(counts) - 1

                def pack_hook(x):
                    s = _storage(x)
                    if s is not None and s.data_ptr() not in mine and not known(s):
                        mine[s.data_ptr()] = s.nbytes()
                        counts[index] += s.nbytes()
                    return inner(x)

                self.pack_hook = pack_hook

        tuc._recomputation_hook = _Counting
        return self.counts

    def __exit__(self, *exc):
        if self._original is not None:
            self._module._recomputation_hook = self._original
        return False


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
