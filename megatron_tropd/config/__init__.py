"""The typed run configuration (`schema`), its cluster section (`cluster`) and the error type (`errors`).

    from megatron_tropd.config import load_config
    cfg = load_config("examples/configs/smollm2_tropd_cpu.yaml", ["train.steps=20"])
"""
from megatron_tropd.config.cluster import PLACEMENTS, ClusterConfig, check_placement
from megatron_tropd.config.errors import ConfigError
from megatron_tropd.config.schema import (
    Config, EvalConfig, GuidanceConfig, ModelConfig, OptimConfig, ParallelConfig, RolloutConfig, TrainConfig,
    all_fields, load_config, load_run_config, save_config, to_dict, validate,
)

__all__ = ["Config", "ConfigError", "ClusterConfig", "EvalConfig", "GuidanceConfig", "ModelConfig", "OptimConfig",
           "PLACEMENTS", "ParallelConfig", "RolloutConfig", "TrainConfig", "all_fields", "check_placement",
           "load_config", "load_run_config", "save_config", "to_dict", "validate"]
