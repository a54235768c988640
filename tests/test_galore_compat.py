"""rso.optim.GaLoreAdamW against the installed galore-torch 1.0: same groups and arguments, same numbers.

GaLoreAdamW defaults to ``compat="galore-torch"`` and runs the same tensor operations in the same
order as galore-torch's AdamW and GaLoreProjector, so parameters and moments agree bit for bit in
float32 (also float64 and bfloat16, where galore-torch takes the SVD in float32). Runs cross ≥ 3
subspace switches under galore-torch's only policy, ``keep``, where the sign and orientation of the
SVD factors carry into the reused moments. ``compat="torch"`` is the torch.optim.AdamW formula.
galore-torch has no SGD, so GaLoreSGD has nothing to match (its ``compat`` takes only "torch").
"""
import io

import pytest
import torch
from torch import nn

from conftest import lm_batch, tiny_llama
from rso.optim import GaLoreAdamW, GaLoreSGD, GoLoreAdamW, SubspaceAdamW

galore_torch = pytest.importorskip("galore_torch")

PROJ_TYPES = ["std", "reverse_std", "left", "right"]


def peer(groups, **kw):
    return galore_torch.GaLoreAdamW(groups, no_deprecation_warning=True, **kw)


def llama_groups(model, proj_type, scale, gap=3, rank=8):
    """galore-torch's README grouping: the attention and MLP matrices projected, the rest plain."""
    mats = [p for n, p in model.named_parameters() if p.dim() == 2 and (".self_attn." in n or ".mlp." in n)]
    ids = {id(p) for p in mats}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": mats, "rank": rank, "update_proj_gap": gap, "scale": scale, "proj_type": proj_type},
            {"params": rest}]


def train_llama(opt_cls, proj_type, steps, dtype=torch.float32, scale=0.25, gap=3, **kw):
    model = tiny_llama(dtype)
    opt = opt_cls(llama_groups(model, proj_type, scale, gap), **kw)
    for t in range(steps):
        opt.zero_grad()
        model(**lm_batch(seed=t)).loss.backward()   # a different batch every step
        opt.step()
    return model, opt


def max_diff(a, b):
    return max((x.detach().double() - y.detach().double()).abs().max().item() for x, y in zip(a, b))


# ---------------------------------------------------------------------------- tiny LLaMA
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
@pytest.mark.parametrize("options", [
    dict(lr=1e-2, weight_decay=0.1),                                            # scale 0.25 (≠ 1)
    dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-5, weight_decay=0.05, correct_bias=False),
], ids=["wd", "no-bias-correction"])
def test_tiny_llama_matches_galore_torch_bit_for_bit(proj_type, options):
    steps = 13                       # gap 3: new P at steps 0, 3, 6, 9, 12 → 4 switches
    ours, opt = train_llama(GaLoreAdamW, proj_type, steps, **options)
    ref, ref_opt = train_llama(peer, proj_type, steps, **options)
    diff = max_diff(ours.parameters(), ref.parameters())
    assert diff <= 1e-5
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name
        st, ref_st = opt.state[p], ref_opt.state[q]
        assert st["step"] == ref_st["step"] == steps
        assert torch.equal(st["exp_avg"], ref_st["exp_avg"]), name
        assert torch.equal(st["exp_avg_sq"], ref_st["exp_avg_sq"]), name
        if "projector" in ref_st:
            assert st["cycle"] == 4
            factor = ref_st["projector"].ortho_matrix           # B (r × n) or A (m × r)
            assert torch.equal(st["proj"], factor if factor.shape == st["proj"].shape else factor.T), name
    # Not a tautology: training moved the weights, and torch.optim.AdamW's formula gives other numbers.
    assert max_diff(ours.parameters(), tiny_llama().parameters()) > 1e-3
    if options.get("correct_bias", True):
        torch_style, _ = train_llama(GaLoreAdamW, proj_type, steps, compat="torch", **options)
        assert max_diff(torch_style.parameters(), ref.parameters()) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_tiny_llama_other_dtypes_match_too(dtype):
    """galore-torch takes the SVD of a non-float32 gradient in float32 and casts the factor back; so do we."""
    ours, _ = train_llama(GaLoreAdamW, "std", 10, dtype=dtype, lr=1e-2, weight_decay=0.1)
    ref, _ = train_llama(peer, "std", 10, dtype=dtype, lr=1e-2, weight_decay=0.1)
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(p, q)


# ---------------------------------------------------------------------------- small matrices
def least_squares_step(X, t):
    """Gradient of ½‖A X − Y‖² for a fresh (A, Y) at step t (stochastic: the SVD subspace moves)."""
    g = torch.Generator().manual_seed(1000 + t)
    A = torch.randn(12, X.shape[0], generator=g, dtype=X.dtype)
    Y = torch.randn(12, X.shape[1], generator=g, dtype=X.dtype)
    X.grad = (A.T @ (A @ X.detach() - Y)).contiguous()


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
@pytest.mark.parametrize("shape", [(7, 4), (4, 7), (6, 6)])
def test_small_matrices_every_side_and_shape(proj_type, shape):
    g = torch.Generator().manual_seed(sum(shape))
    X1 = nn.Parameter(torch.randn(*shape, generator=g))
    X2 = nn.Parameter(X1.detach().clone())
    group = {"rank": 2, "update_proj_gap": 2, "scale": 0.5, "proj_type": proj_type}
    ours = GaLoreAdamW([dict(group, params=[X1])], lr=0.05, weight_decay=0.2)
    ref = peer([dict(group, params=[X2])], lr=0.05, weight_decay=0.2)
    for t in range(9):                                   # new P at 0, 2, 4, 6, 8: 4 switches
        least_squares_step(X1, t), least_squares_step(X2, t)
        ours.step(), ref.step()
        assert torch.equal(X1, X2), t
    assert ours.state[X1]["cycle"] == 4
    assert (X1.detach() - torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))).abs().max() > 1e-2


# ---------------------------------------------------------------------------- the switch, defaults, resume
def test_compat_torch_is_subspace_adamw_and_the_defaults_follow_compat():
    X = nn.Parameter(torch.randn(6, 4))
    assert GaLoreAdamW([X]).param_groups[0]["compat"] == "galore-torch"
    assert GaLoreAdamW([X]).param_groups[0]["eps"] == 1e-6                     # galore-torch's default
    assert GaLoreAdamW([X], compat="torch").param_groups[0]["eps"] == 1e-8     # torch.optim.AdamW's
    for cls in (SubspaceAdamW, GoLoreAdamW, GaLoreSGD):
        assert cls([X]).param_groups[0]["compat"] == "torch"
    assert SubspaceAdamW([X]).param_groups[0]["eps"] == 1e-8
    # a group may set its own compat; eps then follows it unless given
    opt = SubspaceAdamW([{"params": [X], "compat": "galore-torch"}, {"params": [nn.Parameter(X.clone())]}])
    assert [g["eps"] for g in opt.param_groups] == [1e-6, 1e-8]
    # galore-torch's positional signature (lr, betas, eps, weight_decay, correct_bias, no_deprecation_warning)
    opt = GaLoreAdamW([X], 1e-2, (0.8, 0.9), 1e-7, 0.1, False, True)
    assert {k: opt.param_groups[0][k] for k in ("lr", "betas", "eps", "weight_decay", "correct_bias")} == \
        {"lr": 1e-2, "betas": (0.8, 0.9), "eps": 1e-7, "weight_decay": 0.1, "correct_bias": False}

    params = [nn.Parameter(torch.randn(7, 4, generator=torch.Generator().manual_seed(3))) for _ in range(2)]
    opts = [GaLoreAdamW([{"params": [params[0]], "rank": 2, "update_proj_gap": 2}], lr=0.05, weight_decay=0.1,
                        compat="torch"),
            SubspaceAdamW([{"params": [params[1]], "rank": 2, "update_proj_gap": 2}], lr=0.05, weight_decay=0.1)]
    for t in range(5):
        for p, o in zip(params, opts):
            least_squares_step(p, t)
            o.step()
    assert torch.equal(params[0], params[1])


def test_bad_compat_names_the_allowed_values():
    X = nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"compat must be one of \['torch', 'galore-torch'\]"):
        GaLoreAdamW([X], compat="transformers")
    with pytest.raises(ValueError, match=r"compat must be one of \['torch'\] for GaLoreSGD"):
        GaLoreSGD([X], compat="galore-torch")
    with pytest.raises(ValueError, match="correct_bias must be a bool"):
        GaLoreAdamW([X], correct_bias=None)


def test_galore_torch_mode_resumes_bit_for_bit_and_old_checkpoints_keep_their_formula():
    def make(X, **kw):
        return GaLoreAdamW([{"params": [X], "rank": 2, "update_proj_gap": 3, "scale": 0.25}], lr=0.05,
                           weight_decay=0.1, **kw)

    X = nn.Parameter(torch.randn(5, 8, generator=torch.Generator().manual_seed(4)))
    opt = make(X)
    for t in range(4):
        least_squares_step(X, t)
        opt.step()
    buf = io.BytesIO()
    torch.save({"X": X.detach().clone(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    X2 = nn.Parameter(ckpt["X"].clone())
    opt2 = make(X2)
    opt2.load_state_dict(ckpt["opt"])
    for t in range(4, 11):                               # two more switches
        for p, o in ((X, opt), (X2, opt2)):
            least_squares_step(p, t)
            o.step()
    assert torch.equal(X, X2)

    # A state dict saved before `compat` and `correct_bias` existed was made with the torch formula:
    # it resumes with that formula, not with the new default.
    old = ckpt["opt"]
    for g in old["param_groups"]:
        del g["compat"], g["correct_bias"]
    opt3 = make(nn.Parameter(ckpt["X"].clone()))
    opt3.load_state_dict(old)
    assert opt3.param_groups[0]["compat"] == "torch" and opt3.param_groups[0]["correct_bias"] is True


def test_a_failed_svd_falls_back_to_a_stiefel_sample_with_a_warning():
    """Where galore-torch would write NaNs into the weights, the cycle gets a random P instead."""
    X = nn.Parameter(torch.randn(6, 4))
    opt = GaLoreAdamW([{"params": [X], "rank": 2}], lr=0.01)
    X.grad = torch.full((6, 4), float("nan"))
    with pytest.warns(RuntimeWarning, match="SVD projection failed"):
        opt.step()
    P = opt.state[X]["proj"]
    assert torch.isfinite(P).all()
    torch.testing.assert_close(P @ P.T, torch.eye(2))
