"""vxm-lite: fast, reduced-parameter VoxelMorph registration for MONAI."""

from custom.losses import GradLoss, LocalNCCLoss, MSELoss
from custom.networks import VARIANTS, RegistrationNet, VxmDense, count_parameters
from custom.warp import SpatialTransformer, VelocityIntegration

__version__ = "0.5.0"
__all__ = [
    "VARIANTS",
    "GradLoss",
    "LocalNCCLoss",
    "MSELoss",
    "RegistrationNet",
    "SpatialTransformer",
    "VelocityIntegration",
    "VxmDense",
    "count_parameters",
]
