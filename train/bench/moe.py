"""Issue 46's evidence: a tiny Qwen3-MoE pre-trained from scratch on the embedded corpus, AdamW vs RSO vs GaLore,
and RSO's choice of one P per stacked expert weight against one P per expert.

    python -m rso.train.bench.moe compare --max-steps 200 --seeds 0,1,2 --jobs 2 --output-dir runs/moe
    python -m rso.train.bench.moe measure --timed-steps 20 --out docs/results/moe/moe_step.json
    python -m rso.train.bench.moe p-choice --table runs/moe/table.json --step docs/results/moe/moe_step.json

``compare`` writes the model's config (:data:`MODEL`, a ``transformers`` ``Qwen3MoeConfig``: every layer a MoE
layer of 8 experts, top-2) to ``<output-dir>/qwen3-moe-tiny.json`` and runs every method over the seeds as
``rso.train.compare`` does (the same job runner, one ``rso.train.pretrain`` process per run, equal steps, tokens,
data order and initialization per seed), writing ``table.json`` in ``rso.train.compare``'s format (``python -m
rso.train.report`` renders it) and ``curves.png``. The methods:

=================  ============================================================================================
``adamw``          every weight, AdamW
``rso``            ``rso.wrap`` defaults: attention and the stacked expert weights W₀[e] + s·B[e] P, one P (r×in)
                   per stacked weight shared by its E experts (``rso.layers.SubspaceExperts``); the router
                   (8 outputs < rank), embeddings, norms and head train in full
``rso-per-expert`` the same, but expert e has its own Haar P_e (E×r×in per stacked weight), drawn from
                   (seed, cycle, e) at each cycle (:class:`PerExpertExperts`; Stiefel only)
``galore-torch``   the ``galore-torch`` package's GaLoreAdamW: the 2-D attention weights projected (rank r, SVD
                   every τ steps); the 3-D expert weights, which it cannot project, with plain Adam states in the
                   same optimizer, as the router, embeddings, norms and head
=================  ============================================================================================

The two extra methods exist only in this module's processes (``python -m rso.train.bench.moe train`` registers
them with ``rso.train.methods.register`` and runs ``rso.train.pretrain``). ``measure`` runs, per method on one thread and
batches of the corpus, one warm-up step, one step under :func:`rso.memory.measure_step` (bytes of parameters,
gradients, optimizer state, saved activations, peak of live tensors) and ``--timed-steps`` timed steps; it also
records the bytes of the expert P buffers.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import statistics
import sys
import time

import einops
import torch
from torch import nn

from rso.layers.functional import project
from rso.layers.subspace_experts import EXPERTS_CHILD, ExpertSubspace, SubspaceExperts
from rso.projections import StiefelSampler, generator_for

__all__ = ["MODEL", "PerExpertSubspace", "PerExpertExperts", "install_methods", "main"]

#: The tiny Qwen3-MoE: 4 layers, hidden 128, 8 experts of width 128, top-2, every layer sparse; tokenizer bpe8k.
MODEL = {
    "model_type": "qwen3_moe", "hidden_size": 128, "moe_intermediate_size": 128, "intermediate_size": 256,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
    "num_experts": 8, "num_experts_per_tok": 2, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "norm_topk_prob": True, "vocab_size": 8192, "max_position_embeddings": 512, "tie_word_embeddings": False,
    "rms_norm_eps": 1e-6, "initializer_range": 0.02, "bos_token_id": 0, "eos_token_id": 0,
    "training": {"tokenizer": "bpe8k", "seq_len": 128, "total_batch_size": 8, "rank": 32, "tau": 50,
                 "lr": {"adamw": 0.002, "default": 0.003},
                 "note": "issue 46's tiny Qwen3-MoE (rso.train.bench.moe); lr: the tiny LLaMA's swept values, "
                         "not swept here"}}
CONFIG_NAME = "qwen3-moe-tiny.json"
#: The compared entries (rso.train.compare's method[=lr] form).
DEFAULT_METHODS = "adamw=2e-3,rso=3e-3,rso-per-expert=3e-3,galore-torch=3e-3"


# ----------------------------------------------------------------------------- one P per expert (this bench only)
class PerExpertSubspace(ExpertSubspace):
    """B (E×out×r) and P (E×r×in): expert e's update is s·B[e] P[e], with P[e] Haar on the Stiefel manifold drawn
    from (seed, cycle, e) by :meth:`refresh_` once per cycle (the outer loop's one shared draw is overwritten)."""

    def __init__(self, owner, name, rank, scale):
        super().__init__(owner, name, rank, scale)
        self.P = self.P.new_zeros(self.num_experts, rank, self.in_features)
        self.drawn_cycle = None

    @torch.no_grad()
    def refresh_(self):
        """Draw the E projections of the current cycle, if not drawn yet (one batched QR)."""
        cycle = int(self.cycle)
        if self.drawn_cycle == cycle:
            return
        gens = [generator_for(int(self.seed), cycle, e) for e in range(self.num_experts)]
        Ps = StiefelSampler().sample_many(self.rank, self.in_features, gens, dtype=self.P.dtype, device=self.P.device)
        self.P.copy_(torch.stack(Ps))
        self.drawn_cycle = cycle

    def delta(self) -> torch.Tensor:
        """``s·B[e] P[e]`` per expert in W₀'s layout, in fp32 (float64 for float64 weights)."""
        acc = torch.promote_types(self.weight.dtype, torch.float32)
        with torch.no_grad():
            d = einops.einsum(self.B.to(acc), self.P.to(acc), "e o r, e r i -> e o i") * self.scale
        return einops.rearrange(d, "e o i -> e i o") if self.transposed else d


class PerExpertExperts(SubspaceExperts):
    """:class:`SubspaceExperts` with :class:`PerExpertSubspace` weights: each routed token is projected by its
    expert's own P (z = x P[e]ᵀ per expert instead of one z for every token before routing)."""

    def __init__(self, experts, ranks, scale=1.0):
        super().__init__(experts, ranks, scale)
        self._modules[EXPERTS_CHILD] = nn.ModuleDict({n: PerExpertSubspace(self, n, r, scale) for n, r in ranks.items()})

    def _prepared(self, name, hidden) -> dict:
        """The parent's tensors, its subspace moved to ``per_expert`` so that the parent projects nothing itself."""
        sub = self._modules[EXPERTS_CHILD]._modules.get(name)
        if sub is not None:
            sub.refresh_()
        w = super()._prepared(name, hidden)
        w["per_expert"], w["sub"] = w["sub"], None
        return w

    @staticmethod
    def _expert_linear(w: dict, e: int, x, z):
        sub = w.get("per_expert")
        if sub is None:
            return SubspaceExperts._expert_linear(w, e, x, z)
        x = w["x"](x)
        bias = w["bias"][e] if w["bias"] is not None else None
        P = w["P"][e]
        return sub.linear(x, project(x, P, w["index"]), w["W0"], w["B"][e], P, e, bias)


@contextlib.contextmanager
def _experts_class(cls):
    """``rso.wrap`` builds ``cls`` for each experts module inside the block."""
    import rso.wrapping as wrapping
    saved, wrapping.SubspaceExperts = wrapping.SubspaceExperts, cls
    try:
        yield
    finally:
        wrapping.SubspaceExperts = saved


# ----------------------------------------------------------------------------- the two extra methods
def _rso_per_expert(model, opts):
    from rso.train.methods import METHODS, MethodError
    if opts.projection != "stiefel":
        raise MethodError(f"rso-per-expert draws Haar (stiefel) projections only, got --projection {opts.projection}; "
                          f"leave --projection out")
    with _experts_class(PerExpertExperts):
        return METHODS["rso"](model, opts)


def _galore_torch(model, opts):
    """galore-torch's GaLoreAdamW: the block linear weights projected; everything else, 3-D experts included, Adam."""
    from galore_torch import GaLoreAdamW
    from rso.train.methods import matrix_parameters
    matrices, others = matrix_parameters(model)
    group = {"params": matrices, "rank": opts.rank, "update_proj_gap": opts.tau, "scale": opts.scale,
             "proj_type": "std"}
    return model, GaLoreAdamW([group, {"params": others}], lr=opts.lr, weight_decay=opts.weight_decay,
                              no_deprecation_warning=True)


def install_methods() -> None:
    """Register ``rso-per-expert`` and ``galore-torch`` in ``rso.train.methods`` (this process only)."""
    from rso.train import methods
    methods.register("rso-per-expert")(_rso_per_expert)
    methods.register("galore-torch")(_galore_torch)
    methods.METHOD_OPTIONS["rso-per-expert"] = methods.METHOD_OPTIONS["rso"]
    methods.METHOD_OPTIONS["galore-torch"] = ("rank", "tau", "scale")


# ----------------------------------------------------------------------------- compare
def _write_config(out: pathlib.Path) -> pathlib.Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / CONFIG_NAME
    path.write_text(json.dumps(MODEL, indent=2))
    return path


def _jobs(args, entries, config: pathlib.Path, out: pathlib.Path) -> list[dict]:
    from rso.train.compare import option_applies
    jobs = []
    for seed in args.seeds:
        for entry in entries:
            name = f"{entry['name']}_s{seed}"
            cmd = [sys.executable, "-m", "rso.train.bench.moe", "train", "--config", str(config), "--method",
                   entry["method"], "--lr", str(entry["lr"]), "--max-steps", str(args.max_steps), "--seed", str(seed),
                   "--eval-every", str(args.eval_every), "--eval-batches", str(args.eval_batches),
                   "--save-every", str(args.max_steps), "--threads", "1", "--no-progress", "--output-dir",
                   str(out / name)]
            for dest in ("rank", "tau"):
                if option_applies(dest, entry["method"]):
                    cmd += [f"--{dest}", str(getattr(args, dest))]
            jobs.append({"name": name, "entry_name": entry["name"], "run_seed": seed, "output": out / name, "cmd": cmd})
    return jobs


def compare(args) -> int:
    """Every entry over every seed; ``table.json``, ``table.md`` and ``curves.png`` in ``--output-dir``."""
    from rso.train.compare import display, eval_curve, parse_entry, run_jobs, run_records, summarize, table
    from rso.train.metrics import plot_comparison
    install_methods()
    out = pathlib.Path(args.output_dir)
    entries = [parse_entry(e) for e in args.methods.split(",") if e]
    jobs = _jobs(args, entries, _write_config(out), out)
    run_jobs(jobs, out, args.jobs, 1, reuse=args.resume, poll_s=0.5,
             summary=lambda j: f"eval loss {j['final_eval_loss']:.4f}")
    rows = [summarize(e, jobs) for e in entries]
    finished = [j for j in jobs if "metrics" in j and not j.get("error")]
    for job in finished:
        job["evals"] = eval_curve(job["metrics"])
    title = (f"tiny Qwen3-MoE (8 experts, top-2), {args.max_steps} steps, rank {args.rank}, tau {args.tau}, "
             f"seeds {','.join(map(str, args.seeds))}")
    plot_comparison({r["name"]: [j["metrics"] for j in finished if j["entry_name"] == r["name"]] for r in rows},
                    out / "curves.png", title)
    command = display([sys.executable, "-m", "rso.train.bench.moe", *args.argv])
    text = table(rows, args.seeds)
    (out / "table.md").write_text(text + f"\n\nCommand:\n\n    {command}\n")
    (out / "table.json").write_text(json.dumps({"command": command, "seeds": args.seeds, "model": MODEL,
                                                "methods": rows, "runs": run_records(jobs)}, indent=2, default=str))
    print(text)
    return 0 if all("error" not in j for j in jobs) else 1


# ----------------------------------------------------------------------------- measure
def _setup(method: str, lr: float, args, cfg: dict, tok):
    """(model, optimizer) of ``method``, built as ``rso.train.pretrain`` builds it for seed 0."""
    from rso.train.methods import MethodOptions, setup_method
    from rso.train.models import build_model
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    return setup_method(method, model, MethodOptions(rank=args.rank, tau=args.tau, lr=lr, seed=0))


def _p_bytes(model) -> int:
    return sum(sub.P.nbytes for m in model.modules() if isinstance(m, SubspaceExperts) for sub in m.subspaces)


def _step(model, optimizer, batch) -> float:
    """One ordinary training step; its seconds."""
    t0 = time.perf_counter()
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def _measure_one(entry: dict, args, cfg: dict, tok, batches) -> dict:
    from rso.memory import measure_step
    model, optimizer = _setup(entry["method"], entry["lr"], args, cfg, tok)
    model.train()
    _step(model, optimizer, batches[0])  # the optimizer's states exist from here on (not timed)
    report = measure_step(model, batches[1], optimizer)
    times = [_step(model, optimizer, batch) for batch in batches[2:]]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"method": entry["name"], "trainable_params": trainable, "peak_live_MiB": report.peak / 2 ** 20,
            "parameters_MiB": report.parameters / 2 ** 20, "gradients_MiB": report.gradients / 2 ** 20,
            "optimizer_state_MiB": report.optimizer_state / 2 ** 20, "activations_MiB": report.activations / 2 ** 20,
            "expert_P_bytes": _p_bytes(model), "median_step_s": statistics.median(times),
            "min_step_s": min(times), "timed_steps": len(times)}


def measure(args) -> int:
    """Per method, on one thread: one warm-up step (the optimizer's states allocated), one step measured by
    ``rso.memory.measure_step``, ``--timed-steps`` timed steps (no resample among them); JSON to ``--out``."""
    from rso.train.data import build_pretraining_data, default_cache_dir
    from rso.train.compare import display, parse_entry
    install_methods()
    torch.set_num_threads(1)
    cfg = dict(MODEL, training=dict(MODEL["training"], _name="qwen3-moe-tiny"))
    tr = cfg["training"]
    tok, loader, _ = build_pretraining_data("embedded", tr["tokenizer"], tr["seq_len"], tr["total_batch_size"], 0,
                                            default_cache_dir(), 0.02, None, "text", log=print)
    batches = [{"input_ids": b, "labels": b} for b in (loader.next_batch() for _ in range(args.timed_steps + 2))]
    rows = [_measure_one(parse_entry(e), args, cfg, tok, batches) for e in args.methods.split(",") if e]
    meta = {"command": display([sys.executable, "-m", "rso.train.bench.moe", *args.argv]), "threads": 1,
            "batch": f"{tr['total_batch_size']} x {tr['seq_len']} tokens", "rank": args.rank, "tau": args.tau,
            "torch": torch.__version__, "peak": "rso.memory.measure_step: peak of live tensors (CPU)"}
    text = json.dumps({**meta, "steps": rows}, indent=2)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")
    print(text)
    return 0


# ----------------------------------------------------------------------------- the P choice
def _variant(row: dict, step: dict, seeds: list[int]) -> dict:
    """One P variant's record: eval loss by seed, mean ± std, measured step time and bytes."""
    by_seed = dict(zip(row["seeds"], row["eval_losses"]))
    return {"variant": row["name"], **{f"seed {s}": by_seed.get(s) for s in seeds}, "mean": row["mean"],
            "std": row["std"], "median_step_s": step["median_step_s"], "min_step_s": step["min_step_s"],
            "expert_P_bytes": step["expert_P_bytes"], "peak_live_MiB": step["peak_live_MiB"]}


def p_choice(args) -> int:
    """Shared P against one P per expert, from ``compare``'s table.json and ``measure``'s JSON; JSON to ``--out``.

    ``paired`` is per-expert − shared eval loss per seed (same data, init and seed), its mean and sample std."""
    from rso.train.compare import mean_std
    table, steps = (json.loads(pathlib.Path(f).read_text()) for f in (args.table, args.step))
    rows = {r["method"]: r for r in table["methods"]}
    timed = {r["method"].partition("_lr")[0]: r for r in steps["steps"]}
    seeds = table["seeds"]
    variants = [_variant(rows[m], timed[m], seeds) for m in ("rso", "rso-per-expert")]
    shared, own = (dict(zip(rows[m]["seeds"], rows[m]["eval_losses"])) for m in ("rso", "rso-per-expert"))
    paired = [own[s] - shared[s] for s in seeds if s in own and s in shared]
    mean, std = mean_std(paired)
    result = {"command": "python -m rso.train.bench.moe " + " ".join(args.argv), "seeds": seeds,
              "paired_difference_per_expert_minus_shared": paired, "paired_mean": mean, "paired_std": std,
              "variants": variants}
    text = json.dumps(result, indent=2)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")
    print(text)
    return 0


# ----------------------------------------------------------------------------- command line
def _seeds(text: str) -> list[int]:
    from rso.train.compare import parse_seeds
    try:
        return parse_seeds(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _check(p: argparse.ArgumentParser, args) -> None:
    """One-line usage errors, before anything runs: counts ≥ 1 and methods this module knows."""
    from rso.train.compare import parse_entry
    from rso.train.methods import MethodError, parse_method
    for dest in ("max_steps", "eval_every", "eval_batches", "jobs", "timed_steps", "rank", "tau"):
        if getattr(args, dest, 1) < 1:
            p.error(f"--{dest.replace('_', '-')} must be ≥ 1, got {getattr(args, dest)}")
    install_methods()
    for entry in (parse_entry(e) for e in getattr(args, "methods", "").split(",") if e):
        try:
            parse_method(entry["method"])
        except MethodError as e:
            p.error(f"--methods: {e}")
        if entry["lr"] is None:
            p.error(f"--methods: give each entry its learning rate (method=lr), got {entry['name']!r}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # one run: rso.train.pretrain with this module's methods
        from rso.train import pretrain
        install_methods()
        return pretrain.main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m rso.train.bench.moe", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("compare", "measure"):
        s = sub.add_parser(name)
        s.add_argument("--methods", default=DEFAULT_METHODS)
        s.add_argument("--rank", type=int, default=MODEL["training"]["rank"])
        s.add_argument("--tau", type=int, default=MODEL["training"]["tau"])
    c = sub.choices["compare"]
    c.add_argument("--output-dir", default="runs/moe")
    c.add_argument("--max-steps", type=int, default=300)
    c.add_argument("--seeds", type=_seeds, default=[0, 1, 2])
    c.add_argument("--eval-every", type=int, default=50)
    c.add_argument("--eval-batches", type=int, default=24)
    c.add_argument("--jobs", type=int, default=2)
    c.add_argument("--resume", action="store_true")
    m = sub.choices["measure"]
    m.add_argument("--timed-steps", type=int, default=20)
    m.add_argument("--out", default=None, help="write the JSON here")
    pc = sub.add_parser("p-choice", help="shared P against one P per expert, from compare's and measure's JSON")
    pc.add_argument("--table", required=True, help="compare's table.json")
    pc.add_argument("--step", required=True, help="measure's JSON")
    pc.add_argument("--out", default=None, help="write the JSON here")
    sub.add_parser("train", help="one rso.train.pretrain run with this module's methods (its own flags)")
    args = p.parse_args(argv)
    args.argv = argv
    _check(p, args)
    return {"compare": compare, "measure": measure, "p-choice": p_choice}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
