"""Reparameterized modules and their autograd functions."""
from .functional import GradientCapture, SubspaceLinearFunction, project, use_merged
from .quantized_linear import QuantizedSubspaceLinear
from .subspace_experts import ExpertSubspace, SubspaceExperts
from .subspace_linear import ProjectionGroup, SubspaceLinear, is_conv1d, is_quantized_linear

__all__ = ["SubspaceLinear", "QuantizedSubspaceLinear", "is_quantized_linear", "SubspaceExperts", "ExpertSubspace", "ProjectionGroup", "SubspaceLinearFunction", "GradientCapture", "project", "use_merged",
           "is_conv1d"]
