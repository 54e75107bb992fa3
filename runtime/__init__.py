"""The torch-free layer: facts every layer shares and, later, the generation loop over engines.

Nothing in this package may import torch: a Jetson installs it without the training stack.
"""

from .errors import CheckpointError, ConfigError, ECMError
from .sampling import draw_uniforms
from .scales import PATCH_NUMS_256, begin_ends, phi_table, scale_lengths, total_tokens
from .schedule import TemperatureSchedule, parse_temperature

__all__ = [
    "PATCH_NUMS_256",
    "CheckpointError",
    "ConfigError",
    "ECMError",
    "TemperatureSchedule",
    "begin_ends",
    "draw_uniforms",
    "parse_temperature",
    "phi_table",
    "scale_lengths",
    "total_tokens",
]
