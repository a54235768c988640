"""Typed run configs: one nested dataclass per concern, as torchtitan's ``JobConfig``.

A command line is parsed (``loop.Parser``, optionally on top of ``--config-file run.toml``) and turned into a
:class:`RunConfig` in one place (:meth:`RunConfig.from_namespace`); the training code reads sections
(``c.optimizer.lr``, ``c.rso.rank``), never the argparse Namespace. A field's ``metadata`` says what ``--resume``
does with it: ``"identity"`` (saved; another value given on the command line is refused), ``"saved"`` (saved; the
saved value wins), ``"derived"`` (saved, computed by the run, not a flag) or nothing (this session's: not saved).
A run writes ``run.toml`` (its flags, in sections) beside its checkpoint; ``--config-file`` reads it back.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
import tomllib
from dataclasses import dataclass, field

__all__ = ["ModelConfig", "DataConfig", "OptimizerConfig", "RSOSection", "TrainingConfig", "CheckpointConfig",
           "LoggingConfig", "RuntimeConfig", "RunConfig", "ConfigFileError", "load_toml", "to_toml", "RUN_TOML"]

RUN_TOML = "run.toml"
IDENTITY, SAVED, DERIVED = ({"resume": "identity"}, {"resume": "saved"}, {"resume": "derived"})


def _f(default=None, kind=None):
    return field(default=default, metadata=kind or {})


@dataclass
class ModelConfig:
    config: str | None = _f(None, IDENTITY)      # pretrain: a named config or a JSON file
    model: str | None = _f(None, IDENTITY)       # finetune: minilm | smollm2 | config | HF path
    tokenizer: str | None = _f(None, IDENTITY)


@dataclass
class DataConfig:
    task: str | None = _f(None, IDENTITY)
    dataset: str | None = _f(None, IDENTITY)
    text_field: str | None = _f(None, IDENTITY)
    eval_fraction: float | None = _f(None, IDENTITY)
    max_docs: int | None = _f(None, IDENTITY)
    seq_len: int | None = _f(None, IDENTITY)
    max_length: int | None = _f(None, IDENTITY)
    batch_size: int | None = _f(None, IDENTITY)  # per process
    grad_accum: int | None = _f(None, IDENTITY)
    max_train: int | None = _f(None, IDENTITY)
    val_from_train: int | None = _f(None, IDENTITY)
    max_eval: int | None = _f(None, SAVED)
    synthetic_tokens: int | None = _f(None, IDENTITY)
    global_batch: int | None = _f(None, DERIVED)  # sequences per optimizer step over all processes


@dataclass
class OptimizerConfig:
    optimizer: str = _f("adamw", IDENTITY)
    optimizer_args: dict = field(default_factory=dict, metadata=IDENTITY)
    lr: float | None = _f(None, SAVED)
    weight_decay: float = _f(0.0, SAVED)
    warmup: int | None = _f(None, SAVED)
    min_lr_ratio: float | None = _f(None, SAVED)
    grad_clip: float = _f(1.0, SAVED)


@dataclass
class RSOSection:
    """The training method: ``rso`` or a baseline, and its subspace settings."""
    method: str = _f("rso", IDENTITY)
    projection: str = _f("stiefel", IDENTITY)
    rank: int | float | None = _f(None, IDENTITY)
    tau: int | None = _f(None, IDENTITY)
    scale: float = _f(1.0, IDENTITY)
    subspace_state: str | None = _f(None, IDENTITY)
    share_projections: bool = _f(True, IDENTITY)
    quantize: str | None = _f(None, IDENTITY)
    requantize: str | None = _f(None, IDENTITY)
    freeze_embeddings: bool | None = _f(None, IDENTITY)


@dataclass
class TrainingConfig:
    max_steps: int | None = _f(None, SAVED)
    epochs: float | None = _f(None, SAVED)
    steps_per_epoch: int | None = _f(None, DERIVED)
    subspace_total_steps: int | None = _f(None, DERIVED)  # the length the GoLore / hybrid switch is placed in
    seed: int = _f(0, IDENTITY)
    dtype: str = _f("bf16", SAVED)


@dataclass
class CheckpointConfig:
    output_dir: str = _f("runs/run")
    save_every: int | None = _f(None, SAVED)
    resume: bool = _f(False)
    stop_after: int | None = _f(None)
    keep_best: bool | None = _f(None, IDENTITY)
    no_save_model: bool = _f(False)


@dataclass
class LoggingConfig:
    log_every: int = _f(10, SAVED)
    eval_every: int | None = _f(None, SAVED)
    eval_batches: int | None = _f(None, SAVED)
    no_progress: bool = _f(False)


@dataclass
class RuntimeConfig:
    device: str | None = _f(None)
    threads: int | None = _f(None)
    compile: bool = _f(False)
    activation_checkpointing: bool = _f(False)
    cache_dir: str | None = _f(None)
    parallel: str | None = _f(None)
    reshard_after_forward: int | None = _f(None)
    backend: str | None = _f(None)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "optimizer": OptimizerConfig, "rso": RSOSection,
            "training": TrainingConfig, "checkpoint": CheckpointConfig, "logging": LoggingConfig,
            "runtime": RuntimeConfig}
#: flag destination -> (section, dataclass field)
FIELDS = {f.name: (section, f) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


class ConfigFileError(ValueError):
    """A ``--config-file`` that cannot be read; printed as one line."""


@dataclass
class RunConfig:
    """A run's settings. ``options``: the flags its entry point has; ``given``: those set on the command line."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    rso: RSOSection = field(default_factory=RSOSection)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    options: tuple[str, ...] = ()
    given: tuple[str, ...] = ()

    @classmethod
    def from_namespace(cls, ns) -> "RunConfig":
        """The one place parsed flags become a config (a RunConfig passes through)."""
        if isinstance(ns, RunConfig):
            return ns
        values = {k: v for k, v in vars(ns).items() if k not in ("given", "config_file")}
        unknown = sorted(set(values) - set(FIELDS))
        if unknown:
            raise TypeError(f"RunConfig: no section holds {unknown}; add the field to rso.train.config")
        c = cls(options=tuple(sorted(values)), given=tuple(g for g in getattr(ns, "given", ()) if g in values))
        for name, value in values.items():
            c.set(name, value)
        return c

    def get(self, name: str):
        return getattr(getattr(self, FIELDS[name][0]), name)

    def set(self, name: str, value) -> None:
        setattr(getattr(self, FIELDS[name][0]), name, value)

    def names(self, *kinds: str | None) -> tuple[str, ...]:
        """This entry point's fields (and derived ones) whose ``--resume`` kind is in ``kinds``."""
        def kind(f):
            return f.metadata.get("resume")
        return tuple(n for n, (_, f) in FIELDS.items() if kind(f) in kinds and (n in self.options or kind(f) == "derived"))

    def saved(self) -> dict:
        """What a checkpoint keeps of the run: ``{name: value}`` of its identity, saved and derived fields."""
        return {n: self.get(n) for n in self.names("identity", "saved", "derived")}

    def flat(self) -> dict:
        """``{flag destination: value}`` of this entry point's flags and the derived fields (``args.json``)."""
        return {**{n: self.get(n) for n in self.options}, **self.saved()}

    def sections(self, names=None) -> dict:
        """``{section: {field: value}}`` of ``names`` (default: this entry point's flags)."""
        out, wanted = {}, set(self.options if names is None else names)
        for n in (n for n in FIELDS if n in wanted):  # in the sections' order
            out.setdefault(FIELDS[n][0], {})[n] = self.get(n)
        return out


# ----------------------------------------------------------------------------- TOML
def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else "nan" if math.isnan(value) else repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"to_toml: cannot write {type(value).__name__} {value!r}")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _toml_value(str(key))


def to_toml(c: RunConfig) -> str:
    """The run's flags as TOML sections (session-only flags and unset values, which TOML cannot hold, left out)."""
    session = {"resume", "stop_after", "output_dir"}
    lines = []
    for section, values in c.sections().items():
        kept = {k: v for k, v in values.items() if v is not None and k not in session}
        if kept:
            lines += [f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in kept.items()] + [""]
    return "\n".join(lines)


def load_toml(path: str | pathlib.Path, options) -> dict:
    """``--config-file``: ``{flag destination: value}`` from a TOML file of :data:`SECTIONS`; a section or key
    that is not one of this command's ``options`` is a ConfigFileError (one line)."""
    try:
        data = tomllib.loads(pathlib.Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigFileError(f"--config-file {path}: {' '.join(str(e).split())}") from None
    out = {}
    for section, values in data.items():
        if section not in SECTIONS or not isinstance(values, dict):
            raise ConfigFileError(f"--config-file {path}: unknown section [{section}]; sections are "
                                  f"{', '.join(SECTIONS)}")
        for key, value in values.items():
            if FIELDS.get(key, (None,))[0] != section or key not in options:
                allowed = [n for n, (s, _) in FIELDS.items() if s == section and n in options]
                raise ConfigFileError(f"--config-file {path}: [{section}] {key} is not an option of this command; "
                                      f"[{section}] takes {', '.join(allowed) or 'nothing here'}")
            out[key] = value
    return out
