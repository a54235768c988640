"""``RSOConfig``: the arguments of ``rso.wrap``, defined, validated and documented in one place.

A wrapped model's ``save_pretrained`` writes the config as ``rso_config.json`` beside the weights (PEFT's
``adapter_config.json`` convention); ``rso.from_pretrained`` reads it back (and, for folders written before
that file existed, the ``"rso"`` entry of ``config.json``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import pathlib
from dataclasses import dataclass, field

from rso.layers.quantized import DEFAULT_MERGE_MODE, MERGE_MODES
from .projections import SAMPLERS, ProjectionSampler, make_sampler
from .state_policy import MERGE_DEFAULT, STATE_POLICIES

__all__ = ["RSOConfig", "CONFIG_NAME", "LEGACY_CONFIG_KEY"]

#: What ``quantize`` takes: W₀ in the compute dtype, or stored as bitsandbytes stores it.
QUANTIZE_KINDS = (None, "int8", "nf4")
#: The file beside the weights that holds a wrapped model's config.
CONFIG_NAME = "rso_config.json"
#: Where checkpoints written before ``rso_config.json`` kept the config: a key of the model's ``config.json``.
LEGACY_CONFIG_KEY = "rso"


def _fail(exc, message):
    raise exc(f"rso.wrap: {message}")


@dataclass
class RSOConfig:
    """How ``rso.wrap`` reparameterizes a model: each targeted linear layer becomes ``W₀ + scale·B P``.

    Attributes:
        rank: int ≥ 1 (absolute), or a float in (0, 1): that fraction of each layer's in_features.
        tau: optimizer steps per cycle (merge B into W₀ and resample P after each); None: only on
            ``rso.outer_step``.
        projection: how P is drawn: "stiefel" | "gaussian" | "coordinate" | "svd" | "hybrid", or a
            ``ProjectionSampler`` instance.
        target_modules: None (every Linear / Conv1D but embeddings and output heads), a regex (full match)
            or a list of module names / name suffixes.
        target_parameters: the stacked 3-D expert weights of mixture-of-experts layers (PEFT's name): None (every
            trainable one of transformers' experts modules), or a list of parameter names / suffixes
            (``"experts.down_proj"``); ``[]`` wraps none.
        scale: s in ``W₀ + s·B P``.
        seed: every P is a function of (seed, projection group, cycle): reproducible, identical on all ranks.
        share_projections: layers reading one input (q/k/v, gate/up) share one P and one stored projection;
            False, or a list of sibling-name tuples.
        total_steps, random_fraction: "hybrid" only (GoLore@x%: SVD first, Stiefel for the last fraction).
        state_on_merge: the optimizer state of B at a new cycle: "reset" | "keep" | "project".
        proximal: η of the optional proximal term ‖B‖²/(2η); None: off.
        chunked_head: causal LMs only: the output head and loss in chunks of this many tokens.
        quantize: None, "int8" or "nf4": W₀ of every wrapped linear layer stored as bitsandbytes stores it (LLM.int8
            rows; NF4 blocks of 64) and requantized at each merge. Layers that are bitsandbytes ``Linear4bit`` /
            ``Linear8bitLt`` already (a model loaded with ``BitsAndBytesConfig``) keep their format either way.
        requantize: how a merge rounds a quantized W₀ ← Q(deq(W₀) + s·B P): "nearest" (default, measured best:
            docs/results/quantized_merge), "stochastic" (unbiased) or "stochastic+feedback" (the rounding residual's
            part in the next subspace starts the next B). Applies to quantized W₀ only.
    """

    rank: int | float = 128
    tau: int | None = 200
    projection: str | ProjectionSampler = "stiefel"
    target_modules: str | list[str] | None = None
    target_parameters: list[str] | None = None
    scale: float = 1.0
    seed: int = 0
    share_projections: bool | list = True
    total_steps: int | None = None
    random_fraction: float = 0.2
    state_on_merge: str = MERGE_DEFAULT
    proximal: float | None = None
    chunked_head: int | None = None
    quantize: str | None = None
    requantize: str = DEFAULT_MERGE_MODE

    def __post_init__(self):
        self._check_rank_and_cycle()
        self._check_projection()
        self._check_selection()
        self._check_quantize()
        if isinstance(self.scale, bool) or not isinstance(self.scale, numbers.Real) or not math.isfinite(self.scale) \
                or self.scale == 0:
            _fail(ValueError, f"scale must be a finite non-zero number, got {self.scale!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            _fail(TypeError, f"seed must be an int, got {self.seed!r}")
        if self.state_on_merge not in STATE_POLICIES:
            _fail(ValueError, f"state_on_merge must be one of {STATE_POLICIES}, got {self.state_on_merge!r}")
        if self.proximal is not None and (isinstance(self.proximal, bool) or not isinstance(self.proximal, numbers.Real)
                                          or not self.proximal > 0):
            _fail(ValueError, f"proximal (η of the ‖B‖²/(2η) term) must be a positive number or None, "
                              f"got {self.proximal!r}")
        if self.chunked_head is not None and (isinstance(self.chunked_head, bool)
                                              or not isinstance(self.chunked_head, int) or self.chunked_head < 1):
            _fail(ValueError, f"chunked_head must be None or a positive int (tokens per chunk), got {self.chunked_head!r}")

    def _check_quantize(self):
        if self.quantize not in QUANTIZE_KINDS:
            _fail(ValueError, f"quantize must be one of {QUANTIZE_KINDS}, got {self.quantize!r}")
        if self.requantize not in MERGE_MODES:
            _fail(ValueError, f"requantize must be one of {MERGE_MODES}, got {self.requantize!r}")

    def _check_rank_and_cycle(self):
        rank, tau = self.rank, self.tau
        if isinstance(rank, bool) or not isinstance(rank, (int, float)):
            _fail(TypeError, f"rank must be an int ≥ 1 or a float in (0, 1), got {rank!r}")
        if isinstance(rank, float) and not 0.0 < rank < 1.0:
            _fail(ValueError, f"a float rank is a fraction of in_features and must be in (0, 1), got {rank}")
        if isinstance(rank, int) and rank < 1:
            _fail(ValueError, f"rank must be ≥ 1, got {rank}")
        if tau is not None and (isinstance(tau, bool) or not isinstance(tau, int) or tau < 1):
            _fail(ValueError, f"tau (optimizer steps per cycle) must be an int ≥ 1 or None "
                              f"(merge only on explicit rso.outer_step), got {tau!r}")

    def _check_projection(self):
        projection = self.projection
        if not isinstance(projection, ProjectionSampler) and projection not in SAMPLERS:
            _fail(ValueError, f"projection must be one of {sorted(SAMPLERS)} or a ProjectionSampler, got {projection!r}")
        if projection != "hybrid":  # total_steps / random_fraction place hybrid's switch and do nothing otherwise
            given = [f"{k}={v!r}" for k, v, default in (("total_steps", self.total_steps, None),
                                                        ("random_fraction", self.random_fraction, 0.2)) if v != default]
            if given:
                _fail(ValueError, f"{given[0]} applies to projection='hybrid' only (here projection={projection!r}); "
                                  f"drop it, or use projection='hybrid'")
        try:  # the sampler's own checks (hybrid: total_steps given, a real fraction)
            self.sampler()
        except (TypeError, ValueError) as e:
            _fail(type(e), str(e))

    def _check_selection(self):
        targets = self.target_modules
        if targets is not None and (not isinstance(targets, (str, list, tuple, set)) or not all(
                isinstance(t, str) for t in ([targets] if isinstance(targets, str) else targets))):
            _fail(TypeError, f"target_modules must be a regex string or a list of names/suffixes, got {targets!r}")
        params = self.target_parameters
        if params is not None and (not isinstance(params, (list, tuple, set)) or not all(isinstance(t, str)
                                                                                      for t in params)):
            _fail(TypeError, f"target_parameters must be None or a list of parameter names/suffixes, e.g. "
                             f"['experts.gate_up_proj']; got {params!r}")
        sharing = self.share_projections
        if not (isinstance(sharing, bool) or (isinstance(sharing, (list, tuple)) and all(
                isinstance(g, (list, tuple)) and all(isinstance(n, str) for n in g) for g in sharing))):
            _fail(TypeError, "share_projections must be a bool or a list of tuples of sibling layer names, "
                             f"e.g. [('q_proj', 'k_proj', 'v_proj')]; got {sharing!r}")

    def sampler(self) -> ProjectionSampler:
        """The projection sampler this config names (a ``ProjectionSampler`` instance is used as it is)."""
        return make_sampler(self.projection, total_steps=self.total_steps, random_fraction=self.random_fraction)

    # ------------------------------------------------------------------ data
    @property
    def name_of_projection(self) -> str:
        return self.projection.name if isinstance(self.projection, ProjectionSampler) else self.projection

    @property
    def custom_projection(self) -> bool:
        """True for a sampler instance that is not one of :data:`rso.projections.SAMPLERS`' own classes."""
        p = self.projection
        return isinstance(p, ProjectionSampler) and (p.name not in SAMPLERS or type(p) is not SAMPLERS[p.name])

    def to_dict(self) -> dict:
        """JSON data; a custom sampler is recorded by its class name (pass the instance back to load)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["projection"] = type(self.projection).__name__ if self.custom_projection else self.name_of_projection
        data["custom_projection"] = self.custom_projection
        targets = data["target_modules"]
        if isinstance(targets, (list, tuple, set)):  # JSON has lists only (a set in a fixed order)
            data["target_modules"] = sorted(targets) if isinstance(targets, set) else list(targets)
        if data["target_parameters"] is not None:
            data["target_parameters"] = sorted(data["target_parameters"]) if isinstance(data["target_parameters"], set) \
                else list(data["target_parameters"])
        if not isinstance(data["share_projections"], bool):
            data["share_projections"] = [list(g) for g in data["share_projections"]]
        data["scale"] = float(data["scale"])
        return data

    @classmethod
    def from_dict(cls, data: dict, projection: ProjectionSampler | None = None) -> "RSOConfig":
        """The config of ``to_dict``'s data; ``projection``: the sampler instance of a custom-sampler config."""
        data = dict(data)
        custom = data.pop("custom_projection", False)
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"rso.RSOConfig: unknown entries {unknown} (written by a newer rso? upgrade rso)")
        if custom and projection is None:
            raise ValueError(f"rso.from_pretrained: the model was saved with a custom sampler ({data['projection']}); "
                             f"pass projection=<an instance of it>")
        if projection is not None:
            data["projection"] = projection
        if data.get("projection") != "hybrid":  # older files saved hybrid's entries with every projection
            data.pop("total_steps", None), data.pop("random_fraction", None)
        if isinstance(data.get("share_projections"), list):
            data["share_projections"] = [tuple(g) for g in data["share_projections"]]
        return cls(**data)

    def save_pretrained(self, folder: str | os.PathLike) -> pathlib.Path:
        """Write ``<folder>/rso_config.json`` (to a temporary name first, then moved into place)."""
        path = pathlib.Path(folder) / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{CONFIG_NAME}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, projection: ProjectionSampler | None = None) -> "RSOConfig":
        """The config saved in ``folder``: ``rso_config.json``, or the ``"rso"`` entry of an older ``config.json``."""
        folder = pathlib.Path(folder)
        if (folder / CONFIG_NAME).is_file():
            return cls.from_dict(json.loads((folder / CONFIG_NAME).read_text()), projection)
        legacy = folder / "config.json"
        data = json.loads(legacy.read_text()).get(LEGACY_CONFIG_KEY) if legacy.is_file() else None
        if not isinstance(data, dict):
            raise FileNotFoundError(f"rso.from_pretrained: {folder} has no {CONFIG_NAME}: it was not saved from a model "
                                    f"wrapped by rso.wrap (load it with the model class's from_pretrained)")
        return cls.from_dict(data, projection)
