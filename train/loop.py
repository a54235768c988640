"""The one training loop of ``rso.train.pretrain``, ``rso.train.finetune`` and ``rso.train.distributed``, and the
pieces around it.

One job each: the command line (the common options, ``--config-file``, a parser whose errors are one line and
whose arguments are checked before any data is read, ``main``'s handling of user errors, what ``--resume``
keeps and what it lets change), device and autocast, the method's options, when a periodic action is
due, gradient accumulation, the optimizer step, the progress record (``metrics.jsonl`` and the tqdm
bar), ``--stop-after``, and the session (:func:`start_session`) its loop (:func:`train_loop`) runs; a
process group enters as :class:`Parallel` components. The parsed flags become a ``config.RunConfig``;
saving and restoring a run is in ``rso.train.checkpoint``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import pathlib
import re
import sys
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from rso.state_policy import STATE_POLICIES
from rso.trust import CheckpointRefused
from rso.layers.quantized import KINDS, MERGE_MODES
from rso.projections import SAMPLERS
from rso.wrapping import rank_for_layer

from .checkpoint import CHECKPOINT_NAME, CheckpointError, find_checkpoint, restore_run, save_run
from .config import RUN_TOML, ConfigFileError, RunConfig, load_toml, to_toml
from .data import DataError
from .methods import (OPTION_PURPOSE, MethodError, MethodOptions, check_optimizer, check_subspace_state,
                      enable_activation_checkpointing, is_bitsandbytes, methods_with, option_applies, parse_method,
                      supports_activation_checkpointing)
from .metrics import IntervalLoss, MetricsLog, Throughput, memory_label, memory_mb
from .models import ConfigError
from .schedule import cosine_schedule, resize

__all__ = ["UsageError", "Parser", "given_options", "rank_value", "check_args", "check_method_options",
           "check_distributed", "check_rank", "check_checkpointing",
           "apply_activation_checkpointing", "add_optimizer_args",
           "add_session_args", "add_runtime_args", "cli_main", "resume_args", "write_run_toml", "resume_schedule",
           "steps_for_epochs",
           "fill_step_defaults", "setup_device", "method_options", "eval_mode", "due", "accumulate_gradients",
           "optimizer_step", "Progress", "stop_early", "Parallel", "Session", "start_session", "train_loop",
           "LoopResult"]


# ----------------------------------------------------------------------------- command line
class UsageError(ValueError):
    """A command-line argument that cannot work; ``cli_main`` prints it as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """The entry points' parser: an error raises :class:`UsageError` (one line, no usage text); parsed
    arguments are checked (:func:`check_args`) and carry ``given``, the options set on the command line."""

    def error(self, message):
        raise UsageError(re.sub(r"^argument ([^:]+): ", r"\1: ", message))

    def parse_known_args(self, args=None, namespace=None):
        file = _config_file(args)
        if file is not None and namespace is None:  # the file's values replace the defaults; flags win over them
            dests = {a.dest for a in self._actions}
            try:
                namespace = argparse.Namespace(**load_toml(file, dests))
            except ConfigFileError as e:
                raise UsageError(str(e)) from None
        parsed, rest = super().parse_known_args(args, namespace)
        parsed.given = given_options(self, args)
        check_args(parsed)
        return parsed, rest


def _config_file(argv) -> str | None:
    """The ``--config-file`` of ``argv`` (default: ``sys.argv[1:]``), if any."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config-file", default=None)
    return pre.parse_known_args(sys.argv[1:] if argv is None else list(argv))[0].config_file


def given_options(parser: argparse.ArgumentParser, argv=None) -> tuple[str, ...]:
    """The destinations ``argv`` (default: ``sys.argv[1:]``) sets: parsed again by a copy of ``parser``
    whose defaults are all ``SUPPRESS``, so that only the options on the command line appear."""
    bare = copy.deepcopy(parser)
    bare._defaults = {}  # set_defaults()
    for action in bare._actions:
        action.default = argparse.SUPPRESS
    parsed, _ = argparse.ArgumentParser.parse_known_args(bare, argv)
    return tuple(sorted(vars(parsed)))


#: Smallest value of each integer option (of any entry point); an unset (None) option is not checked.
INT_MIN = {"tau": 1, "batch_size": 1, "grad_accum": 1, "seq_len": 1, "max_length": 1, "max_steps": 1,
           "warmup": 0, "eval_every": 1, "eval_batches": 1, "save_every": 1, "log_every": 1, "max_docs": 2,
           "max_train": 1, "max_eval": 1, "threads": 1, "stop_after": 1, "synthetic_tokens": 2}
#: Allowed range of each float option (finite in any case).
FLOAT_RANGE = {"lr": ("> 0", lambda v: v > 0), "scale": ("> 0", lambda v: v > 0), "epochs": ("> 0", lambda v: v > 0),
               "weight_decay": ("≥ 0", lambda v: v >= 0), "grad_clip": ("≥ 0 (0: off)", lambda v: v >= 0),
               "min_lr_ratio": ("in [0, 1]", lambda v: 0 <= v <= 1),
               "eval_fraction": ("in (0, 1)", lambda v: 0 < v < 1)}


RANK_FORMS = "an integer ≥ 1, or (rso only) a fraction in (0, 1) of each layer's input width: 0.25 or 1/4"


def _is_rank(value) -> bool:
    """An int ≥ 1 or a float in (0, 1): the values ``--rank`` takes."""
    return isinstance(value, int) and value >= 1 or isinstance(value, float) and 0 < value < 1


def rank_value(text: str) -> int | float:
    """``--rank``: an int ≥ 1 (every layer's rank) or a float in (0, 1), written ``0.25`` or ``1/4``: layer i
    gets rank max(1, round(fraction · in_featuresᵢ)), as ``rso.wrap(rank=fraction)`` does."""
    try:
        if "/" in text:
            num, den = (float(part) for part in text.split("/"))
            value = num / den
        else:
            value = int(text) if text.strip().lstrip("+-").isdigit() else float(text)
    except (ValueError, ZeroDivisionError):
        value = None
    if _is_rank(value):
        return value
    raise argparse.ArgumentTypeError(f"give {RANK_FORMS}; got {text!r}")


def option_flag(dest: str) -> str:
    """The command-line flag of argparse destination ``dest`` (``max_steps`` -> ``--max-steps``)."""
    return "--" + dest.replace("_", "-")


def check_args(args) -> None:
    """A UsageError naming the option for any value that cannot work: numbers out of range, an unknown
    ``--method``, ``--projection``, ``--optimizer`` (or one the method cannot use) or ``--device``, a flag given
    for a method that does not read it (:func:`check_method_options`), a ``--parallel`` that cannot run the run."""
    for dest, low in INT_MIN.items():
        value = getattr(args, dest, None)
        if value is not None and value < low:
            raise UsageError(f"{option_flag(dest)} must be ≥ {low}, got {value}")
    for dest, (allowed, ok) in FLOAT_RANGE.items():
        value = getattr(args, dest, None)
        if value is not None and not math.isfinite(value):
            raise UsageError(f"{option_flag(dest)} must be a finite number, got {value}")
        if value is not None and not ok(value):
            raise UsageError(f"{option_flag(dest)} must be {allowed}, got {value}")
    rank = getattr(args, "rank", None)
    if rank is not None and not _is_rank(rank):
        raise UsageError(f"--rank: give {RANK_FORMS}; got {rank!r}")
    if hasattr(args, "method"):
        try:
            method, _ = parse_method(args.method)
        except MethodError as e:
            raise UsageError(f"--method: {e}") from None
        try:
            check_subspace_state(method, getattr(args, "subspace_state", None), args.method)
        except MethodError as e:
            raise UsageError(str(e)) from None
        check_method_options(args)
        if getattr(args, "requantize", None) and not getattr(args, "quantize", None) and not args.resume:
            raise UsageError(f"--requantize {args.requantize} rounds a quantized W₀ at each merge: give --quantize "
                             "int8 | nf4 with it, or leave it out")
        if isinstance(rank, float) and method != "rso":
            raise UsageError(f"--rank {rank:g}: a fraction of each layer's input width is for --method rso only; "
                             f"{args.method} takes an integer rank")
        try:
            check_optimizer(method, args.optimizer)
        except MethodError as e:
            raise UsageError(f"--optimizer: {e}") from None
    check_distributed(args)
    if getattr(args, "projection", None) is not None and args.projection not in SAMPLERS:
        raise UsageError(f"--projection: unknown projection {args.projection!r}; choose one of: "
                         f"{', '.join(sorted(SAMPLERS))}")
    if getattr(args, "device", None):
        try:
            device = torch.device(args.device)
        except RuntimeError as e:
            raise UsageError(f"--device: {e}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: CUDA is not available on this machine")


def _flag_text(dest: str, value) -> str:
    """The flag of ``dest`` as given with ``value``: ``--no-share-projections``, ``--rank 0.25``, ``--tau 5``."""
    flag = option_flag(dest)
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    return f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}"


def check_method_options(args) -> None:
    """A UsageError for the first option given on the command line (``args.given``) that ``--method`` does not
    read (``methods.METHOD_OPTIONS``): it names the flag, the methods it is for, and the method."""
    for dest in getattr(args, "given", ()):
        if not option_applies(dest, args.method):
            raise UsageError(f"{_flag_text(dest, getattr(args, dest))} is for --method {', '.join(methods_with(dest))} "
                             f"only ({OPTION_PURPOSE[dest]}); {args.method} has none to set: leave it out")


def check_distributed(args, settled: bool = False) -> None:
    """``rso.train.distributed``: a UsageError for a ``--parallel`` that cannot run the method or optimizer, for
    ``--reshard-after-forward`` given without ``--parallel fsdp`` (DDP has nothing to reshard), and for
    ``--synthetic-tokens`` given without ``--dataset synthetic`` (with ``--resume``, once the run's settings are
    ``settled``: the dataset may be the checkpoint's)."""
    given, parallel = getattr(args, "given", ()), getattr(args, "parallel", None)
    dataset_known = settled or "dataset" in given or not args.resume
    if "synthetic_tokens" in given and args.dataset != "synthetic" and dataset_known:
        raise UsageError(f"--synthetic-tokens is for --dataset synthetic only; --dataset {args.dataset} reads its "
                         "own text: leave it out")
    if parallel == "fsdp" and is_bitsandbytes(getattr(args, "optimizer", "")):
        raise UsageError(f"--optimizer {args.optimizer}: bitsandbytes' 8-bit optimizers cannot step FSDP2's sharded "
                         "(DTensor) parameters; use --parallel ddp")
    if parallel == "fsdp" and parse_method(args.method)[0] in ("galore", "golore", "golore@"):
        raise UsageError(f"--method {args.method} projects whole weight gradients (SVD / P·G), which FSDP2 shards; "
                         "use --parallel ddp for the GaLore family")
    if parallel == "fsdp" and getattr(args, "quantize", None):
        raise UsageError(f"--quantize {args.quantize}: FSDP2 does not shard a quantized base (rso's W₀ or QLoRA's "
                         "bitsandbytes layers); use --parallel ddp")
    if parallel is not None and parallel != "fsdp" and "reshard_after_forward" in given:
        raise UsageError(f"--reshard-after-forward is for --parallel fsdp only; --parallel {parallel} has nothing "
                         "to reshard: leave it out")


def check_rank(args, cfg: dict | None) -> None:
    """A UsageError if ``--rank`` (an int, or a fraction of each layer's input width) gives a block linear
    layer of the model that ``cfg`` (a ``transformers`` config dict; None: unknown) describes a rank above
    its smaller dimension, or a fraction that rounds to 0 channels."""
    if cfg is None or "hidden_size" not in cfg or parse_method(args.method)[0] == "adamw":
        return
    dims = {"hidden_size": cfg["hidden_size"]}
    if "intermediate_size" in cfg:
        dims["intermediate_size"] = cfg["intermediate_size"]
    if cfg.get("num_key_value_heads") and cfg.get("num_attention_heads"):
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        dims["key/value width"] = cfg["num_key_value_heads"] * head_dim
    if isinstance(args.rank, float):  # a fraction: each block layer (in → out) gets round(rank · in) ≤ min(in, out)
        hidden, inner, kv = dims["hidden_size"], dims.get("intermediate_size"), dims.get("key/value width")
        shapes = [(hidden, hidden)] + [(hidden, kv)] * bool(kv) + [(hidden, inner), (inner, hidden)] * bool(inner)
        for n_in, n_out in shapes:
            layer_rank = rank_for_layer(args.rank, n_in)
            if round(args.rank * n_in) < 1:  # rso.wrap would make it rank 1: not the fraction asked for
                raise UsageError(f"--rank {args.rank:g} gives the model's {n_in} → {n_out} linear layers "
                                 f"{args.rank * n_in:.3g} channels, which rounds to 0; give a fraction ≥ "
                                 f"{1 / n_in:.3g} (one channel) or an integer rank")
            if layer_rank > min(n_in, n_out):
                raise UsageError(f"--rank {args.rank:g} gives rank {layer_rank} to the model's {n_in} → {n_out} "
                                 f"linear layers, more than their smaller dimension {min(n_in, n_out)}")
        return
    name, smallest = min(dims.items(), key=lambda item: item[1])
    if args.rank > smallest:
        raise UsageError(f"--rank {args.rank} is larger than the model's smallest linear layer dimension "
                         f"({name} {smallest})")


def check_checkpointing(c: RunConfig, cfg: dict | None) -> None:
    """A UsageError if ``--activation-checkpointing`` is asked for a model type (``cfg['model_type']``; None:
    unknown, checked once the model is built) whose ``transformers`` class cannot checkpoint its blocks."""
    if not c.runtime.activation_checkpointing or not cfg:
        return
    if supports_activation_checkpointing(cfg.get("model_type")) is False:
        raise UsageError(f"--activation-checkpointing: {cfg['model_type']} models do not support activation "
                         "checkpointing in transformers")


def apply_activation_checkpointing(c: RunConfig, model, log=None):
    """``--activation-checkpointing``: checkpoint every decoder block of ``model`` (after the method's set-up)."""
    if not c.runtime.activation_checkpointing:
        return model
    try:
        enable_activation_checkpointing(model)
    except MethodError as e:
        raise UsageError(f"--activation-checkpointing: {e}") from None
    if log is not None:
        log("activation checkpointing: each decoder block keeps only its input and is recomputed in the backward pass")
    return model


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


#: Optimizer keywords that have flags of their own (the flag is what the run records, prints and schedules).
_OWN_FLAGS = {"lr": "--lr", "weight_decay": "--weight-decay"}


def _optimizer_args(text: str) -> dict:
    """``--optimizer-args``: a JSON object of extra optimizer keywords, none of those that have a flag."""
    value = _json_object(text)
    taken = [f"{k} (use {_OWN_FLAGS[k]})" for k in value if k in _OWN_FLAGS]
    if taken:
        raise argparse.ArgumentTypeError(f"sets {', '.join(taken)}: those have flags of their own")
    return value


def add_optimizer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--optimizer", default="adamw",
                   help="any torch.optim or torch_optimizer class by name, or adamw8bit / adam8bit (bitsandbytes)")
    p.add_argument("--optimizer-args", type=_optimizer_args, default="{}",
                   help='extra optimizer keywords as a JSON object, e.g. \'{"momentum": 0.9}\'')
    p.add_argument("--subspace-state", choices=STATE_POLICIES, default=None,
                   help="the optimizer state of a projected weight when its subspace changes: reset (delete), keep, "
                        "or project (map the moments to the new subspace) (default: reset for rso, as in the RSO "
                        "paper; keep for galore, golore and golore@X, as galore-torch)")
    p.add_argument("--share-projections", action=argparse.BooleanOptionalAction, default=True,
                   help="rso: layers that read the same input (q/k/v, gate/up) share one P and one stored P·x "
                        "(default); --no-share-projections gives each layer its own P (for svd / hybrid: from its "
                        "own gradient) at the cost of one stored P·x per layer")
    p.add_argument("--quantize", choices=KINDS, default=None,
                   help="rso: store each wrapped layer's frozen W₀ as bitsandbytes int8 (rows) or NF4 (blocks of 64), "
                        "requantized at each merge; lora: QLoRA, the adapters on a base read by transformers' "
                        "bitsandbytes loader in that format (default: the base in the model's dtype)")
    p.add_argument("--requantize", choices=MERGE_MODES, default=None,
                   help="rso with --quantize: how a merge rounds W₀′ = deq(W₀) + s·B P back to the format: nearest, "
                        "stochastic, or stochastic+feedback (the rounding residual the next subspace can hold starts "
                        "the next B) (default: nearest)")


def add_session_args(p: argparse.ArgumentParser, output_dir: str) -> None:
    """Checkpoint and log cadence, the output folder, ``--resume`` and ``--stop-after``."""
    p.add_argument("--save-every", type=int, default=None, help="steps between checkpoints (default: eval-every)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--output-dir", default=output_dir)
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in --output-dir with its saved settings; a larger --max-steps "
                        "extends it")
    p.add_argument("--stop-after", type=int, default=None,
                   help="end this session after N more steps (as if killed); --resume continues")


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """Cache folder, device, precision, CPU threads, compilation and the progress bar."""
    p.add_argument("--cache-dir", default=None, help="tokenizer/token cache (default: $RSO_CACHE or ~/.cache/rso-train)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="autocast dtype on GPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--compile", action="store_true",
                   help="train through torch.compile(model) (the first step compiles; evaluation stays eager)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="keep only each decoder block's input and recompute the block in the backward pass "
                        "(non-reentrant torch.utils.checkpoint; same gradients, about a third more compute)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--config-file", default=None, metavar="TOML",
                   help="read the options from a TOML file (sections model, data, optimizer, rso, training, "
                        "checkpoint, logging, runtime, as the run.toml a run writes); flags win over it")


def cli_main(run, parser: argparse.ArgumentParser, argv=None) -> int:
    """Parse ``argv`` and ``run`` it; a user error (arguments, config, data, method, checkpoint) prints one
    line ``error: ...`` to stderr, exit status 2."""
    try:
        run(RunConfig.from_namespace(parser.parse_args(argv)))
    except (UsageError, ConfigError, DataError, MethodError, CheckpointError, CheckpointRefused) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


# ----------------------------------------------------------------------------- --resume
def steps_for_epochs(epochs: float, steps_per_epoch: int) -> int:
    """Optimizer steps for ``--epochs``."""
    return max(1, math.ceil(epochs * steps_per_epoch))


def _show(value) -> str:
    return json.dumps(value) if isinstance(value, dict) else str(value)


def _same(dest: str, given, saved) -> bool:
    if dest == "method":
        return parse_method(given) == parse_method(saved)
    if dest == "optimizer":
        return given.lower() == saved.lower()
    return given == saved


def resume_args(c: RunConfig, saved: dict, step: int, log, exempt: tuple[str, ...] = ()) -> None:
    """``--resume`` at ``step``: set ``c``'s saved fields (:meth:`RunConfig.saved`, less ``exempt``) to the saved
    run's values ``saved``, except its length.

    A flag in ``c.given`` whose field is an identity field (``config.IDENTITY``) and differs from the saved value
    is a UsageError. ``--max-steps`` (or ``--epochs``, with the saved ``steps_per_epoch``) sets a new length, at
    least ``step``; ``subspace_total_steps`` (the GoLore / hybrid switch) stays the saved one. Every other saved
    setting wins over a given flag; a given flag the saved method does not read is a UsageError. Logs the settings
    the run goes on with, and the given flags that lost.
    """
    identity = set(c.names("identity")) - set(exempt)
    run_args = [n for n in c.saved() if n not in exempt and n in saved]
    lost = []
    for dest in run_args:
        value = c.get(dest)
        if dest in c.given and dest in ("max_steps", "epochs"):
            continue
        if dest in c.given and not _same(dest, value, saved[dest]):
            if dest in identity:
                raise UsageError(f"{option_flag(dest)} {_show(value)} differs from the saved run's {dest} {saved[dest]!r} "
                                 "(a resumed run keeps its identity; use a new --output-dir)")
            lost.append(f"{option_flag(dest)} {_show(value)} (kept {saved[dest]!r})")
        c.set(dest, saved[dest])
    _resume_length(c, saved, step)
    c.training.subspace_total_steps = saved.get("subspace_total_steps", saved["max_steps"])  # older: saved length
    settled = argparse.Namespace(**{n: c.get(n) for n in c.options}, given=c.given)  # the parse-time checks again
    check_method_options(settled)  # the given flags against the saved method (parsing assumed the default one)
    check_distributed(settled, settled=True)

    def setting(dest):
        text = f"{dest} {_show(c.get(dest))}"
        return text + (f" (saved {saved[dest]})" if dest == "max_steps" and c.get(dest) != saved[dest] else "")

    log(f"--resume: continuing at step {step} with the saved settings: "
        f"{', '.join(setting(dest) for dest in run_args)}")
    if lost:
        log(f"--resume: the saved settings win over {', '.join(lost)}")


def _resume_length(c: RunConfig, saved: dict, step: int) -> None:
    """``--max-steps`` / ``--epochs`` given with ``--resume``: the new length, refused below ``step``."""
    asked = None
    if "max_steps" in c.given:
        asked = f"--max-steps {c.training.max_steps}"
    elif "epochs" in c.given:
        if "steps_per_epoch" not in saved:
            raise UsageError("--epochs: this checkpoint predates saved epoch lengths; give --max-steps instead")
        c.training.max_steps = steps_for_epochs(c.training.epochs, saved["steps_per_epoch"])
        asked = f"--epochs {c.training.epochs:g} ({c.training.max_steps} steps)"
    if asked is not None and c.training.max_steps < step:
        raise UsageError(f"{asked} is below the saved run's step {step} (a resumed run goes on from there; "
                         "use a new --output-dir to start over)")


def write_run_toml(c: RunConfig, out: pathlib.Path) -> pathlib.Path:
    """``<out>/run.toml``: the run's flags in sections; ``--config-file`` reads it back."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / RUN_TOML
    path.write_text(to_toml(c))
    return path


#: The settings that say what a run trained, in its ``results.json``. The comparison runners reuse a finished
#: run only when they match what its command means now (a changed default changes the meaning).
RUN_SETTINGS = ("method", "projection", "rank", "tau", "scale", "lr", "seed")


def run_settings(c: RunConfig) -> dict:
    """:data:`RUN_SETTINGS` of the resolved config; the projection is None for a method other than RSO."""
    c = RunConfig.from_namespace(c)
    settings = {k: c.get(k) for k in RUN_SETTINGS}
    if parse_method(c.rso.method)[0] != "rso":
        settings["projection"] = None
    return settings


def resume_schedule(scheduler, c: RunConfig, step: int, log) -> None:
    """After restoring a run at ``step`` whose length ``--resume`` changed: rebuild its cosine schedule for
    ``c.training.max_steps`` (``schedule.resize``) and say so, with the LR at ``step`` under both schedules."""
    max_steps, total = c.training.max_steps, c.training.subspace_total_steps
    change = resize(scheduler, max_steps)
    if change is None:
        return
    old, before, after = change
    line = (f"--resume: the run {'extends' if max_steps > old else 'shortens'} from {old} to {max_steps} "
            f"steps; the cosine LR schedule is rebuilt for {max_steps} steps: LR at step {step} {before:.4g} "
            f"on the old schedule, {after:.4g} on the new one")
    name, extra = parse_method(c.rso.method)
    if name == "golore@" or (name == "rso" and c.rso.projection == "hybrid"):
        fraction = extra.get("random_fraction", MethodOptions.random_fraction)
        switch = int(round((1 - fraction) * total))
        line += (f"; the switch from SVD to random projections stays at step {switch}, placed in the original "
                 f"{total} steps")
    log(line)


# ----------------------------------------------------------------------------- set-up
def fill_step_defaults(c: RunConfig, warmup: int, evals_per_run: int) -> None:
    """Fill ``--warmup``, ``--eval-every`` (``evals_per_run`` evaluations), ``--save-every`` (= eval-every) and
    ``subspace_total_steps`` (the length the GoLore / hybrid switch is placed in: ``--max-steps``) if unset."""
    t = c.training
    if t.subspace_total_steps is None:
        t.subspace_total_steps = t.max_steps
    if c.optimizer.warmup is None:
        c.optimizer.warmup = warmup
    if c.logging.eval_every is None:
        c.logging.eval_every = max(1, t.max_steps // evals_per_run)
    if c.checkpoint.save_every is None:
        c.checkpoint.save_every = c.logging.eval_every


def setup_device(c: RunConfig) -> tuple[torch.device, bool, Callable]:
    """Apply ``--threads``; (device, whether bf16 autocast is on, a fresh autocast context per call)."""
    if c.runtime.threads:
        torch.set_num_threads(c.runtime.threads)
    device = torch.device(c.runtime.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    use_bf16 = device.type == "cuda" and c.training.dtype == "bf16"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    return device, use_bf16, autocast


def method_options(c: RunConfig, **entry_point_options) -> MethodOptions:
    """The method's options from the shared flags, plus those only one entry point sets; the GoLore / hybrid
    switch is placed in ``subspace_total_steps`` (a resumed run's original length)."""
    r, o = c.rso, c.optimizer
    return MethodOptions(rank=r.rank, tau=r.tau, scale=r.scale, lr=o.lr, weight_decay=o.weight_decay,
                         optimizer=o.optimizer, optimizer_args=dict(o.optimizer_args), projection=r.projection,
                         total_steps=c.training.subspace_total_steps, seed=c.training.seed,
                         subspace_state=r.subspace_state, share_projections=r.share_projections,
                         quantize=r.quantize, requantize=r.requantize, **entry_point_options)


@contextlib.contextmanager
def eval_mode(model):
    """``model.eval()`` inside the block; the previous train/eval mode after it."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------- the loop
def due(step: int, every: int, max_steps: int) -> bool:
    """Whether a periodic action (log, eval, save) runs after ``step``: every ``every`` steps and at the end."""
    return step % every == 0 or step == max_steps


def accumulate_gradients(model, micro_batches: list[dict], device, autocast, sync=None) -> float:
    """Forward and backward each micro-batch (the model's inputs, moved to ``device``), its loss divided by
    their number so that the gradients add up to the step's mean; returns the step's loss. ``sync(last)``: a
    context for a micro-batch's passes that lets only the last one reduce gradients across processes."""
    loss_sum = 0.0
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        with sync(i == len(micro_batches) - 1) if sync else contextlib.nullcontext():
            with autocast():
                loss = model(**batch).loss / len(micro_batches)
            loss.backward()
        loss_sum += loss.item()
    return loss_sum


def optimizer_step(loss: float, step: int, params, grad_clip: float, optimizer, scheduler) -> tuple[torch.Tensor, float]:
    """Step ``step`` (1-based) after its backward passes: clip the gradients (``grad_clip`` 0: off), step the
    optimizer and the LR schedule, clear the gradients. Returns (gradient norm, LR used); a non-finite ``loss`` raises."""
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} at step {step}; lower --lr")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: a DTensor
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr


class Progress:
    """What a session reports as it trains: records in ``<out>/metrics.jsonl`` (on resume, those past the
    checkpoint's step dropped), the tqdm bar, and throughput and memory with each training record."""

    def __init__(self, out: pathlib.Path, device: torch.device, step: int, resumed: bool, c: RunConfig, desc: str,
                 writer: bool = True):
        if resumed and writer:
            tqdm.write(f"resumed from {out / CHECKPOINT_NAME} at step {step}")
        self.writer = writer  # one process of a process group writes the records
        self.echo = False  # also print each training record (torchrun's logs, which have no bar)
        self.metrics = MetricsLog(out / "metrics.jsonl", resume_step=step if resumed else None) if writer else None
        self.device = device
        self.memory_key = memory_label(device)
        self.bar = tqdm(total=c.training.max_steps, initial=step, desc=desc, dynamic_ncols=True,
                        disable=c.logging.no_progress,
                        file=sys.stderr)
        self.throughput = Throughput()
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since this session's progress began."""
        return time.perf_counter() - self.started

    def log_train(self, step: int, loss: float, lr: float, new_tokens: int, **extra) -> None:
        """A training record (``extra`` after the LR); ``new_tokens``: tokens trained on since the last one."""
        tokens_per_s, mem = self.throughput(new_tokens), memory_mb(self.device)
        if self.metrics is None:
            return
        record = {"step": step, "loss": loss, "lr": lr, **extra, "tokens_per_s": round(tokens_per_s, 1),
                  self.memory_key: round(mem, 1), "elapsed_s": round(self.elapsed(), 2)}
        self.metrics.log(record)
        if self.echo:
            tqdm.write(json.dumps(record))
        self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", mem=f"{mem:,.0f}MB", refresh=False)

    def log_eval(self, step: int, result: dict, line: str) -> None:
        """An evaluation record and its log line; its time does not count as training throughput."""
        if self.metrics is not None:
            self.metrics.log({"step": step, **result})
            tqdm.write(line)
        self.throughput(0)


def stop_early(c: RunConfig, step: int, start_step: int, progress: Progress) -> bool:
    """``--stop-after N``: once this session has run N steps short of the end, close the bar, say so, return True."""
    after = c.checkpoint.stop_after
    if after is None or step - start_step < after or step >= c.training.max_steps:
        return False
    progress.bar.close()
    if progress.writer:
        tqdm.write(f"stopped after {after} steps at step {step} (--stop-after); last checkpoint: "
                   f"{pathlib.Path(c.checkpoint.output_dir) / CHECKPOINT_NAME}")
    return True


# ----------------------------------------------------------------------------- the session and its loop
@dataclasses.dataclass
class Parallel:
    """How a session runs on its process group (defaults: one process). ``train_model`` runs forward and backward
    (a DDP wrapper, or the model); ``sync(last)`` lets only a step's last micro-batch reduce gradients;
    ``reduce_loss`` averages a loss over the processes; ``model_state`` / ``optimizer_state`` give and take the
    full (unsharded) states a checkpoint holds; only the ``writer`` writes files (and prints the training records,
    if ``echo``)."""
    train_model: torch.nn.Module | None = None
    sync: Callable | None = None
    reduce_loss: Callable[[float], float] = float
    model_state: object = None
    optimizer_state: object = None
    writer: bool = True
    world: int = 1
    echo: bool = False


@dataclasses.dataclass
class Session:
    """One training session: the run's pieces, where it starts (``step``), and what its checkpoint adds (``extra``)."""
    c: RunConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    data: object  # the training data's position: state_dict() / load_state_dict()
    device: torch.device
    autocast: Callable
    progress: Progress
    train_loss: IntervalLoss
    step: int
    resumed: bool
    extra: dict
    parallel: Parallel

    @property
    def params(self) -> list:
        return [p for p in self.model.parameters() if p.requires_grad]

    def save(self, step: int) -> None:
        """``checkpoint.pt`` (the one format: full states, whatever the process group); collective."""
        model, optimizer = self.parallel.model_state, self.parallel.optimizer_state
        if self.parallel.writer:
            save_run(pathlib.Path(self.c.checkpoint.output_dir), step, model, optimizer, self.scheduler,
                     self.data, self.train_loss, self.c.saved(), **self.extra)
        else:  # the states' gathers are collectives: every process takes part
            model.state_dict(), optimizer.state_dict()


def start_session(c: RunConfig, ckpt: dict | None, model, optimizer, data, device, autocast, *, min_lr_ratio: float,
                  desc: str, log, extra: dict | None = None, parallel: Parallel | None = None) -> Session:
    """The LR schedule, the checkpoint ``ckpt`` (if resuming) restored into the pieces, the progress record and
    ``run.toml`` written beside the checkpoint."""
    if ckpt is None and find_checkpoint(c.checkpoint.output_dir) is not None:
        raise CheckpointError(f"{c.checkpoint.output_dir} holds the checkpoint of an earlier run, which this run would "
                              f"overwrite: --resume continues it; a new run needs another --output-dir (or delete "
                              f"{CHECKPOINT_NAME} there)")
    par = parallel or Parallel()
    par.train_model = par.train_model or model
    par.model_state, par.optimizer_state = par.model_state or model, par.optimizer_state or optimizer
    scheduler = cosine_schedule(optimizer, c.optimizer.warmup, c.training.max_steps, min_lr_ratio)
    train_loss = IntervalLoss()
    step = restore_run(ckpt, par.model_state, par.optimizer_state, scheduler, data, train_loss)
    if ckpt is not None:
        resume_schedule(scheduler, c, step, log)
    out = pathlib.Path(c.checkpoint.output_dir)
    progress = Progress(out, device, step, resumed=ckpt is not None, c=c, desc=desc, writer=par.writer)
    progress.echo = par.echo
    if par.writer:
        write_run_toml(c, out)
    return Session(c, model, optimizer, scheduler, data, device, autocast, progress, train_loss, step,
                   ckpt is not None, extra or {}, par)


@dataclasses.dataclass
class LoopResult:
    step: int
    stopped: bool  # --stop-after ended the session
    last_eval: tuple[int, dict] | None
    step_times: list[float]
    losses: list[float]  # this session's, one per step


def _tokens(batch: dict) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def train_loop(s: Session, micro_batches: Callable[[], list[dict]], evaluate: Callable[[int], dict],
               log_fields: Callable[[int, float, float], dict], save_on_stop: bool = False) -> LoopResult:
    """The one training loop: each step forward/backward over ``micro_batches()`` (accumulated), clip, optimizer
    and LR step; every ``--log-every`` steps a record (``log_fields(step, grad_norm, seconds per step)`` added),
    every ``--eval-every`` ``evaluate(step)``, every ``--save-every`` a checkpoint (each also at the end);
    ``--stop-after`` ends the session early (as if killed; ``save_on_stop``: with a checkpoint, as a preemption
    would)."""
    c, step, start = s.c, s.step, s.step
    last_eval, tokens, step_times, losses, interval_time = None, 0, [], [], IntervalLoss()
    par = s.parallel
    step_model = torch.compile(par.train_model) if c.runtime.compile else par.train_model
    params, max_steps = s.params, c.training.max_steps
    s.model.train()
    while step < max_steps:
        t0 = time.perf_counter()
        batches = micro_batches()
        tokens += sum(_tokens(b) for b in batches) * par.world
        loss_sum = par.reduce_loss(accumulate_gradients(step_model, batches, s.device, s.autocast, par.sync))
        grad_norm, lr = optimizer_step(loss_sum, step + 1, params, c.optimizer.grad_clip, s.optimizer, s.scheduler)
        step += 1
        s.train_loss.add(loss_sum)
        losses.append(loss_sum)
        step_times.append(time.perf_counter() - t0)
        interval_time.add(step_times[-1])
        if due(step, c.logging.log_every, max_steps):
            s.progress.log_train(step, s.train_loss.pop_mean(), lr, tokens,
                                 **log_fields(step, float(grad_norm), interval_time.pop_mean()))
            tokens = 0
        s.progress.bar.update(1)
        if due(step, c.logging.eval_every, max_steps):
            last_eval = (step, evaluate(step))
        saved = due(step, c.checkpoint.save_every, max_steps)
        if saved:
            s.save(step)
        if stop_early(c, step, start, s.progress):
            if save_on_stop and not saved:
                s.save(step)
            return LoopResult(step, True, last_eval, step_times, losses)
    s.progress.bar.close()
    return LoopResult(step, False, last_eval, step_times, losses)
