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
adds b − 1 further signs to the first one, drawn as a binomial count). :func:`run_all` returns the
curves, :func:`plot` draws them, ``python -m rso.train.counterexample`` (or ``examples/counterexample.py``)
is the command line. ``--preset paper`` runs the authors' settings (:data:`PAPER`); the defaults are a
fast variant for the tests.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

import rso
from rso.optim import SubspaceAdamW, SubspaceSGD
from rso.projections import generator_for

__all__ = ["Problem", "Settings", "PAPER", "METHODS", "OPTIMIZERS", "make_problem", "paper_problem",
           "run_method", "run_all", "summary_table", "plateau_iteration", "plot", "main"]

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


def paper_problem(n: int = 10, r: int = 4, sigma: float = 1.0, seed: int = 42) -> Problem:
    """The authors' draw: ``torch.manual_seed(seed)``, then D = σ·randn(n−r, n−r) and the bottom rows of
    X₀ = [[σ/2·I, 0], [σ·randn(r, n)]] from torch's global generator in float32 (f* = −23.217 for
    seed 42), converted to float64. The global RNG state is restored afterwards."""
    state = torch.get_rng_state()
    try:
        torch.manual_seed(seed)
        D = sigma * torch.randn(n - r, n - r)
        bottom = sigma * torch.randn(r, n)
    finally:
        torch.set_rng_state(state)
    X0 = torch.zeros(n, n, dtype=torch.float64)
    X0[: n - r, : n - r] = 0.5 * sigma * torch.eye(n - r, dtype=torch.float64)
    X0[n - r:] = bottom.double()
    return Problem(n, r, float(sigma), D.double(), X0)


@dataclass
class Settings:
    """Everything a run depends on besides the problem. ``steps``, ``lr``, ``random_fraction`` are per optimizer."""

    steps: dict = field(default_factory=lambda: {"msgd": 2000, "adamw": 1000})
    lr: dict = field(default_factory=lambda: {"msgd": 0.02, "adamw": 0.03})
    momentum: float = 0.9              # MSGD: M ← βM + R, X ← X − lr·M (0: plain SGD)
    betas: tuple = (0.9, 0.999)        # AdamW
    gap: int = 100                     # τ: steps per subspace
    random_fraction: dict = field(default_factory=lambda: {"msgd": 0.5, "adamw": 0.5})  # GoLore@x%: last x random
    batch_c: float = 4.0               # large-batch GaLore: b = ⌈c·√T⌉ noise samples averaged per step
    schedule: str = "cosine"           # "constant" | "cosine" (to 0 over the run), same for every method
    state_on_switch: str = "project"   # GoLore / GoLore@x% (and RSO's state_on_merge): momentum projection
    seed: int = 42
    log_every: int = 1                 # record f, f − f*, ‖∇f‖ every this many iterations (and at the end)

    def batch(self, optimizer: str) -> int:
        return math.ceil(self.batch_c * math.sqrt(self.steps[optimizer]))


#: The GoLore authors' settings (pkumelon/Golore ``exp/main.py``): lr 3e-5 for every optimizer, plain SGD
#: (momentum 0) for 200,000 iterations and AdamW for 100,000, constant lr, refresh every 100, f logged
#: every 100 iterations, GoLore@75% in the SGD panel and GoLore@50% in the AdamW panel.
PAPER = Settings(steps={"msgd": 200_000, "adamw": 100_000}, lr={"msgd": 3e-5, "adamw": 3e-5}, momentum=0.0,
                 gap=100, random_fraction={"msgd": 0.75, "adamw": 0.5}, schedule="constant", seed=42,
                 log_every=100)


def _noise(seed: int, steps: int, batch: int) -> list[float]:
    """ξ_t for each step: the mean of ``batch`` ±1 signs whose first is the common sign of step t."""
    gen = generator_for(seed, 1)
    first = torch.randint(0, 2, (steps,), generator=gen, dtype=torch.int64).mul(2).sub(1).double()
    if batch == 1:
        return first.tolist()
    heads = torch.binomial(torch.full((steps,), float(batch - 1), dtype=torch.float64),
                           torch.full((steps,), 0.5, dtype=torch.float64), generator=generator_for(seed, 2))
    return ((first + 2 * heads - (batch - 1)) / batch).tolist()


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
    xis = [0.0] * steps if method == "galore-deterministic" else _noise(settings.seed, steps, batch)
    n, r = problem.n, problem.r

    projected = {"rank": r, "update_proj_gap": settings.gap, "scale": 1.0, "proj_side": "left",
                 "seed": settings.seed}
    model = None
    if method == "rso":
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
                         random_fraction=settings.random_fraction[optimizer], state_on_switch=settings.state_on_switch)
        opt = _make_optimizer(optimizer, [X], settings, extra)

        def current_x():
            return X.detach()

    its, values, gaps, norms = [], [], [], []

    def record(t):
        # f(X) − f* = ½‖∇f(X)‖² exactly; computing it from the identity avoids the cancellation
        # of f(X) − f* near the optimum (f* ≈ −20).
        x = current_x()
        g = float(problem.grad(x).norm())
        its.append(t)
        values.append(problem.f(x))
        gaps.append(0.5 * g * g)
        norms.append(g)

    record(0)
    try:
        for t in range(steps):
            xi = xis[t]
            if settings.schedule != "constant" or t == 0:
                for g in opt.param_groups:
                    g["lr"] = _lr_at(settings, optimizer, t)
            if model is None:
                X.grad = problem.stochastic_grad(X.detach(), xi)
            else:
                opt.zero_grad(set_to_none=True)
                problem.stochastic_loss(model(eye), xi).backward()
            opt.step()
            if (t + 1) % settings.log_every == 0 or t + 1 == steps:
                record(t + 1)
    finally:
        if model is not None:
            rso.unwrap(model)
    return {"method": method, "optimizer": optimizer, "batch": batch, "iterations": its, "f": values,
            "loss_gap": gaps, "grad_norm": norms}


def run_all(problem: Problem | None = None, settings: Settings | None = None, methods=None,
            optimizers=OPTIMIZERS) -> dict:
    """Every method with every optimizer: ``{optimizer: {method: curves}}`` plus the setup."""
    problem = problem or make_problem()
    settings = settings or Settings()
    methods = list(methods or METHODS)
    results = {kind: {m: run_method(problem, m, kind, settings) for m in methods} for kind in optimizers}
    return {"setup": _setup(problem, settings), "results": results}


def _setup(problem: Problem, settings: Settings, preset: str = "custom") -> dict:
    return {"preset": preset, "n": problem.n, "r": problem.r, "sigma": problem.sigma, "f_star": problem.f_star,
            "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(settings).items()}}


def plateau_iteration(curve: dict, fraction: float = 1e-3) -> int:
    """The first logged iteration from which f stays within ``fraction`` of the run's total decrease
    of its final value: where the method stops improving (for a converging method, late in the run)."""
    f, its = curve["f"], curve["iterations"]
    tol = fraction * max(f[0] - f[-1], 0.0)
    for i in range(len(f)):
        if all(v - f[-1] <= tol for v in f[i:]):
            return its[i]
    return its[-1]


def summary_table(run: dict) -> str:
    """Final f(X_T), f − f* and ‖∇f‖, the initial ‖∇f‖ and the plateau iteration, as aligned text."""
    lines = [f"{'optimizer':<8} {'method':<22} {'batch':>5} {'f(X_T)':>10} {'f(X_T)−f*':>11} {'‖∇f(X₀)‖':>10} "
             f"{'‖∇f(X_T)‖':>11} {'flat from':>10}"]
    for kind, per_method in run["results"].items():
        for m, c in per_method.items():
            lines.append(f"{kind:<8} {m:<22} {c['batch']:>5} {c['f'][-1]:>10.4f} {c['loss_gap'][-1]:>11.3e} "
                         f"{c['grad_norm'][0]:>10.3e} {c['grad_norm'][-1]:>11.3e} {plateau_iteration(c):>10}")
    return "\n".join(lines)


def _label(run: dict, kind: str, method: str) -> str:
    if method == "galore-large-batch":
        return f"GaLore, batch {run['results'][kind][method]['batch']}"
    x_pct = int(round(100 * run["setup"]["settings"]["random_fraction"][kind]))
    return METHODS[method].replace("x%", f"{x_pct}%")


def plot(run: dict, path: str) -> None:
    """Per optimizer (a column): f(X_t) with f* (as the paper plots it), f(X_t) − f* and ‖∇f(X_t)‖ (log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(run["results"])
    fig, axes = plt.subplots(3, len(kinds), figsize=(6.5 * len(kinds), 12), squeeze=False)
    styles = {"full": ("k", "-"), "galore": ("tab:red", "-"), "golore": ("tab:blue", "-"),
              "golore@x": ("tab:cyan", "--"), "galore-deterministic": ("tab:orange", ":"),
              "galore-large-batch": ("tab:purple", "-."), "rso": ("tab:green", "--")}
    s = run["setup"]
    momentum = s["settings"]["momentum"]
    floor = 1e-16
    for col, kind in enumerate(kinds):
        for m, c in run["results"][kind].items():
            color, ls = styles.get(m, (None, "-"))
            its, label = c["iterations"], _label(run, kind, m)
            axes[0, col].plot(its, c["f"], color=color, ls=ls, label=label)
            axes[1, col].semilogy(its, [max(v, floor) for v in c["loss_gap"]], color=color, ls=ls, label=label)
            axes[2, col].semilogy(its, [max(v, floor) for v in c["grad_norm"]], color=color, ls=ls, label=label)
        axes[0, col].axhline(s["f_star"], color="gray", lw=0.8, ls=":", label=f"f* = {s['f_star']:.3f}")
        name = ("MSGD" if momentum else "SGD") if kind == "msgd" else "AdamW"
        axes[0, col].set_title(f"{name}: f(X_t)")
        axes[1, col].set_title(f"{name}: f(X_t) − f*")
        axes[2, col].set_title(f"{name}: ‖∇f(X_t)‖_F")
        for row in range(3):
            axes[row, col].set_xlabel("iteration")
            axes[row, col].grid(True, which="major", alpha=0.3)
        axes[0, col].legend(fontsize=8)
    fig.suptitle(f"GoLore counter-example: n={s['n']}, r={s['r']}, σ={s['sigma']}, τ={s['settings']['gap']}, "
                 f"lr {s['settings']['lr']}, seed={s['settings']['seed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def to_json(run: dict) -> dict:
    """The run as JSON-ready data (curves as lists of floats)."""
    return {"setup": run["setup"], "results": run["results"]}


def main(argv=None) -> int:
    """Command line: run every method, print the table, write the JSON curves and the PNG."""
    import argparse
    import dataclasses
    import json
    import os

    from tqdm.auto import tqdm

    d = Settings()
    ap = argparse.ArgumentParser(prog="python -m rso.train.counterexample",
                                 description="GoLore counter-example: GaLore vs GoLore vs RSO on "
                                             "f(X) = ½‖AX‖² + ⟨B, X⟩ with noise in the ignored block")
    ap.add_argument("--preset", choices=["fast", "paper"], default="fast",
                    help="fast: the defaults below (seconds); paper: the GoLore authors' settings (minutes: "
                         "SGD 200,000 and AdamW 100,000 iterations at lr 3e-5, their draw of D and X₀); "
                         "flags given explicitly override the preset")
    ap.add_argument("--n", type=int, default=10, help="X is n×n (default 10)")
    ap.add_argument("--r", type=int, default=4, help="rank of every projection and of the noise block (4)")
    ap.add_argument("--sigma", type=float, default=1.0, help="noise level σ (1.0)")
    ap.add_argument("--gap", type=int, default=None, help=f"τ: steps per subspace ({d.gap})")
    ap.add_argument("--seed", type=int, default=None, help=f"seed of D, X₀, the noise and the projections ({d.seed})")
    ap.add_argument("--steps-msgd", type=int, default=None, help=f"(M)SGD iterations ({d.steps['msgd']})")
    ap.add_argument("--steps-adamw", type=int, default=None, help=f"AdamW iterations ({d.steps['adamw']})")
    ap.add_argument("--lr-msgd", type=float, default=None, help=f"(M)SGD peak learning rate ({d.lr['msgd']})")
    ap.add_argument("--lr-adamw", type=float, default=None, help=f"AdamW peak learning rate ({d.lr['adamw']})")
    ap.add_argument("--momentum", type=float, default=None, help=f"MSGD momentum β ({d.momentum}; 0: plain SGD)")
    ap.add_argument("--random-fraction", type=float, default=None,
                    help="GoLore@x%%: fraction x of the iterations, at the end, with random projections, for both "
                         "optimizers (0.5; paper: 0.75 for SGD, 0.5 for AdamW)")
    ap.add_argument("--batch-c", type=float, default=None, help=f"large-batch GaLore: batch ⌈c·√T⌉ (c = {d.batch_c})")
    ap.add_argument("--schedule", choices=["constant", "cosine"], default=None,
                    help=f"learning-rate schedule, the same for every method ({d.schedule})")
    ap.add_argument("--state-on-switch", choices=["keep", "reset", "project"], default=None,
                    help="GoLore's / RSO's optimizer state at a new subspace (project); GaLore keeps it, "
                         "as galore-torch")
    ap.add_argument("--log-every", type=int, default=None, help="record the curves every N iterations (fast: 1)")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS), default=list(OPTIMIZERS))
    ap.add_argument("--json", default="counterexample.json", help="where to write the curves")
    ap.add_argument("--png", default="counterexample.png", help="where to write the plot ('' to skip)")
    args = ap.parse_args(argv)
    for name in ("gap", "steps_msgd", "steps_adamw", "log_every"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")

    base = PAPER if args.preset == "paper" else d
    given = lambda value, default: default if value is None else value  # noqa: E731
    settings = dataclasses.replace(
        base,
        steps={"msgd": given(args.steps_msgd, base.steps["msgd"]), "adamw": given(args.steps_adamw, base.steps["adamw"])},
        lr={"msgd": given(args.lr_msgd, base.lr["msgd"]), "adamw": given(args.lr_adamw, base.lr["adamw"])},
        random_fraction=dict(base.random_fraction) if args.random_fraction is None
        else {"msgd": args.random_fraction, "adamw": args.random_fraction},
        **{k: getattr(args, k) for k in ("momentum", "gap", "batch_c", "schedule", "state_on_switch", "seed",
                                         "log_every") if getattr(args, k) is not None})
    problem = (paper_problem if args.preset == "paper" else make_problem)(args.n, args.r, args.sigma, settings.seed)
    bar = tqdm(total=len(args.methods) * len(args.optimizers), desc="counter-example runs", disable=None)
    results = {}
    for kind in args.optimizers:
        results[kind] = {}
        for m in args.methods:
            bar.set_postfix_str(f"{kind} / {m}")
            results[kind][m] = run_method(problem, m, kind, settings)
            bar.update(1)
    bar.close()
    run = {"setup": _setup(problem, settings, args.preset), "results": results}
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


if __name__ == "__main__":
    raise SystemExit(main())
