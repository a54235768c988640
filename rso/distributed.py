"""RSO on ``torch.distributed``: DDP with counted communication, FSDP2, distributed checkpoints.

Nothing here changes the core layers or the outer loop; it adapts a wrapped model to the parallel
wrappers of PyTorch.

DDP
    ``rso.wrap`` first, then :func:`ddp` (or plain ``DistributedDataParallel`` with
    ``broadcast_buffers=False``). Only ``requires_grad`` parameters enter DDP's buckets, so per step
    the all-reduce carries each wrapped layer's ``B`` gradient (out × rank) instead of its weight
    gradient (out × in), plus the parameters left unwrapped (embeddings, norms, head). Every rank
    draws the same P from (seed, cycle), and every rank runs the same optimizer steps, so merges and
    resamples happen in lockstep without any message. :class:`CommCounter` is a DDP communication
    hook that counts the bytes it all-reduces.

FSDP2
    :func:`fully_shard_model` applies ``torch.distributed.fsdp.fully_shard`` per transformer block
    and at the root. W₀ (frozen) and B are both sharded along dim 0 (out_features) with the same
    row split, and P is a replicated buffer, so the merge ``W₀ ← W₀ + s·B P`` is row-local: each
    rank updates its own rows with no communication and no gathered weight (see
    :func:`merge_sharded_`). :func:`mixed_precision_policy` builds the ``MixedPrecisionPolicy``.

Checkpoints
    :func:`save_checkpoint` / :func:`load_checkpoint` use ``torch.distributed.checkpoint``: sharded
    tensors are written by their owners, replicated ones once. The model part holds W₀, B, P and the
    step / cycle / seed counters; the optimizer part is keyed by parameter name (not position), so
    a checkpoint loads into DDP, FSDP2 or a single process with any world size. Loading unpickles
    nothing but checkpoint metadata, tensors and plain data (a tampered checkpoint cannot run code);
    ``RSO_TRUST_CHECKPOINT=1`` opts in to a full unpickle (see :mod:`rso.trust`).

Gradient-based projections (``svd``, ``hybrid``): the core captures each rank's *local* full weight
gradient on the last step of a cycle; :func:`sync_captured_gradients` (installed by :func:`ddp`
and :func:`fully_shard_model`) averages it across ranks before the merge, so every rank computes
the SVD of the same global gradient, exactly as a single process with the whole batch would.
"""

import contextlib
import functools
import hashlib
import inspect
import json
import os
import pickle
import types
import warnings
import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from rso.layers.subspace_experts import SubspaceExperts
from rso.layers.quantized_linear import QuantizedSubspaceLinear
from rso.layers.subspace_linear import SubspaceLinear
from rso.trust import TRUST_ENV, CheckpointRefused, trusted, weights_only_refusal

__all__ = [
    "CommCounter", "FSDPCommCounter", "counting_allreduce_hook", "ddp", "gradient_bytes", "buffer_bytes",
    "sync_captured_gradients", "projection_fingerprints", "check_projections_synchronized",
    "mixed_precision_policy", "fully_shard_model", "merge_sharded_", "suspend_outer_loop",
    "save_checkpoint", "load_checkpoint", "unwrap_parallel",
]


# ---------------------------------------------------------------------------- helpers
def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The user's module under ``DistributedDataParallel`` / ``torch.compile`` (FSDP2 keeps it)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _outer_loop(model: nn.Module):
    from .wrapping import _LOOP_ATTR
    return getattr(unwrap_parallel(model), _LOOP_ATTR, None)


def _subspace_layers(model: nn.Module):
    return [(n, m) for n, m in unwrap_parallel(model).named_modules() if isinstance(m, SubspaceLinear)]


def _world(group=None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


# ---------------------------------------------------------------------------- DDP
@dataclass
class CommCounter:
    """State of :func:`counting_allreduce_hook`: bytes all-reduced per synchronizing backward pass.

    ``history[i]`` is the payload (bucket bytes) of the i-th backward pass that synchronized
    gradients; a backward pass under ``no_sync()`` sends nothing and adds no entry. A ring
    all-reduce moves ``2 (world − 1) / world`` times the payload over each rank's link.
    """

    process_group: object = None
    history: list = field(default_factory=list)
    buckets: list = field(default_factory=list)  # (bytes, numel, dtype) of the last pass
    _current: int = 0
    _current_buckets: list = field(default_factory=list)

    def record(self, tensor: torch.Tensor, last: bool):
        nbytes = tensor.numel() * tensor.element_size()
        self._current += nbytes
        self._current_buckets.append((nbytes, tensor.numel(), str(tensor.dtype)))
        if last:
            self.history.append(self._current)
            self.buckets = self._current_buckets
            self._current, self._current_buckets = 0, []

    @property
    def bytes_per_step(self) -> int | None:
        """Payload of the last synchronizing backward pass (None before the first)."""
        return self.history[-1] if self.history else None

    @property
    def total_bytes(self) -> int:
        return sum(self.history) + self._current


def counting_allreduce_hook(counter: CommCounter, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: DDP's default averaging all-reduce, counting each bucket's bytes."""
    buf = bucket.buffer()
    counter.record(buf, bucket.is_last())
    group = counter.process_group if counter.process_group is not None else dist.group.WORLD
    buf.div_(dist.get_world_size(group))
    fut = dist.all_reduce(buf, group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def ddp(model: nn.Module, *, counter: CommCounter | None = None, broadcast_buffers: bool = False,
        process_group=None, **kwargs) -> nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel`` for an ``rso.wrap``-ped (or plain) model.

    * ``broadcast_buffers=False`` by default: DDP would otherwise re-broadcast every buffer from
      rank 0 before each forward, i.e. every P (rank × in per layer, as large as the B gradients) —
      needless, since P is a function of (seed, cycle) and identical on all ranks.
    * ``counter``: register :func:`counting_allreduce_hook` with it (``model.rso_comm`` holds it).
    * gradient-based projections: :func:`sync_captured_gradients` is installed.
    Other keyword arguments go to ``DistributedDataParallel``.
    """
    if process_group is not None:
        kwargs["process_group"] = process_group
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters:
        kwargs.setdefault("forward_sync_buffers", broadcast_buffers)  # newer torch: same meaning, buffers
    else:                                                             # still synced once at construction
        kwargs.setdefault("broadcast_buffers", broadcast_buffers)
    wrapped = nn.parallel.DistributedDataParallel(model, **kwargs)
    if counter is not None:
        if counter.process_group is None:
            counter.process_group = process_group
        wrapped.register_comm_hook(counter, counting_allreduce_hook)
        wrapped.rso_comm = counter
    if _outer_loop(model) is not None:
        sync_captured_gradients(model, process_group)
    return wrapped


def gradient_bytes(model: nn.Module) -> dict:
    """What data parallelism reduces per step, from the model alone (trainable parameters).

    Returns bytes of the B gradients, of the other trainable parameters, their sum, and ``full``:
    the bytes the same model would reduce with every weight trainable (each SubspaceLinear counted
    as its out × in weight plus bias, B left out). ``bound`` is (max rank/in + the non-wrapped
    share) × full, the issue's upper bound for the sum.
    """
    core = unwrap_parallel(model)
    layer_ids = {id(m.B): m for _, m in _subspace_layers(core)}
    w0_ids = {id(m.weight) for m in layer_ids.values()}
    seen, b_bytes, other_bytes, full_bytes, nonwrapped_full = set(), 0, 0, 0, 0
    max_ratio = 0.0
    for p in core.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        nbytes = p.numel() * p.element_size()
        if id(p) in layer_ids:
            m = layer_ids[id(p)]
            b_bytes += nbytes if p.requires_grad else 0
            max_ratio = max(max_ratio, m.rank / m.in_features)
            continue
        full_bytes += nbytes
        if id(p) not in w0_ids:
            nonwrapped_full += nbytes
            other_bytes += nbytes if p.requires_grad else 0
    share = nonwrapped_full / full_bytes if full_bytes else 0.0
    total = b_bytes + other_bytes
    return {"B": b_bytes, "other": other_bytes, "total": total, "full": full_bytes,
            "max_rank_over_in": max_ratio, "nonwrapped_share": share,
            "bound": (max_ratio + share) * full_bytes, "ratio": total / full_bytes if full_bytes else 0.0}


def buffer_bytes(model: nn.Module) -> int:
    """Bytes DDP would broadcast before every forward with ``broadcast_buffers=True``."""
    return sum(b.numel() * b.element_size() for b in unwrap_parallel(model).buffers())


# ------------------------------------------------------------------- projections in sync
_CAPTURE_SYNC = weakref.WeakKeyDictionary()  # outer loop -> its capture-sync hook handle


def sync_captured_gradients(model: nn.Module, process_group=None):
    """Average the core's captured full weight gradients across ranks before each merge.

    The ``svd`` / ``hybrid`` samplers compute the next P from the full weight gradient, which the
    core accumulates *locally* on the last step of a cycle. This global optimizer pre-step hook
    all-reduces it (out × in per layer, once per cycle, i.e. 1/tau of a full gradient per step on
    average), so every rank's SVD sees the global gradient. Returns the hook handle (held weakly:
    it goes inert when the model is deleted). Idempotent per model.
    """
    core = unwrap_parallel(model)
    loop = _outer_loop(core)
    if loop is None:
        raise ValueError("sync_captured_gradients: the model is not wrapped by rso.wrap")
    if loop in _CAPTURE_SYNC:
        return _CAPTURE_SYNC[loop]
    ref = weakref.ref(loop)

    def pre(optimizer, args, kwargs):
        lp = ref()
        if lp is None:
            return
        if _world(process_group) > 1:
            for g in lp._groups_in(optimizer):
                for m in g.members:
                    cap = m._capture
                    if cap is not None and cap.grad is not None:
                        dist.all_reduce(cap.grad, group=process_group)
                        cap.grad.div_(_world(process_group))
        lp.start_first_cycle(optimizer)  # the first cycle's P from the averaged gradient, too

    loop.defer_first_cycle = True
    handle = register_optimizer_step_pre_hook(pre)
    weakref.finalize(loop, handle.remove)
    _CAPTURE_SYNC[loop] = handle
    return handle


def projection_fingerprints(model: nn.Module) -> dict:
    """{layer name: sha256 of P's bytes, cycle}: equal across ranks iff the projections are."""
    from .wrapping import subspace_members
    out = {}
    for name, m in subspace_members(unwrap_parallel(model)).items():
        raw = m.P.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        out[name] = (hashlib.sha256(raw.numpy().tobytes()).hexdigest(), int(m.cycle))
    return out


def check_projections_synchronized(model: nn.Module, process_group=None) -> bool:
    """True when every rank holds bit-identical P (and cycle) in every layer (one all_gather_object)."""
    mine = projection_fingerprints(model)
    if _world(process_group) == 1:
        return True
    everyone = [None] * _world(process_group)
    dist.all_gather_object(everyone, mine, group=process_group)
    return all(other == mine for other in everyone)


# ---------------------------------------------------------------------------- FSDP2
class FSDPCommCounter:
    """Bytes FSDP2 all-gathers (parameters) and reduce-scatters (gradients), unsharded sizes.

    :meth:`attach` installs counting collectives on every ``FSDPModule`` (FSDP2's
    ``set_custom_all_gather`` / ``set_custom_reduce_scatter``); :meth:`take` returns the bytes since
    the last call. The collectives themselves are FSDP2's defaults (their classes are private to
    torch, so this may need adjusting on other torch versions).
    """

    def __init__(self):
        self.all_gather = 0
        self.reduce_scatter = 0

    def attach(self, model: nn.Module) -> "FSDPCommCounter":
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter
        counter = self

        class CountingAllGather(DefaultAllGather):
            def __call__(self, output_tensor, input_tensor, group, async_op=False):
                counter.all_gather += output_tensor.numel() * output_tensor.element_size()
                return super().__call__(output_tensor, input_tensor, group, async_op)

        class CountingReduceScatter(DefaultReduceScatter):
            def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
                counter.reduce_scatter += input_tensor.numel() * input_tensor.element_size()
                return super().__call__(output_tensor, input_tensor, group, op, async_op)

        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_custom_all_gather(CountingAllGather())
                module.set_custom_reduce_scatter(CountingReduceScatter())
        return self

    def take(self) -> dict:
        out = {"all_gather": self.all_gather, "reduce_scatter": self.reduce_scatter}
        self.all_gather = self.reduce_scatter = 0
        return out


def mixed_precision_policy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=None,
                           cast_forward_inputs: bool = True):
    """FSDP2 ``MixedPrecisionPolicy``: compute in ``param_dtype``, reduce gradients in ``reduce_dtype``.

    The sharded parameters (and so the optimizer and the merge) stay in their own dtype (fp32).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, output_dtype=output_dtype,
                                cast_forward_inputs=cast_forward_inputs)


@torch.no_grad()
def merge_sharded_(layer: SubspaceLinear, next_projection=None) -> None:
    """``W₀ ← W₀ + s·B P``; ``B ← 0`` on FSDP2-sharded W₀ and B (the ``merge_`` FSDP2 layers use).

    With ``Shard(0)`` for both (FSDP2's default) rank k holds the same rows of W₀ and of B, and P is
    replicated, so each rank merges its rows: no communication, extra memory one fp32 copy of the
    local W₀ shard (out/world × in). Other placements fall back to gathering W₀ and B of this one
    layer (extra memory: the full out × in weight in fp32, one layer at a time) and keeping the
    local part of the result.
    """
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    W, B, P = layer.weight, layer.B, layer.P
    if not isinstance(W, DTensor):
        SubspaceLinear.merge_(layer)  # the layer's own merge (with its non-finite refusal)
        return
    row_local = (isinstance(B, DTensor) and W.device_mesh == B.device_mesh and W.placements == B.placements
                 and all(isinstance(pl, Shard) and pl.dim == 0 for pl in W.placements))
    w, b = W.to_local(), B.to_local()
    if not _finite_on_every_rank(b, B.device_mesh if isinstance(B, DTensor) else W.device_mesh):
        raise FloatingPointError(
            f"rso: {layer._describe()} cannot merge: B holds inf/nan on some rank, W₀ left unchanged; lower the "
            f"learning rate, enable gradient clipping, or load the last checkpoint")
    if row_local and w.shape[0] == b.shape[0]:
        if w.numel():
            w.copy_((w.float() + layer.scale * (b.float() @ P.float())).to(w.dtype))
    else:  # gather this layer only
        full_b = B.full_tensor() if isinstance(B, DTensor) else B
        merged = (W.full_tensor().float() + layer.scale * (full_b.float() @ P.float())).to(W.dtype)
        w.copy_(distribute_tensor(merged, W.device_mesh, W.placements).to_local())
    b.zero_()


def _finite_on_every_rank(local: torch.Tensor, mesh) -> bool:
    """True when ``local`` is finite on every rank of ``mesh`` (a MIN all-reduce of one flag per mesh dim)."""
    flag = torch.isfinite(local).all().to(torch.int32).reshape(1)
    for dim in range(mesh.ndim):
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=mesh.get_group(dim))
    return bool(flag.item())


def _block_units(model: nn.Module):
    """Transformer blocks: members of an ``nn.ModuleList`` that hold a SubspaceLinear or parameters."""
    units = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for child in module:
                if any(isinstance(m, SubspaceLinear) for m in child.modules()) or \
                        any(True for _ in child.parameters()):
                    units.append(child)
    return units


def fully_shard_model(model: nn.Module, *, mesh=None, mp_policy=None, reshard_after_forward: bool = True,
                      units=None, offload_policy=None):
    """``fully_shard`` each block (default: the members of the model's ``nn.ModuleList``s) and the root.

    W₀ and B are sharded (dim 0); P and the step / cycle / seed counters are buffers, replicated.
    Every SubspaceLinear gets :func:`merge_sharded_` as its ``merge_``, and gradient-based samplers
    get :func:`sync_captured_gradients`. With ``mp_policy.param_dtype`` set, P is stored in that dtype
    (the core multiplies it with activations of that dtype); the merge then uses this rounded P,
    the one the forward used, so W₀ + s·B P stays consistent. Returns the model (sharded in place).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError("fully_shard_model: pass the unwrapped model, not a DDP module")
    if any(isinstance(m, QuantizedSubspaceLinear) for m in model.modules()):
        raise NotImplementedError("rso.distributed.fully_shard_model: FSDP2 does not shard a quantized W₀ "
                                  "(quantize= or bitsandbytes layers); train it with DDP (rso.distributed.ddp) or on "
                                  "one process")
    if any(isinstance(m, SubspaceExperts) for m in model.modules()):
        raise NotImplementedError("rso.distributed.fully_shard_model: FSDP2 does not shard SubspaceExperts "
                                  "(mixture-of-experts weights) yet; train the MoE model with DDP "
                                  "(rso.distributed.ddp) or on one process, or wrap without the experts "
                                  "(target_parameters=[])")
    if mesh is None:
        device = next(model.parameters()).device
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    if offload_policy is not None:
        kwargs["offload_policy"] = offload_policy
    layers = _subspace_layers(model)
    compute_dtype = getattr(mp_policy, "param_dtype", None)
    for _, m in layers:
        if compute_dtype is not None and m.P.dtype != compute_dtype:
            m.P.data = m.P.data.to(compute_dtype)
        m.merge_ = types.MethodType(merge_sharded_, m)
    for unit in (units if units is not None else _block_units(model)):
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    if _outer_loop(model) is not None:
        sync_captured_gradients(model, mesh.get_group())
    return model


# ---------------------------------------------------------------------------- checkpoints
@contextlib.contextmanager
def suspend_outer_loop(model: nn.Module):
    """Optimizer steps inside do not advance or merge RSO's cycle (e.g. a dummy step that builds state).

    ``torch.distributed.checkpoint.state_dict.get_state_dict`` / ``set_state_dict`` call
    ``optimizer.step()`` with zero gradients on a fresh optimizer; without this, RSO counts it.
    """
    loop = _outer_loop(model)
    if loop is None:
        yield
        return
    loop.after_step = lambda optimizer: None
    loop.add_proximal_gradient = lambda optimizer: None
    try:
        yield
    finally:
        del loop.after_step
        del loop.add_proximal_gradient


def _param_names(model: nn.Module) -> dict:
    names = {}
    for name, p in unwrap_parallel(model).named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    return names


def _jsonable(value):
    if torch.is_tensor(value):
        if value.numel() != 1:
            raise TypeError("optimizer hyperparameters must be scalars or tensors of one element")
        return {"__tensor__": value.item(), "dtype": str(value.dtype).replace("torch.", "")}
    if isinstance(value, tuple):
        return {"__tuple__": [_jsonable(v) for v in value]}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} {value!r} in a checkpoint (not a tensor or a "
                    f"plain value)")


def _from_json(value):
    if isinstance(value, dict):
        if "__tensor__" in value:
            return torch.tensor(value["__tensor__"], dtype=getattr(torch, value["dtype"]))
        if "__tuple__" in value:
            return tuple(_from_json(v) for v in value["__tuple__"])
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def _optimizer_entries(model, optimizer):
    """Flat {key: tensor} of the optimizer state and a JSON index of everything else."""
    names = _param_names(model)
    tensors, index, groups = {}, {}, []
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError("save_checkpoint: the optimizer holds a parameter that is not in the model")
            name = names[id(p)]
            params.append(name)
            entry = {}
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    tensors[f"optim/{name}/{key}"] = value
                    entry[key] = {"tensor": True}
                else:
                    entry[key] = {"value": _jsonable(value)}
            if entry:
                index[name] = entry
        groups.append({"params": params, **{k: _jsonable(v) for k, v in group.items() if k != "params"}})
    return tensors, {"state": index, "param_groups": groups}


def save_checkpoint(path, model: nn.Module, optimizer=None, *, extra: dict | None = None, process_group=None):
    """Save model (W₀, B, P, counters) and optimizer state with ``torch.distributed.checkpoint``.

    Collective: every rank calls it. Works for a single process, DDP (replicated tensors written once)
    and FSDP2 (each rank writes its shards). ``extra`` (JSON-serializable: data position, LR
    scheduler ``state_dict()``...) comes back from :func:`load_checkpoint`.
    """
    import torch.distributed.checkpoint as dcp
    core = unwrap_parallel(model)
    state = {f"model/{k}": v for k, v in core.state_dict().items()}
    meta = {"version": 1, "world_size": _world(process_group), "extra": _jsonable(extra or {})}
    if optimizer is not None:
        tensors, index = _optimizer_entries(core, optimizer)
        state.update(tensors)
        meta["optimizer"] = index
    state["rso_meta"] = json.dumps(meta)
    dcp.save(state, checkpoint_id=str(path), process_group=process_group)


_DCP_METADATA = "torch.distributed.checkpoint.metadata"
#: (module, name) of every global a ``torch.distributed.checkpoint`` ``.metadata`` pickles: found by writing
#: single-process, DDP and FSDP2 (fp32 and bf16) checkpoints of this library with torch 2.13.
_METADATA_GLOBALS = frozenset(
    [(_DCP_METADATA, n) for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                                  "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")]
    + [("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
       ("torch.serialization", "_get_layout")]
    + [(m, n) for m in ("pathlib", "pathlib._local") for n in ("PosixPath", "WindowsPath")]  # StorageMeta's id
    + [("torch", n) for n, v in vars(torch).items() if isinstance(v, (torch.dtype, torch.layout, torch.memory_format))])


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only :data:`_METADATA_GLOBALS`; any other global is refused before it is even imported."""

    def __init__(self, file, path):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        raise CheckpointRefused(f"distributed checkpoint {self.path} refused: it pickles {module}.{name}, which is "
                                f"not checkpoint metadata, and unpickling it can run code; if you trust the file, "
                                f"set {TRUST_ENV}=1 to load it in full")


@functools.cache
def _safe_dcp():
    """(reader, planner) classes for ``dcp.load``: metadata, tensors and plain data only, unless :func:`trusted`."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            if trusted():
                return super().read_metadata(*args, **kwargs)
            rank = kwargs.get("rank")  # torch reads a rank's own __{rank}.metadata when .metadata is missing
            path = self.fs.concat_path(self.path, ".metadata" if rank is None else f"__{rank}.metadata")
            with self.fs.create_stream(path, "rb") as file:
                metadata = _MetadataUnpickler(file, path).load()
            if not isinstance(metadata, Metadata):
                raise ValueError(f"distributed checkpoint {path} holds a {type(metadata).__name__}, not "
                                 f"torch.distributed.checkpoint Metadata")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafePlanner(DefaultLoadPlanner):  # flatten_state_dict=True, DefaultLoadPlanner's default
        def __init__(self, reader):
            super().__init__()
            self.reader = reader

        def load_bytes(self, read_item, value):
            if trusted():
                return super().load_bytes(read_item, value)
            fqn = read_item.dest_index.fqn
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as e:
                info = self.reader.storage_data[read_item.storage_index]
                file = os.path.join(str(self.reader.path), info.relative_path)
                raise CheckpointRefused(f"distributed checkpoint entry {fqn!r} in {file} refused: "
                                        f"{weights_only_refusal(value, e)}; its non-tensor entries hold plain data "
                                        f"only, and unpickling anything else can run code; if you trust the file, "
                                        f"set {TRUST_ENV}=1 to load it in full") from None
            set_element(self.original_state_dict, self.mappings[fqn], obj)

    return SafeReader, SafePlanner


def _dcp_load(state: dict, reader, **kwargs) -> None:
    """``dcp.load`` with :func:`_safe_dcp`'s planner; a refusal is raised as itself, not in a CheckpointException."""
    import torch.distributed.checkpoint as dcp
    try:
        dcp.load(state, storage_reader=reader, planner=_safe_dcp()[1](reader), **kwargs)
    except dcp.CheckpointException as e:  # torch gathers every rank's error into one multi-line exception
        refused = [exc for exc, _ in e.failures.values() if isinstance(exc, CheckpointRefused)]
        if refused:
            raise refused[0] from None
        raise


def _read_meta(path) -> tuple[dict, dict]:
    reader = _safe_dcp()[0](str(path))
    metadata = reader.read_metadata().state_dict_metadata  # a refusal here, before dcp.load's fallbacks
    holder = {"rso_meta": ""}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        _dcp_load(holder, reader, no_dist=True)
    return json.loads(holder["rso_meta"]), metadata


def _check_tensor_entries(path, state: dict, metadata: dict) -> None:
    """Model and optimizer entries must be stored as tensors: a tampered one fails here, before any is loaded."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    bad = [k for k in state if not isinstance(metadata[k], TensorStorageMetadata)]
    if bad:
        raise ValueError(f"load_checkpoint: {path} stores {len(bad)} model / optimizer entries as other than tensors, "
                         f"e.g. {bad[:3]}; save_checkpoint writes them as tensors: the checkpoint was altered")


def load_checkpoint(path, model: nn.Module, optimizer=None, *, process_group=None, strict: bool = True) -> dict:
    """Load a :func:`save_checkpoint` into ``model`` (and ``optimizer``); returns the saved ``extra``.

    Collective under a process group. The model may be placed differently from when it was saved
    (single process / DDP / FSDP2, any world size): ``torch.distributed.checkpoint`` reshards. The
    optimizer must hold the same parameters (matched by name) in the same groups; its state is
    replaced by the saved one, and parameters that had no state when saved (e.g. B right after a
    merge with ``state_on_merge='reset'``) get none.
    """
    from torch.distributed.tensor import DTensor

    meta, metadata = _read_meta(path)
    core = unwrap_parallel(model)
    model_sd = core.state_dict()
    state = {f"model/{k}": v for k, v in model_sd.items()}
    missing = [k for k in state if k not in metadata]
    if missing and strict:
        raise KeyError(f"load_checkpoint: the checkpoint lacks {len(missing)} model entries, e.g. "
                       f"{[k[6:] for k in missing[:5]]}")
    state = {k: v for k, v in state.items() if k in metadata}

    opt_index = meta.get("optimizer")
    params_by_name = dict(core.named_parameters())
    if optimizer is not None:
        if opt_index is None:
            raise ValueError("load_checkpoint: the checkpoint has no optimizer state")
        for name, entry in opt_index["state"].items():
            p = params_by_name[name]
            for key, spec in entry.items():
                if not spec.get("tensor"):
                    continue
                k = f"optim/{name}/{key}"
                md = metadata[k]
                size, dtype = tuple(md.size), md.properties.dtype
                if isinstance(p, DTensor) and size == tuple(p.shape):
                    template = torch.zeros_like(p, dtype=dtype)
                else:
                    local = p.to_local() if isinstance(p, DTensor) else p
                    dev = local.device if len(size) else torch.device("cpu")
                    template = torch.zeros(size, dtype=dtype, device=dev)
                state[k] = template
    _check_tensor_entries(path, state, metadata)
    with warnings.catch_warnings():
        if not (dist.is_available() and dist.is_initialized()):  # a single process: the intended case
            warnings.simplefilter("ignore", UserWarning)
        _dcp_load(state, _safe_dcp()[0](str(path)), process_group=process_group)

    loaded = {k[len("model/"):]: v for k, v in state.items() if k.startswith("model/")}
    core.load_state_dict(loaded, strict=strict)
    if optimizer is not None:
        names = _param_names(core)
        order, opt_state, groups = {}, {}, []
        saved_groups = opt_index["param_groups"]
        if len(saved_groups) != len(optimizer.param_groups):
            raise ValueError(f"load_checkpoint: optimizer has {len(optimizer.param_groups)} param groups, "
                             f"the checkpoint {len(saved_groups)}")
        for gi, (group, saved) in enumerate(zip(optimizer.param_groups, saved_groups)):
            mine = [names[id(p)] for p in group["params"]]
            if mine != saved["params"]:
                raise ValueError(f"load_checkpoint: param group {gi} holds other parameters than when saved")
            ids = []
            for name in mine:
                order[name] = len(order)
                ids.append(order[name])
            restored = {k: _from_json(v) for k, v in saved.items() if k != "params"}
            groups.append({**restored, "params": ids})
        for name, entry in opt_index["state"].items():
            opt_state[order[name]] = {key: (state[f"optim/{name}/{key}"] if spec.get("tensor")
                                             else _from_json(spec["value"])) for key, spec in entry.items()}
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    loop = _outer_loop(core)
    if loop is not None:  # captures armed for the old step count are stale now
        for _, m in _subspace_layers(core):
            m._capture = None
        loop._arm_captures()
    return _from_json(meta.get("extra", {}))
