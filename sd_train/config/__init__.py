"""Typed run configuration: the sections (`schema`) and how they are loaded (`load`).

Import-light and torch-free, so a bad config is refused in well under a second. The public names
are re-exported here: `from sd_train.config import TrainConfig, ConfigError, load_config, ...`.
"""

from sd_train.config.load import (
    config_to_dict,
    dump_config,
    env_world_size,
    load_config,
    parse_overrides,
)
from sd_train.config.schema import (
    CheckpointArgs,
    DataArgs,
    DistArgs,
    EMAArgs,
    EvalArgs,
    LangevinArgs,
    MetricsArgs,
    ModelArgs,
    ObjectiveArgs,
    OptimArgs,
    PerfArgs,
    PosthocArgs,
    TrainConfig,
)
from sd_train.errors import ConfigError
from sd_train.paths import MODEL_SUBFOLDERS

__all__ = [
    "MODEL_SUBFOLDERS",
    "CheckpointArgs",
    "ConfigError",
    "DataArgs",
    "DistArgs",
    "EMAArgs",
    "PosthocArgs",
    "EvalArgs",
    "LangevinArgs",
    "MetricsArgs",
    "ModelArgs",
    "ObjectiveArgs",
    "OptimArgs",
    "PerfArgs",
    "TrainConfig",
    "config_to_dict",
    "dump_config",
    "env_world_size",
    "load_config",
    "parse_overrides",
]
