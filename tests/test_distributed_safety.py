"""No code runs from a distributed checkpoint: ``rso.distributed.load_checkpoint`` (``--resume`` of
``rso.train.distributed``) unpickles only checkpoint metadata, tensors and plain data. A tampered ``.metadata`` or
non-tensor entry is refused (one line naming the file, what it pickles and the opt-in) before anything is built or
loaded; ``RSO_TRUST_CHECKPOINT=1`` loads a legitimate checkpoint that pickles something else."""
import collections
import io
import json
import pathlib
import pickle
import shutil

import pytest
import torch
import torch.distributed as dist

from conftest import tiny_llama
from rso import distributed as rd
from rso.trust import TRUST_ENV, CheckpointRefused

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

SAVED_AT, STEPS = 2, 4


class Touch:
    """Unpickling it creates ``marker``: what a tampered checkpoint could do with any other function."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


class Note(str):
    """A legitimate class that no checkpoint reader allows: loads only with ``RSO_TRUST_CHECKPOINT=1``."""


@pytest.fixture(autouse=True)
def untrusted(monkeypatch):
    monkeypatch.delenv(TRUST_ENV, raising=False)


@pytest.fixture(scope="module")
def group():
    """A one-process gloo group: checkpoints go through the collective (multi-process) path of dcp."""
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield
    if started:
        dist.destroy_process_group()


def fresh():
    import rso
    model = rso.wrap(tiny_llama(num_hidden_layers=1), rank=4, tau=2, seed=3)
    return model, rd.ddp(model), torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def train(dmodel, opt, steps) -> list[float]:
    losses = []
    for step in steps:
        ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(step))
        loss = dmodel(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def saved(group, tmp_path_factory):
    """A real DDP checkpoint after step SAVED_AT (a merge at step 2), and the uninterrupted run's losses."""
    path = tmp_path_factory.mktemp("dcp") / "step_2"
    model, dmodel, opt = fresh()
    losses = train(dmodel, opt, range(1, SAVED_AT + 1))
    rd.save_checkpoint(path, dmodel, opt, extra={"step": SAVED_AT})
    return {"path": path, "losses": losses + train(dmodel, opt, range(SAVED_AT + 1, STEPS + 1))}


@pytest.fixture
def ckpt(saved, tmp_path):
    return pathlib.Path(shutil.copytree(saved["path"], tmp_path / "ckpt"))


def read_metadata(ckpt):
    return pickle.loads((ckpt / ".metadata").read_bytes())  # the test's own file, written by dcp.save


def store_as_bytes(ckpt, fqn, obj):
    """Tamper: entry ``fqn`` becomes ``torch.save(obj)``, appended to its data file (returned), ``.metadata`` edited."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex
    md = read_metadata(ckpt)
    keys = [k for k in md.storage_data if k.fqn == fqn]
    relative = md.storage_data[keys[0]].relative_path
    for key in keys:
        del md.storage_data[key]
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = ckpt / relative
    md.storage_data[MetadataIndex(fqn)] = _StorageInfo(relative, data.stat().st_size, len(buf.getvalue()))
    md.state_dict_metadata[fqn] = BytesStorageMetadata()
    with open(data, "ab") as f:
        f.write(buf.getvalue())
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))
    return data


def load_and_resume(path):
    """Load into a fresh run and train it to STEPS: (extra, losses)."""
    model, dmodel, opt = fresh()
    extra = rd.load_checkpoint(path, dmodel, opt)
    return extra, train(dmodel, opt, range(SAVED_AT + 1, STEPS + 1))


def assert_refused(path, error_type, *named):
    """Loading ``path`` fails with one line that names ``named``; the model is left as it was."""
    model, dmodel, opt = fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error_type) as info:
        rd.load_checkpoint(path, dmodel, opt)
    message = str(info.value)
    assert "\n" not in message and all(n in message for n in named), message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not opt.state


def test_real_distributed_checkpoint_loads_and_resumes(saved):
    extra, losses = load_and_resume(saved["path"])
    assert extra == {"step": SAVED_AT}
    assert losses == saved["losses"][SAVED_AT:]


@pytest.mark.parametrize("where", ["whole file", "inside the metadata"])
def test_tampered_metadata_is_refused_and_runs_nothing(ckpt, tmp_path, where):
    marker = tmp_path / "marker"
    if where == "whole file":  # the reproduction
        (ckpt / ".metadata").write_bytes(pickle.dumps(Touch(marker)))
    else:
        md = read_metadata(ckpt)
        md.planner_data["x"] = Touch(marker)
        (ckpt / ".metadata").write_bytes(pickle.dumps(md))
    assert_refused(ckpt, CheckpointRefused, str(ckpt / ".metadata"), "pathlib.Path.touch", f"{TRUST_ENV}=1")
    assert not marker.exists()


def test_tampered_meta_entry_is_refused_and_runs_nothing(ckpt, tmp_path):
    marker = tmp_path / "marker"
    data = store_as_bytes(ckpt, "rso_meta", Touch(marker))
    assert_refused(ckpt, CheckpointRefused, "'rso_meta'", str(data), "builtins.getattr, pathlib.Path", f"{TRUST_ENV}=1")
    assert not marker.exists()


def test_model_entry_stored_as_object_is_refused_before_anything_loads(ckpt, tmp_path):
    marker = tmp_path / "marker"
    store_as_bytes(ckpt, "model/lm_head.weight", Touch(marker))
    assert_refused(ckpt, ValueError, "model/lm_head.weight", str(ckpt))
    assert not marker.exists()


def test_trust_opt_in_loads_unlisted_metadata(saved, ckpt, monkeypatch):
    md = read_metadata(ckpt)
    md.planner_data = collections.OrderedDict(md.planner_data)
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))
    assert_refused(ckpt, CheckpointRefused, "collections.OrderedDict", f"{TRUST_ENV}=1")
    monkeypatch.setenv(TRUST_ENV, "yes")  # no opt-in
    assert_refused(ckpt, CheckpointRefused, "collections.OrderedDict")
    monkeypatch.setenv(TRUST_ENV, "1")
    extra, losses = load_and_resume(ckpt)
    assert extra == {"step": SAVED_AT} and losses == saved["losses"][SAVED_AT:]


def test_trust_opt_in_loads_unlisted_meta_entry(saved, ckpt, monkeypatch):
    store_as_bytes(ckpt, "rso_meta", Note(json.dumps(rd._read_meta(ckpt)[0])))
    assert_refused(ckpt, CheckpointRefused, "'rso_meta'", f"{__name__}.Note", f"{TRUST_ENV}=1")
    monkeypatch.setenv(TRUST_ENV, "1")
    extra, losses = load_and_resume(ckpt)
    assert extra == {"step": SAVED_AT} and losses == saved["losses"][SAVED_AT:]


def test_sharded_merge_refuses_a_non_finite_B_before_W0_changes(group):
    """FSDP2 layers merge with ``merge_sharded_``: a nan in B (on any rank) raises, every W₀ and B as they were."""
    import rso
    pytest.importorskip("torch.distributed.fsdp", reason="this torch has no FSDP2").fully_shard
    model = rd.fully_shard_model(rso.wrap(tiny_llama(num_hidden_layers=1), rank=4, tau=2, seed=3))
    layers = rso.subspace_layers(model)
    with torch.no_grad():
        for _, layer in layers:
            layer.B.to_local().normal_()
        layers[-1][1].B.to_local()[0, 0] = float("nan")
    before = {n: (m.weight.to_local().clone(), m.B.to_local().clone()) for n, m in layers}
    for name, layer in layers[:-1]:
        layer.merge_()  # finite ones merge
        assert not torch.equal(layer.weight.to_local(), before[name][0])
    with pytest.raises(FloatingPointError, match=r"^rso: SubspaceLinear\(.*\) cannot merge: B holds inf/nan on some "
                                                 r"rank, W₀ left unchanged; lower the learning rate"):
        layers[-1][1].merge_()
    name, layer = layers[-1]
    assert torch.equal(layer.weight.to_local(), before[name][0])
    assert torch.allclose(layer.B.to_local(), before[name][1], rtol=0, atol=0, equal_nan=True)
