"""Reparameterized modules and their autograd functions."""
from .functional import GradientCapture, Project, SubspaceLinearFunction
from .subspace_linear import ProjectionGroup, SubspaceLinear, is_conv1d

__all__ = ["SubspaceLinear", "ProjectionGroup", "Project", "SubspaceLinearFunction", "GradientCapture",
           "is_conv1d"]
