"""RSO under torch.distributed on CPU (gloo): DDP, FSDP2, distributed checkpoints.

One spawn of 2 worker processes runs every distributed scenario (process start-up dominates the
cost on a small machine); the test process computes the single-process references and checks.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import warnings

import pytest
import torch

pytest.importorskip("transformers")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402

WORLD = 2
STEPS = 7        # merges after steps 3 and 6: two resamples
TAU = 3
RANK = 8
CKPT_STEP = 3    # right after a merge: B has no optimizer state then (state_on_merge='reset')
CKPT_STEP_FSDP = 4
GLOBAL_BATCH, SEQ, VOCAB = 4, 16, 96
LR = 1e-2
ATOL, RTOL = 2e-5, 1e-4
MP_STEPS = 4
#: Worker processes run torch on one thread each (two ranks on a 2-core machine); the test process computes
#: its references on as many, so that the same code gives the same bits (a CPU QR or matmul may block its
#: work, and so round, differently on another thread count).
WORKER_THREADS = 1


def fsdp2_available():
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
        return True, ""
    except ImportError as err:
        return False, f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard ({err})"


# ---------------------------------------------------------------------------- shared pieces
def build(kind="rso", rank=RANK, projection="stiefel"):
    from transformers import LlamaConfig, LlamaForCausalLM
    import rso
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=64,
                         tie_word_embeddings=False, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if kind == "rso":
        rso.wrap(model, rank=rank, tau=TAU, projection=projection, seed=11)
    return model


def batch(step, rank=0, world=1):
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    return ids.chunk(world)[rank] if world > 1 else ids


def make_opt(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)


def projections(model):
    import rso
    return {n: m.P.detach().float().clone() for n, m in rso.subspace_layers(model)}


def full_state(model):
    """Plain CPU tensors of the model's state (DTensors gathered)."""
    from torch.distributed.tensor import DTensor
    out = {}
    for k, v in model.state_dict().items():
        out[k] = (v.full_tensor() if isinstance(v, DTensor) else v).detach().float().clone()
    return out


@contextlib.contextmanager
def threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def train(model, opt, steps, rank=0, world=1, on_step=None):
    """Train ``steps`` (1-based step numbers); returns the global mean losses."""
    import torch.distributed as dist
    losses = []
    for step in steps:
        ids = batch(step, rank, world)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.detach().clone()
        if world > 1:
            dist.all_reduce(value)
            value /= world
        losses.append(value.item())
        if on_step is not None:
            on_step(step)
    return losses


def _entry_args(out_dir, name, *more):
    from rso.train.distributed import build_parser
    return build_parser().parse_args([
        "--config", os.path.join(out_dir, "cfg.json"), "--method", "rso", "--parallel", "fsdp",
        "--dataset", "synthetic", "--synthetic-tokens", "20000", "--batch-size", "2", "--grad-accum", "1",
        "--seq-len", "16", "--max-steps", "4", "--rank", "4", "--tau", "2", "--warmup", "0", "--log-every", "1",
        "--eval-every", "4", "--save-every", "4", "--eval-batches", "1", "--output-dir", os.path.join(out_dir, name),
        *more])


#: rso.train.distributed sessions of one run across world sizes: steps 1-2 on 1 process, 3-4 on WORLD, 5-6 on 1.
WORLD_RUN = ("--max-steps", "6", "--save-every", "6", "--stop-after", "2")  # a checkpoint where it stops


def _world_args(out_dir, *more, resume=True):
    args = _entry_args(out_dir, "world", *WORLD_RUN, *(("--resume",) if resume else ()), *more)
    if resume:
        args.batch_size = args.grad_accum = None  # resume picks them to keep the global batch
    return args


@contextlib.contextmanager
def one_process_group():
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- worker
def _worker(rank, out_dir, run_fsdp):
    torch.set_num_threads(WORKER_THREADS)
    warnings.filterwarnings("ignore")
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    import rso
    from rso import distributed as rd
    # rendezvous through a file in the test's own folder: no TCP port to pick (a free port found by
    # bind-and-close can be taken by another process before the workers bind it)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            init_method="file://" + os.path.join(out_dir, "rendezvous"))
    res = {}
    try:
        # DDP + RSO: losses, P after every step (sync and value), bytes, checkpoint at CKPT_STEP
        model = build("rso")
        counter = rd.CommCounter()
        dmodel = rd.ddp(model, counter=counter)
        opt = make_opt(model)
        synced, p_hist = [], {}

        def on_step(step):
            synced.append(rd.check_projections_synchronized(model))
            p_hist[step] = projections(model)
            if step == CKPT_STEP:
                rd.save_checkpoint(os.path.join(out_dir, "ckpt_ddp"), dmodel, opt, extra={"step": step})

        res["ddp_losses"] = train(dmodel, opt, range(1, STEPS + 1), rank, WORLD, on_step)
        res["ddp_synced"] = synced
        res["ddp_P"] = p_hist
        res["ddp_state"] = full_state(model)
        res["ddp_cycle"] = rso.state(model)["cycle"]
        res["rso_bytes"] = list(counter.history)
        res["rso_expected"] = rd.gradient_bytes(model)
        res["buffer_bytes"] = rd.buffer_bytes(model)

        # resume on the same world size from the step-CKPT_STEP checkpoint
        model2 = build("rso")
        dmodel2 = rd.ddp(model2)
        opt2 = make_opt(model2)
        extra = rd.load_checkpoint(os.path.join(out_dir, "ckpt_ddp"), dmodel2, opt2)
        res["resume_extra"] = extra
        res["resume_state_at_load"] = rso.state(model2)
        res["resume_losses"] = train(dmodel2, opt2, range(CKPT_STEP + 1, STEPS + 1), rank, WORLD)
        res["resume_state"] = full_state(model2)

        # gradient-based projections: the captured full gradients are averaged before the SVD
        smodel = build("rso", projection="svd")
        dsmodel = rd.ddp(smodel)
        sopt = make_opt(smodel)
        ssynced = []
        res["svd_losses"] = train(dsmodel, sopt, range(1, STEPS + 1), rank, WORLD,
                                  lambda s: ssynced.append(rd.check_projections_synchronized(smodel)))
        res["svd_synced"] = ssynced
        res["svd_P"] = projections(smodel)

        # bytes per step: full AdamW and galore-torch on the unwrapped model
        try:
            import galore_torch  # noqa: F401
            peers = ("adamw", "galore")
        except ImportError:
            peers = ("adamw",)
        for name in peers:
            full = build("full")
            c = rd.CommCounter()
            dfull = rd.ddp(full, counter=c)
            if name == "adamw":
                o = make_opt(full)
            else:
                from galore_torch import GaLoreAdamW
                mats = [p for n, p in full.named_parameters() if p.dim() == 2 and ".layers." in n]
                rest = [p for n, p in full.named_parameters() if not (p.dim() == 2 and ".layers." in n)]
                o = GaLoreAdamW([{"params": rest}, {"params": mats, "rank": RANK, "update_proj_gap": TAU,
                                                   "scale": 0.25, "proj_type": "std"}], lr=LR)
            train(dfull, o, range(1, 3), rank, WORLD)
            res[f"{name}_bytes"] = list(c.history)

        # FSDP2 (fp32): same trajectory as one process, P in sync, checkpoint at CKPT_STEP_FSDP
        if run_fsdp:
            fmodel = rd.fully_shard_model(build("rso"))
            fcount = rd.FSDPCommCounter().attach(fmodel)
            fopt = make_opt(fmodel)
            fsynced, fbytes = [], []

            def on_fstep(step):
                fbytes.append(fcount.take())
                fsynced.append(rd.check_projections_synchronized(fmodel))
                if step == CKPT_STEP_FSDP:
                    rd.save_checkpoint(os.path.join(out_dir, "ckpt_fsdp"), fmodel, fopt)

            res["fsdp_losses"] = train(fmodel, fopt, range(1, STEPS + 1), rank, WORLD, on_fstep)
            res["fsdp_synced"] = fsynced
            res["fsdp_bytes"] = fbytes
            res["fsdp_expected"] = rd.gradient_bytes(fmodel)
            full = rd.fully_shard_model(build("full"))
            c = rd.FSDPCommCounter().attach(full)
            train(full, make_opt(full), range(1, 2), rank, WORLD)
            res["fsdp_full_bytes"] = c.take()
            res["fsdp_state"] = full_state(fmodel)
            res["fsdp_local_rows"] = {n: (tuple(m.weight.to_local().shape), tuple(m.B.to_local().shape))
                                      for n, m in rso.subspace_layers(fmodel)}
            # FSDP2 + SVD: B's gradient is a DTensor shard, so the first cycle keeps the wrap-time P
            # (start_first_cycle leaves it); the merges after steps 3 and 6 resample, in sync on the ranks
            svd_model = build("rso", projection="svd")
            res["fsdp_svd_P_wrap"] = projections(svd_model)
            sfmodel = rd.fully_shard_model(svd_model)
            sf_P, sf_synced = {}, []

            def on_sfstep(step):
                sf_synced.append(rd.check_projections_synchronized(sfmodel))
                sf_P[step] = {n: (P.full_tensor() if isinstance(P, DTensor) else P)
                              for n, P in projections(sfmodel).items()}

            res["fsdp_svd_losses"] = train(sfmodel, make_opt(sfmodel), range(1, STEPS + 1), rank, WORLD, on_sfstep)
            res["fsdp_svd_P"], res["fsdp_svd_synced"] = sf_P, sf_synced
            # bf16 compute, fp32 reduce
            mmodel = rd.fully_shard_model(build("rso"), mp_policy=rd.mixed_precision_policy())
            mopt = make_opt(mmodel)
            res["mp_losses"] = train(mmodel, mopt, range(1, MP_STEPS + 1), rank, WORLD)
            res["mp_synced"] = rd.check_projections_synchronized(mmodel)
            res["mp_state"] = full_state(mmodel)
            # the torchrun entry point's loop, on this process group: FSDP2, 4 steps in one go, and
            # 2 steps then a checkpoint (--stop-after) that the test process resumes alone
            from rso.train.distributed import run
            res["entry"] = run(_entry_args(out_dir, "entry_full"))
            res["entry_part"] = run(_entry_args(out_dir, "entry", "--stop-after", "2"))
        # the middle session of a run saved on one process (the test process), continued here on WORLD
        from rso.train.distributed import run
        res["world_mid"] = run(_world_args(out_dir, "--parallel", "fsdp" if run_fsdp else "ddp"))
        if rank == 0:
            torch.save(res, os.path.join(out_dir, "rank0.pt"))
        else:
            torch.save({k: res[k] for k in ("ddp_P", "ddp_state", "ddp_losses", "svd_P")}, os.path.join(out_dir, "rank1.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    run_fsdp, _ = fsdp2_available()
    (out / "cfg.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
        "num_hidden_layers": 1, "vocab_size": 64, "max_position_embeddings": 64, "tie_word_embeddings": False,
        "training": {"lr": 1e-3}}))
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from rso.train.distributed import run
    world = {}
    with threads(WORKER_THREADS), one_process_group():  # one process: the whole run, and its first session
        world["full"] = run(_entry_args(str(out), "world_full", "--max-steps", "6", "--parallel", "ddp"))
        world["first"] = run(_world_args(str(out), "--parallel", "ddp", resume=False))
    mp.start_processes(_worker, args=(str(out), run_fsdp), nprocs=WORLD, start_method="spawn")
    r0 = torch.load(out / "rank0.pt", weights_only=False)
    r1 = torch.load(out / "rank1.pt", weights_only=False)
    with threads(WORKER_THREADS), one_process_group():  # and back on one process
        world["last"] = run(_world_args(str(out), "--parallel", "ddp"))
    world["mid"] = r0["world_mid"]

    # single-process reference on the same global batches, on the workers' thread count
    ref = {}
    with threads(WORKER_THREADS):
        model = build("rso")
        opt = make_opt(model)
        p_hist = {}
        ref["losses"] = train(model, opt, range(1, STEPS + 1),
                              on_step=lambda s: p_hist.__setitem__(s, projections(model)))
        ref["P"], ref["state"] = p_hist, full_state(model)
        model = build("rso", projection="svd")
        opt = make_opt(model)
        ref["svd_losses"] = train(model, opt, range(1, STEPS + 1))
        ref["svd_P"] = projections(model)
    return {"r0": r0, "r1": r1, "ref": ref, "dir": out, "fsdp": run_fsdp, "world": world}


def mixed_precision_reference(steps, world=WORLD):
    """(losses, state) of what FSDP2 with ``rso.distributed.mixed_precision_policy()`` computes, done in one
    process without FSDP: fp32 master parameters; each step a bf16 copy of them (parameters only, as FSDP2
    casts: buffers such as the rotary ``inv_freq`` stay fp32; P in bf16, as ``fully_shard_model`` stores it)
    runs forward and backward on each rank's rows of the batch; the bf16 gradients are cast to fp32, averaged
    over the ranks and applied by AdamW to the master, whose step hooks merge and resample as usual."""
    import rso
    master = build("rso")
    for _, layer in rso.subspace_layers(master):
        layer.P.data = layer.P.data.to(torch.bfloat16)
    low = copy.deepcopy(master)
    for p in low.parameters():
        p.data = p.data.to(torch.bfloat16)
    low_params, low_buffers = dict(low.named_parameters()), dict(low.named_buffers())
    opt = make_opt(master)
    losses = []
    for step in steps:
        with torch.no_grad():
            for n, p in master.named_parameters():
                low_params[n].copy_(p)
            for n, b in master.named_buffers():
                low_buffers[n].copy_(b)
            for _, layer in rso.subspace_layers(low):  # a copy set to the master's W₀, B and P: a known change
                layer.note_update_()
        grads, rank_losses = {}, []
        for rank in range(world):
            ids = batch(step, rank, world)
            loss = low(input_ids=ids, labels=ids).loss
            loss.backward()
            rank_losses.append(loss.detach().float())
            for n, p in low.named_parameters():
                if p.grad is not None:
                    grads[n] = grads[n] + p.grad.float() if n in grads else p.grad.float()
                    p.grad = None
        for n, p in master.named_parameters():
            if n in grads:
                p.grad = grads[n] / world
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append((sum(rank_losses) / world).item())
    return losses, full_state(master)


def _assert_states_close(a, b, atol=ATOL, rtol=RTOL):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


# ---------------------------------------------------------------------------- tests
def test_ddp_equals_single_process(runs):
    r0, ref = runs["r0"], runs["ref"]
    assert r0["ddp_cycle"] == STEPS // TAU >= 2
    torch.testing.assert_close(torch.tensor(r0["ddp_losses"]), torch.tensor(ref["losses"]), atol=ATOL, rtol=RTOL)
    _assert_states_close(r0["ddp_state"], ref["state"])
    _assert_states_close(runs["r1"]["ddp_state"], ref["state"])


def test_projections_identical_on_ranks_after_each_resample(runs):
    r0, r1, ref = runs["r0"], runs["r1"], runs["ref"]
    assert all(r0["ddp_synced"]) and len(r0["ddp_synced"]) == STEPS
    for step in range(1, STEPS + 1):
        for name, P in r0["ddp_P"][step].items():
            assert torch.equal(P, r1["ddp_P"][step][name])
            assert torch.equal(P, ref["P"][step][name])  # the very P a single process samples (same threads)
    # and they did change at each merge
    name = next(iter(ref["P"][1]))
    assert not torch.equal(r0["ddp_P"][TAU - 1][name], r0["ddp_P"][TAU][name])
    assert not torch.equal(r0["ddp_P"][2 * TAU - 1][name], r0["ddp_P"][2 * TAU][name])


def test_communication_bytes(runs):
    r0 = runs["r0"]
    exp = r0["rso_expected"]
    rso_bytes, adamw_bytes = r0["rso_bytes"], r0["adamw_bytes"]
    galore_bytes = r0.get("galore_bytes", adamw_bytes)  # galore-torch not installed: nothing to compare
    assert len(rso_bytes) == STEPS and len(set(rso_bytes)) == 1
    # exact: the hook saw B's gradients plus the unwrapped parameters' and nothing else
    assert rso_bytes[0] == exp["total"]
    # full training reduces every weight; galore-torch projects after the all-reduce: same bytes
    assert adamw_bytes[0] == exp["full"] == galore_bytes[0]
    assert rso_bytes[0] <= (exp["max_rank_over_in"] + exp["nonwrapped_share"]) * adamw_bytes[0]
    print(f"\nbytes all-reduced per step: RSO {rso_bytes[0]:,} ({exp['B']:,} B + {exp['other']:,} other), "
          f"AdamW {adamw_bytes[0]:,}, galore-torch {galore_bytes[0]:,}; ratio {rso_bytes[0] / adamw_bytes[0]:.4f} "
          f"<= bound {exp['max_rank_over_in'] + exp['nonwrapped_share']:.4f}; "
          f"broadcast_buffers=True would add {r0['buffer_bytes']:,} B per forward")


def test_svd_projections_synchronized(runs):
    """svd: each rank captures its local full gradient; averaged before the SVD, P agrees everywhere."""
    r0, r1, ref = runs["r0"], runs["r1"], runs["ref"]
    assert all(r0["svd_synced"]) and len(r0["svd_synced"]) == STEPS
    for name, P in r0["svd_P"].items():
        assert torch.equal(P, r1["svd_P"][name])
        # the SVD of the global gradient, as one process computes it (up to float summation order)
        overlap = torch.linalg.svdvals(P @ ref["svd_P"][name].T)
        assert overlap.min() > 0.999, name
    torch.testing.assert_close(torch.tensor(r0["svd_losses"]), torch.tensor(ref["svd_losses"]), atol=1e-4, rtol=1e-4)


def _checkpoint_keys(path):
    import torch.distributed.checkpoint as dcp
    return set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def test_checkpoint_contents(runs):
    keys = _checkpoint_keys(runs["dir"] / "ckpt_ddp")
    for suffix in ("q_proj.P", "q_proj.step", "q_proj.cycle", "q_proj.seed", "q_proj.weight", "q_proj.B"):
        assert f"model/model.layers.0.self_attn.{suffix}" in keys
    # saved at a merge step: B's AdamW state was reset, the embedding's was not
    assert not any(k.startswith("optim/") and ".B/" in k for k in keys)
    assert "optim/model.embed_tokens.weight/exp_avg" in keys
    if runs["fsdp"]:
        assert "optim/model.layers.0.self_attn.q_proj.B/exp_avg" in _checkpoint_keys(runs["dir"] / "ckpt_fsdp")


def test_entry_point_fsdp_resume_on_one_rank(runs):
    """rso.train.distributed: 2-rank FSDP2 run stopped after 2 steps, resumed by 1 rank (DDP): same losses."""
    if not runs["fsdp"]:
        pytest.skip(fsdp2_available()[1])
    import torch.distributed as dist
    from rso.train.distributed import run
    full, part = runs["r0"]["entry"], runs["r0"]["entry_part"]
    assert full["steps"] == 4 and full["world_size"] == WORLD and full["parallel"] == "fsdp"
    assert part["steps"] == 2 and (runs["dir"] / "entry" / "checkpoint.pt").exists()
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        args = _entry_args(str(runs["dir"]), "entry", "--resume", "--parallel", "ddp")
        args.batch_size = args.grad_accum = None  # resume picks them to keep the global batch
        resumed = run(args)
    finally:
        dist.destroy_process_group()
    assert resumed["steps"] == 4 and resumed["world_size"] == 1
    torch.testing.assert_close(torch.tensor(part["train_losses"] + resumed["train_losses"]),
                               torch.tensor(full["train_losses"]), atol=1e-5, rtol=1e-5)


def test_entry_point_run_moves_between_one_process_and_two(runs):
    """rso.train.distributed, one checkpoint format: steps 1-2 on one process, 3-4 resumed on 2 ranks (FSDP2, or
    DDP without it), 5-6 resumed on one process again give the losses of the run done in one go on one process.
    Equal up to float rounding, not bit for bit: 2 ranks average their rows' mean losses and gradients
    (all-reduce), one process takes the mean over all rows (another summation order)."""
    w = runs["world"]
    assert (w["first"]["steps"], w["mid"]["steps"], w["last"]["steps"]) == (2, 4, 6)
    assert (w["first"]["world_size"], w["mid"]["world_size"], w["last"]["world_size"]) == (1, WORLD, 1)
    assert w["full"]["steps"] == 6 and len(w["mid"]["train_losses"]) == 2
    torch.testing.assert_close(torch.tensor(w["first"]["train_losses"] + w["mid"]["train_losses"]
                                            + w["last"]["train_losses"]),
                               torch.tensor(w["full"]["train_losses"]), atol=ATOL, rtol=RTOL)


def test_checkpoint_resume_same_world_size(runs):
    r0 = runs["r0"]
    assert r0["resume_extra"] == {"step": CKPT_STEP}
    assert r0["resume_state_at_load"]["step"] == CKPT_STEP and r0["resume_state_at_load"]["cycle"] == 1
    torch.testing.assert_close(torch.tensor(r0["resume_losses"]), torch.tensor(r0["ddp_losses"][CKPT_STEP:]),
                               atol=1e-6, rtol=1e-6)
    _assert_states_close(r0["resume_state"], r0["ddp_state"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("which,step", [("ckpt_ddp", CKPT_STEP), ("ckpt_fsdp", CKPT_STEP_FSDP)])
def test_checkpoint_resume_on_one_process(runs, which, step):
    """Saved by 2 ranks (DDP replicated / FSDP2 sharded), resumed by a single process."""
    if which == "ckpt_fsdp" and not runs["fsdp"]:
        pytest.skip(fsdp2_available()[1])
    from rso import distributed as rd
    import rso
    model = build("rso")
    opt = make_opt(model)
    rd.load_checkpoint(runs["dir"] / which, model, opt)
    assert rso.state(model)["step"] == step
    losses = train(model, opt, range(step + 1, STEPS + 1))
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(runs["ref"]["losses"][step:]), atol=ATOL, rtol=RTOL)
    _assert_states_close(full_state(model), runs["ref"]["state"])


def test_fsdp2_equals_single_process(runs):
    if not runs["fsdp"]:
        pytest.skip(fsdp2_available()[1])
    r0, ref = runs["r0"], runs["ref"]
    assert all(r0["fsdp_synced"]) and len(r0["fsdp_synced"]) == STEPS
    torch.testing.assert_close(torch.tensor(r0["fsdp_losses"]), torch.tensor(ref["losses"]), atol=ATOL, rtol=RTOL)
    _assert_states_close(r0["fsdp_state"], ref["state"])
    # W₀ and B really were sharded by rows (hidden 32 / 2 ranks = 16 rows each for q_proj)
    rows = r0["fsdp_local_rows"]["model.layers.0.self_attn.q_proj"]
    assert rows == ((16, 32), (16, RANK))


def test_fsdp2_with_svd_keeps_the_random_first_cycle_then_resamples_in_sync(runs):
    """Under FSDP2 the first cycle stays the wrap-time draw (B's sharded gradient cannot be re-projected);
    the merges at steps 3 and 6 draw new P from the captured gradients, identical on both ranks."""
    if not runs["fsdp"]:
        pytest.skip(fsdp2_available()[1])
    r0 = runs["r0"]
    wrap, P = r0["fsdp_svd_P_wrap"], r0["fsdp_svd_P"]
    assert all(r0["fsdp_svd_synced"]) and len(r0["fsdp_svd_synced"]) == STEPS
    for name, P0 in wrap.items():
        for step in (1, 2):
            assert torch.equal(P[step][name], P0), (name, step)  # first cycle: the wrap-time Stiefel draw
        assert not torch.equal(P[TAU][name], P0), name  # resampled at the first merge
        assert torch.equal(P[TAU + 1][name], P[TAU][name])
        assert not torch.equal(P[2 * TAU][name], P[TAU][name]), name
        # orthonormal rows, as the SVD sampler returns them
        torch.testing.assert_close(P[TAU][name] @ P[TAU][name].T, torch.eye(RANK), atol=1e-5, rtol=0)
    losses = r0["fsdp_svd_losses"]
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]


def test_fsdp2_communication_bytes(runs):
    if not runs["fsdp"]:
        pytest.skip(fsdp2_available()[1])
    r0 = runs["r0"]
    exp, rso_b, full_b = r0["fsdp_expected"], r0["fsdp_bytes"], r0["fsdp_full_bytes"]
    # gradients: reduce-scatter carries exactly what DDP all-reduces (no padding at these sizes)
    assert all(b["reduce_scatter"] == exp["total"] for b in rso_b)
    assert full_b["reduce_scatter"] == exp["full"]
    # parameters: W₀ is gathered like any weight, plus the small B
    assert rso_b[0]["all_gather"] > full_b["all_gather"]
    print(f"\nFSDP2 bytes per step (unsharded sizes): RSO all-gather {rso_b[0]['all_gather']:,} reduce-scatter "
          f"{rso_b[0]['reduce_scatter']:,}; AdamW all-gather {full_b['all_gather']:,} reduce-scatter "
          f"{full_b['reduce_scatter']:,}")


def test_fsdp2_mixed_precision(runs):
    """FSDP2 with bf16 compute and fp32 reduction: losses and the state after MP_STEPS steps (a merge and
    resample at step TAU among them) are those of the same arithmetic done in one process
    (:func:`mixed_precision_reference`)."""
    if not runs["fsdp"]:
        pytest.skip(fsdp2_available()[1])
    r0, ref = runs["r0"], runs["ref"]
    assert r0["mp_synced"]
    assert MP_STEPS > TAU
    with threads(WORKER_THREADS):
        losses, state = mixed_precision_reference(range(1, MP_STEPS + 1))
    eps32, eps_bf16 = torch.finfo(torch.float32).eps, torch.finfo(torch.bfloat16).eps
    mp_losses = torch.tensor(r0["mp_losses"])
    # the same bf16 kernels on the same rows and threads: the losses (fp32, from bf16 logits) agree to a few
    # fp32 ulps (measured: to the bit)
    torch.testing.assert_close(mp_losses, torch.tensor(losses), rtol=4 * eps32, atol=0)
    # parameters: room for one bf16 rounding of a gradient (e.g. another reduction order), which moves an Adam
    # update lr·m/√v by about lr·eps_bf16, per step (measured: equal to the bit; a bf16 reduction instead of
    # fp32 moves them by 1e-2, fp32 compute by 3.6e-2)
    _assert_states_close(r0["mp_state"], state, atol=MP_STEPS * LR * eps_bf16, rtol=0)
    # and bf16 compute really was in effect: not the fp32 run's losses
    assert not torch.equal(mp_losses, torch.tensor(ref["losses"][:MP_STEPS]))
