"""The GoLore counter-example (paper defaults: n=10, r=4, σ=1, τ=100, seed 42): GaLore stalls, the rest converge."""
import json

import pytest
import torch

from rso.train.counterexample import (PAPER, METHODS, Settings, main, make_problem, paper_problem, plateau_iteration,
                                  run_all, run_method, summary_table)


@pytest.fixture(scope="module")
def run():
    return run_all()          # the defaults: MSGD 2000 iterations, AdamW 1000


def curve(run, kind, method):
    return run["results"][kind][method]["grad_norm"]


def test_problem_is_what_the_paper_says():
    p = make_problem()
    n, k = 10, 6
    assert p.D.shape == (k, k)
    X = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    Xr = X.clone().requires_grad_()
    p.stochastic_loss(Xr, 0.0).backward()
    torch.testing.assert_close(Xr.grad, p.grad(X), atol=1e-12, rtol=0)
    torch.testing.assert_close(p.stochastic_grad(X, -1.0) - p.grad(X), -p.C, atol=0, rtol=0)
    assert p.C[k:, k:].equal(torch.eye(4, dtype=torch.float64)) and p.C.sum() == 4
    # f(X) − f* = ½‖∇f(X)‖² (the curves use it), f* reached at X₁ = [−D, 0] whatever the bottom rows.
    assert abs(p.f(X) - p.f_star - 0.5 * float(p.grad(X).norm()) ** 2) < 1e-9
    X_star = X.clone()
    X_star[:k] = 0
    X_star[:k, :k] = -p.D
    assert abs(p.f(X_star) - p.f_star) < 1e-12 and float(p.grad(X_star).norm()) == 0.0


@pytest.mark.parametrize("kind", ["msgd", "adamw"])
def test_galore_stalls_above_a_clear_threshold(run, kind):
    g = curve(run, kind, "galore")
    T = len(g) - 1
    tail = g[T // 4:]
    # Stopped: over the last three quarters ‖∇f‖ does not move (the SVD keeps picking the noise block).
    assert max(tail) / min(tail) < 1.001
    assert min(tail) > 0.5                           # half of σ, far above everything else below
    assert g[0] / g[-1] < 20                         # not even 1.3 orders of magnitude


@pytest.mark.parametrize("kind", ["msgd", "adamw"])
def test_the_other_methods_converge(run, kind):
    g0 = curve(run, kind, "galore")[0]
    galore = curve(run, kind, "galore")[-1]
    final = {m: curve(run, kind, m)[-1] for m in METHODS}
    for m in ("full", "galore-deterministic"):       # exact gradients: many orders of magnitude
        assert final[m] < 1e-4 * g0, (m, final[m])
    assert final["galore-large-batch"] < 1e-2 * g0   # batch ⌈c√T⌉: at least two orders
    assert final["galore-large-batch"] < galore / 20
    for m in ("golore", "golore@x", "rso"):          # random subspaces: the O(1/√T) noise floor
        assert final[m] < g0 / 25, (m, final[m])
        assert final[m] < galore / 3, (m, final[m], galore)
        gap = run["results"][kind][m]["loss_gap"]
        assert gap[-1] < 1e-3 * gap[0]               # f − f*: more than three orders


@pytest.mark.parametrize("kind", ["msgd", "adamw"])
def test_golore_at_x_stalls_like_galore_until_its_switch_then_recovers(run, kind):
    hybrid, galore = curve(run, kind, "golore@x"), curve(run, kind, "galore")
    T = len(galore) - 1
    switch = round((1 - run["setup"]["settings"]["random_fraction"][kind]) * T)
    # Same SVD cycles as GaLore (only the state policy at a switch differs): stalled at the same level.
    assert hybrid[:101] == galore[:101]
    before = hybrid[T // 4: switch + 1]
    assert max(before) / min(before) < 1.001 and min(before) > 0.5
    assert abs(hybrid[switch] / galore[switch] - 1) < 0.1
    assert hybrid[-1] < hybrid[switch] / 3                     # the random cycles get it moving again


def test_settings_change_the_outcome():
    """The stall is the noise's doing: with σ = 0 the same GaLore run converges."""
    s = Settings(steps={"msgd": 400, "adamw": 400})
    noisy = run_method(make_problem(), "galore", "msgd", s)["grad_norm"][-1]
    clean = run_method(make_problem(sigma=0.0), "galore", "msgd", s)["grad_norm"][-1]
    assert clean < 1e-3 < 0.5 < noisy


def test_command_line_writes_curves_and_plot(tmp_path, capsys):
    out_json, out_png = tmp_path / "c.json", tmp_path / "c.png"
    assert main(["--steps-msgd", "40", "--steps-adamw", "30", "--gap", "10", "--methods", "galore", "rso",
                 "--json", str(out_json), "--png", str(out_png)]) == 0
    data = json.loads(out_json.read_text())
    assert set(data["results"]) == {"msgd", "adamw"}
    assert set(data["results"]["msgd"]) == {"galore", "rso"}
    assert len(data["results"]["msgd"]["rso"]["grad_norm"]) == 41
    assert len(data["results"]["adamw"]["galore"]["loss_gap"]) == 31
    assert out_png.stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "galore" in printed and "rso" in printed
    assert summary_table(data).splitlines()[0] in printed


def test_paper_preset_is_the_authors_setup():
    p = paper_problem()
    assert abs(p.f_star - (-23.217)) < 5e-4           # torch.manual_seed(42), float32 randn, as committed
    assert torch.equal(p.X0[:6, :6], 0.5 * torch.eye(6, dtype=torch.float64)) and p.X0[:6, 6:].abs().sum() == 0
    assert PAPER.steps == {"msgd": 200_000, "adamw": 100_000} and PAPER.lr == {"msgd": 3e-5, "adamw": 3e-5}
    assert PAPER.momentum == 0.0 and PAPER.gap == 100 and PAPER.schedule == "constant" and PAPER.log_every == 100
    assert PAPER.random_fraction == {"msgd": 0.75, "adamw": 0.5}
    state = torch.get_rng_state()
    paper_problem()
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left as it was


def test_paper_preset_command_logs_every_100_iterations(tmp_path, capsys):
    out_json = tmp_path / "p.json"
    assert main(["--preset", "paper", "--steps-msgd", "250", "--steps-adamw", "200", "--methods", "full", "galore",
                 "--json", str(out_json), "--png", ""]) == 0
    data = json.loads(out_json.read_text())
    assert data["setup"]["preset"] == "paper" and data["setup"]["settings"]["lr"] == {"msgd": 3e-5, "adamw": 3e-5}
    assert data["results"]["msgd"]["full"]["iterations"] == [0, 100, 200, 250]
    assert data["results"]["adamw"]["galore"]["iterations"] == [0, 100, 200]
    f = data["results"]["msgd"]["full"]["f"]
    assert f[0] == pytest.approx(paper_problem().f(paper_problem().X0)) and f[-1] < f[0]
    assert "flat from" in capsys.readouterr().out


def test_plateau_iteration():
    curve = {"iterations": [0, 10, 20, 30, 40], "f": [5.0, 2.0, 1.0005, 1.0001, 1.0]}
    assert plateau_iteration(curve) == 20           # within 0.1% of the total decrease from there on
    assert plateau_iteration({"iterations": [0, 10], "f": [3.0, 1.0]}) == 10
