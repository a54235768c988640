"""rso: memory-efficient training by randomized subspace optimization.

    model = rso.wrap(model, rank=128)   # linear layers become W₀ + B·P, only B trains (or rso.wrap(model, RSOConfig(...)))
    ...an ordinary training loop with any torch optimizer...
    model = rso.unwrap(model)           # plain nn.Linear again, merged
"""
from rso.layers.subspace_experts import SubspaceExperts
from rso.layers.subspace_linear import ProjectionGroup, SubspaceLinear

from . import distributed, memory, optim, projections, serialization, state_policy
from .config import RSOConfig
from .outer_loop import OuterLoop
from .pretrained import from_pretrained
from .projections import (CoordinateSampler, GaussianSampler, HybridSampler, ProjectionSampler, SVDSampler,
                          StiefelSampler, make_sampler)
from .wrapping import (effective_state_dict, expert_layers, get_config, is_wrapped, merge_and_unload, outer_step,
                       print_trainable_parameters, state, subspace_layers, summary, unwrap, wrap)

__version__ = "0.1.0"

__all__ = ["wrap", "RSOConfig", "get_config", "effective_state_dict", "unwrap", "merge_and_unload", "outer_step", "summary", "print_trainable_parameters",
           "state", "is_wrapped", "from_pretrained", "subspace_layers", "expert_layers", "SubspaceLinear",
           "SubspaceExperts", "ProjectionGroup", "OuterLoop",
           "ProjectionSampler", "StiefelSampler", "GaussianSampler", "CoordinateSampler", "SVDSampler",
           "HybridSampler", "make_sampler", "memory", "projections", "serialization", "state_policy"]
