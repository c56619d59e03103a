"""Plugin layer: the head and scenario protocols, their registry, and the built-in plugins.

Nothing in this package imports torch at import time, so listing plugins stays cheap.
"""

from finetune_flows.plugins.errors import (
    ConfigError,
    DataError,
    FinetuneFlowsError,
    ParityError,
    PluginError,
    PromotionError,
)
from finetune_flows.plugins.registry import API_VERSION, HEADS, SCENARIOS, Registry

__all__ = [
    "API_VERSION",
    "HEADS",
    "SCENARIOS",
    "ConfigError",
    "DataError",
    "FinetuneFlowsError",
    "ParityError",
    "PluginError",
    "PromotionError",
    "Registry",
]
