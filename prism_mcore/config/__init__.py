from prism_mcore.config.load import ConfigError, check_world_size, load_config
from prism_mcore.config.schema import (AlgorithmConfig, DataConfig, ModelConfig, OptimConfig, ParallelConfig,
                                       PrismConfig, RolloutConfig, TrainerConfig)

__all__ = ["ConfigError", "check_world_size", "load_config", "PrismConfig", "ModelConfig", "ParallelConfig",
           "OptimConfig", "DataConfig", "RolloutConfig", "AlgorithmConfig", "TrainerConfig"]
