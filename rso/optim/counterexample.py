"""The GoLore paper's counter-example: GaLore stalls on it, random projections do not.

    f(X) = ½‖A X‖²_F + ⟨Bm, X⟩_F,   X ∈ R^{n×n},   A = (I_{n−r}  0),   Bm = [[D, 0], [0, 0]]

with D an (n−r)×(n−r) Gaussian matrix (``Bm`` is the paper's B, renamed to keep B for RSO's factor).
f depends only on the top n−r rows of X: ∇f(X) = AᵀA X + Bm = [[X₁₁ + D, X₁₂], [0, 0]],
f* = −½‖D‖²_F, and f(X) − f* = ½‖∇f(X)‖²_F. The stochastic gradient adds ξσC with
C = [[0, 0], [0, I_r]] and ξ uniform on {±1}: the noise lives in the r×r block f ignores. Once every
singular value of ∇f is below σ, the top-r left singular vectors of the stochastic gradient are the
noise rows, the projected gradient P G has no component of ∇f, and GaLore stops moving the rows
that matter. A random (Stiefel) P, noise-free or large-batch gradients, and RSO do not have that
fixed point.

All methods run with common random numbers: the same X₀, D and sign sequence ξ_t (a batch of b
averages the first b signs of row t). :func:`run_all` returns the curves, :func:`plot` draws them,
``examples/counterexample.py`` is the command line.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..projections import generator_for
from .adamw import SubspaceAdamW
from .sgd import SubspaceSGD

__all__ = ["Problem", "Settings", "METHODS", "OPTIMIZERS", "make_problem", "run_method", "run_all",
           "summary_table", "plot"]

#: method name → short description (the curve labels).
METHODS = {
    "full": "full-parameter",
    "galore": "GaLore",
    "golore": "GoLore",
    "golore@x": "GoLore@x%",
    "galore-deterministic": "GaLore, σ = 0",
    "galore-large-batch": "GaLore, batch ⌈c√T⌉",
    "rso": "RSO (SubspaceLinear, Stiefel)",
}
OPTIMIZERS = ("msgd", "adamw")


@dataclass
class Problem:
    n: int
    r: int
    sigma: float
    D: torch.Tensor
    X0: torch.Tensor

    def __post_init__(self):
        n, k, dtype = self.n, self.n - self.r, self.D.dtype
        self.A = torch.cat([torch.eye(k, dtype=dtype), torch.zeros(k, self.r, dtype=dtype)], 1)
        self.Bm = torch.zeros(n, n, dtype=dtype)
        self.Bm[:k, :k] = self.D
        self.C = torch.zeros(n, n, dtype=dtype)
        self.C[k:, k:] = torch.eye(self.r, dtype=dtype)
        self.f_star = -0.5 * float((self.D * self.D).sum())

    def f(self, X: torch.Tensor) -> float:
        """f(X) = ½‖AX‖² + ⟨Bm, X⟩."""
        top = X[: self.n - self.r]
        return 0.5 * float((top * top).sum()) + float((self.Bm * X).sum())

    def grad(self, X: torch.Tensor) -> torch.Tensor:
        """∇f(X) = AᵀA X + Bm."""
        g = self.Bm.to(X.dtype).clone()
        g[: self.n - self.r] += X[: self.n - self.r]
        return g

    def stochastic_grad(self, X: torch.Tensor, xi: float) -> torch.Tensor:
        """∇f(X) + ξσC."""
        g = self.grad(X)
        if xi != 0.0:
            g.add_(self.C.to(X.dtype), alpha=xi * self.sigma)
        return g

    def stochastic_loss(self, X: torch.Tensor, xi: float) -> torch.Tensor:
        """½‖AX‖² + ⟨Bm + ξσC, X⟩, differentiable: its gradient is ∇f(X) + ξσC."""
        top = X[: self.n - self.r]
        lin = self.Bm.to(X.dtype) + (xi * self.sigma) * self.C.to(X.dtype)
        return 0.5 * (top * top).sum() + (lin * X).sum()


def make_problem(n: int = 10, r: int = 4, sigma: float = 1.0, seed: int = 42,
                 dtype: torch.dtype = torch.float64) -> Problem:
    """D ~ N(0, 1); X₀ = [[½ I, 0], [Z]] with Z ~ N(0, 1) (as in the authors' script)."""
    if not 1 <= r < n:
        raise ValueError(f"need 1 ≤ r < n, got n={n}, r={r}")
    gen = generator_for(seed, 0)
    D = torch.randn(n - r, n - r, generator=gen, dtype=torch.float64)
    X0 = torch.zeros(n, n, dtype=torch.float64)
    X0[: n - r, : n - r] = 0.5 * torch.eye(n - r, dtype=torch.float64)
    X0[n - r:] = torch.randn(r, n, generator=gen, dtype=torch.float64)
    return Problem(n, r, float(sigma), D.to(dtype), X0.to(dtype))


@dataclass
class Settings:
    """Everything a run depends on besides the problem. ``steps`` etc. are per optimizer."""

    steps: dict = field(default_factory=lambda: {"msgd": 2000, "adamw": 1000})
    lr: dict = field(default_factory=lambda: {"msgd": 0.02, "adamw": 0.03})
    momentum: float = 0.9              # MSGD: M ← βM + R, X ← X − lr·M
    betas: tuple = (0.9, 0.999)        # AdamW
    gap: int = 100                     # τ: steps per subspace
    random_fraction: float = 0.5       # GoLore@x%: the last x of the iterations are random
    batch_c: float = 4.0               # large-batch GaLore: b = ⌈c·√T⌉ noise samples averaged per step
    schedule: str = "cosine"           # "constant" | "cosine" (to 0 over the run), same for every method
    state_on_switch: str = "project"   # GoLore / GoLore@x% (and RSO's state_on_merge): momentum projection
    seed: int = 42

    def batch(self, optimizer: str) -> int:
        return math.ceil(self.batch_c * math.sqrt(self.steps[optimizer]))


def _signs(seed: int, steps: int, batch: int) -> torch.Tensor:
    """ξ samples (steps × batch), ±1; row t, first b columns, is the batch of step t."""
    gen = generator_for(seed, 1)
    return torch.randint(0, 2, (steps, batch), generator=gen, dtype=torch.int64).mul(2).sub(1).double()


def _lr_at(settings: Settings, optimizer: str, t: int) -> float:
    base, total = settings.lr[optimizer], settings.steps[optimizer]
    if settings.schedule == "constant":
        return base
    if settings.schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * t / total))
    raise ValueError(f"schedule must be 'constant' or 'cosine', got {settings.schedule!r}")


def _make_optimizer(kind: str, params, settings: Settings, group_extra: dict | None):
    group = {"params": list(params)}
    if group_extra:
        group.update(group_extra)
    if kind == "msgd":
        return SubspaceSGD([group], lr=settings.lr["msgd"], momentum=settings.momentum)
    if kind == "adamw":
        return SubspaceAdamW([group], lr=settings.lr["adamw"], betas=settings.betas, weight_decay=0.0)
    raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {kind!r}")


def run_method(problem: Problem, method: str, optimizer: str, settings: Settings | None = None) -> dict:
    """Train with one method; the curves hold f(X_t) − f* and ‖∇f(X_t)‖ for t = 0..T."""
    settings = settings or Settings()
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {optimizer!r}")
    steps = settings.steps[optimizer]
    batch = settings.batch(optimizer) if method == "galore-large-batch" else 1
    signs = _signs(settings.seed, steps, max(batch, settings.batch(optimizer)))
    noise_scale = 0.0 if method == "galore-deterministic" else 1.0
    xis = (noise_scale * signs[:, :batch].mean(1)).tolist()
    n, r = problem.n, problem.r

    projected = {"rank": r, "update_proj_gap": settings.gap, "scale": 1.0, "proj_side": "left",
                 "seed": settings.seed}
    model = None
    if method == "rso":
        import rso  # the layers package; imported here so rso.optim does not depend on it

        lin = nn.Linear(n, n, bias=False, dtype=problem.X0.dtype)
        with torch.no_grad():
            lin.weight.copy_(problem.X0.T)      # W = Xᵀ: W's input side is X's row side (left projection)
        model = rso.wrap(nn.Sequential(lin), rank=r, tau=settings.gap, projection="stiefel", scale=1.0,
                         seed=settings.seed, state_on_merge=settings.state_on_switch)
        layer = model[0]
        eye = torch.eye(n, dtype=problem.X0.dtype)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = _make_optimizer(optimizer, params, settings, None)

        def current_x():                                # model(eye) = I·Wᵀ = X
            return (layer.weight + layer.scale * layer.B @ layer.P).T.detach()
    else:
        X = nn.Parameter(problem.X0.clone())
        extra = None
        if method in ("galore", "galore-deterministic", "galore-large-batch"):
            extra = dict(projected, projection="svd", state_on_switch="keep")
        elif method == "golore":
            extra = dict(projected, projection="stiefel", state_on_switch=settings.state_on_switch)
        elif method == "golore@x":
            extra = dict(projected, projection="hybrid", total_steps=steps,
                         random_fraction=settings.random_fraction, state_on_switch=settings.state_on_switch)
        opt = _make_optimizer(optimizer, [X], settings, extra)

        def current_x():
            return X.detach()

    gaps, norms = [], []

    def record():
        # f(X) − f* = ½‖∇f(X)‖² exactly; computing it from the identity avoids the cancellation
        # of f(X) − f* near the optimum (f* ≈ −20).
        g = float(problem.grad(current_x()).norm())
        gaps.append(0.5 * g * g)
        norms.append(g)

    record()
    try:
        for t in range(steps):
            xi = xis[t]
            for g in opt.param_groups:
                g["lr"] = _lr_at(settings, optimizer, t)
            if model is None:
                X.grad = problem.stochastic_grad(X.detach(), xi)
            else:
                opt.zero_grad(set_to_none=True)
                problem.stochastic_loss(model(eye), xi).backward()
            opt.step()
            record()
    finally:
        if model is not None:
            rso.unwrap(model)
    return {"method": method, "optimizer": optimizer, "batch": batch, "loss_gap": gaps, "grad_norm": norms}


def run_all(problem: Problem | None = None, settings: Settings | None = None, methods=None,
            optimizers=OPTIMIZERS) -> dict:
    """Every method with every optimizer: ``{optimizer: {method: curves}}`` plus the setup."""
    problem = problem or make_problem()
    settings = settings or Settings()
    methods = list(methods or METHODS)
    results = {kind: {m: run_method(problem, m, kind, settings) for m in methods} for kind in optimizers}
    setup = {"n": problem.n, "r": problem.r, "sigma": problem.sigma, "f_star": problem.f_star,
             "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(settings).items()}}
    return {"setup": setup, "results": results}


def summary_table(run: dict) -> str:
    """Initial and final ‖∇f‖ and final f − f* per method and optimizer, as aligned text."""
    lines = [f"{'optimizer':<8} {'method':<22} {'batch':>5} {'‖∇f(X₀)‖':>11} {'‖∇f(X_T)‖':>11} "
             f"{'min ‖∇f‖':>11} {'f(X_T)−f*':>11}"]
    for kind, per_method in run["results"].items():
        for m, c in per_method.items():
            lines.append(f"{kind:<8} {m:<22} {c['batch']:>5} {c['grad_norm'][0]:>11.3e} "
                         f"{c['grad_norm'][-1]:>11.3e} {min(c['grad_norm']):>11.3e} {c['loss_gap'][-1]:>11.3e}")
    return "\n".join(lines)


def plot(run: dict, path: str) -> None:
    """Loss gap and gradient norm against iterations, one column per optimizer (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(run["results"])
    fig, axes = plt.subplots(2, len(kinds), figsize=(6.5 * len(kinds), 8.5), squeeze=False)
    styles = {"full": ("k", "-"), "galore": ("tab:red", "-"), "golore": ("tab:blue", "-"),
              "golore@x": ("tab:cyan", "--"), "galore-deterministic": ("tab:orange", ":"),
              "galore-large-batch": ("tab:purple", "-."), "rso": ("tab:green", "--")}
    x_pct = int(round(100 * run["setup"]["settings"]["random_fraction"]))
    for col, kind in enumerate(kinds):
        for m, c in run["results"][kind].items():
            color, ls = styles.get(m, (None, "-"))
            label = METHODS[m].replace("x%", f"{x_pct}%")
            if m == "galore-large-batch":
                label = f"GaLore, batch {c['batch']}"
            floor = 1e-16
            axes[0, col].semilogy([max(v, floor) for v in c["loss_gap"]], color=color, ls=ls, label=label)
            axes[1, col].semilogy([max(v, floor) for v in c["grad_norm"]], color=color, ls=ls, label=label)
        name = "MSGD" if kind == "msgd" else "AdamW"
        axes[0, col].set_title(f"{name}: f(X_t) − f*")
        axes[1, col].set_title(f"{name}: ‖∇f(X_t)‖_F")
        for row in range(2):
            axes[row, col].set_xlabel("iteration")
            axes[row, col].grid(True, which="major", alpha=0.3)
        axes[0, col].legend(fontsize=8)
    s = run["setup"]
    fig.suptitle(f"GoLore counter-example: n={s['n']}, r={s['r']}, σ={s['sigma']}, "
                 f"τ={s['settings']['gap']}, seed={s['settings']['seed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def to_json(run: dict) -> dict:
    """The run as JSON-ready data (curves as lists of floats)."""
    return {"setup": run["setup"], "results": run["results"]}


def main(argv=None) -> int:
    """Command line: run every method, print the table, write the JSON curves and the PNG."""
    import argparse
    import json
    import os

    d = Settings()
    ap = argparse.ArgumentParser(description="GoLore counter-example: GaLore vs GoLore vs RSO on "
                                             "f(X) = ½‖AX‖² + ⟨B, X⟩ with noise in the ignored block")
    ap.add_argument("--n", type=int, default=10, help="X is n×n (default 10)")
    ap.add_argument("--r", type=int, default=4, help="rank of every projection and of the noise block (4)")
    ap.add_argument("--sigma", type=float, default=1.0, help="noise level σ (1.0)")
    ap.add_argument("--gap", type=int, default=d.gap, help="τ: steps per subspace (100)")
    ap.add_argument("--seed", type=int, default=d.seed, help="seed of D, X₀, the noise and the projections (42)")
    ap.add_argument("--steps-msgd", type=int, default=d.steps["msgd"], help="MSGD iterations (2000)")
    ap.add_argument("--steps-adamw", type=int, default=d.steps["adamw"], help="AdamW iterations (1000)")
    ap.add_argument("--lr-msgd", type=float, default=d.lr["msgd"], help="MSGD peak learning rate (0.02)")
    ap.add_argument("--lr-adamw", type=float, default=d.lr["adamw"], help="AdamW peak learning rate (0.03)")
    ap.add_argument("--momentum", type=float, default=d.momentum, help="MSGD momentum β (0.9)")
    ap.add_argument("--random-fraction", type=float, default=d.random_fraction,
                    help="GoLore@x%%: fraction x of the iterations, at the end, with random projections (0.5)")
    ap.add_argument("--batch-c", type=float, default=d.batch_c,
                    help="large-batch GaLore: batch ⌈c·√T⌉ (c = 4)")
    ap.add_argument("--schedule", choices=["constant", "cosine"], default=d.schedule,
                    help="learning-rate schedule, the same for every method (cosine)")
    ap.add_argument("--state-on-switch", choices=["keep", "reset", "project"], default=d.state_on_switch,
                    help="GoLore's / RSO's optimizer state at a new subspace (project); GaLore keeps it, "
                         "as galore-torch")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS), default=list(OPTIMIZERS))
    ap.add_argument("--json", default="counterexample.json", help="where to write the curves")
    ap.add_argument("--png", default="counterexample.png", help="where to write the plot ('' to skip)")
    args = ap.parse_args(argv)

    settings = Settings(steps={"msgd": args.steps_msgd, "adamw": args.steps_adamw},
                        lr={"msgd": args.lr_msgd, "adamw": args.lr_adamw}, momentum=args.momentum,
                        gap=args.gap, random_fraction=args.random_fraction, batch_c=args.batch_c,
                        schedule=args.schedule, state_on_switch=args.state_on_switch, seed=args.seed)
    problem = make_problem(args.n, args.r, args.sigma, args.seed)
    run = run_all(problem, settings, args.methods, args.optimizers)
    print(summary_table(run))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(to_json(run), fh)
        print(f"curves: {args.json}")
    if args.png:
        os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
        plot(run, args.png)
        print(f"plot: {args.png}")
    return 0
