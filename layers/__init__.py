"""Reparameterized modules and their autograd functions."""
from .functional import GradientCapture, SubspaceLinearFunction, project, use_merged
from .subspace_experts import ExpertSubspace, SubspaceExperts
from .subspace_linear import ProjectionGroup, SubspaceLinear, is_conv1d

__all__ = ["SubspaceLinear", "SubspaceExperts", "ExpertSubspace", "ProjectionGroup", "SubspaceLinearFunction", "GradientCapture", "project", "use_merged",
           "is_conv1d"]
