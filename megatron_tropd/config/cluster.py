"""The `cluster:` config section (where a job runs: nodes, GPUs, container, SLURM details) and the checks that
involve it together with the `sglang:` section (`rollout/sglang_config.py`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_tropd.config.errors import ConfigError
from megatron_tropd.rollout.sglang_config import SGLangConfig

PLACEMENTS = ("dedicated", "colocated")


@dataclass
class ClusterConfig:
    """Where the job runs. 0 / None fields are taken from the SLURM allocation (or the local machine)."""

    nodes: int = 0  # 0 = SLURM_NNODES (or 1 locally)
    gpus_per_node: int = 0  # 0 = SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE (or the local GPU count)
    trainer_nodes: int = 0  # 0 = nodes - rollout_nodes
    rollout_nodes: int = 0  # nodes reserved for dedicated SGLang servers (the last nodes of the allocation)
    container_image: str = ""  # pyxis --container-image (a .sqsh from `enroot import`, or a registry ref)
    container_mounts: list[str] = field(default_factory=list)  # pyxis --container-mounts src:dst entries
    partition: str = ""  # informational (sbatch #SBATCH lines set the real values)
    account: str = ""  # informational, like partition
    time_limit: str = "04:00:00"  # informational, like partition
    rdzv_port: int = 29500  # torchrun c10d rendezvous port on the first trainer node
    log_dir: str = "logs"  # per-job logs: {log_dir}/{job_id}/
    env: dict[str, str] = field(default_factory=dict)  # extra environment for every process


def check_placement(sglang: SGLangConfig, cluster: ClusterConfig) -> None:
    """The checks that involve the sglang and cluster sections (run by `config.load_config`)."""
    if sglang.placement not in PLACEMENTS:
        raise ConfigError(f"sglang.placement must be one of {', '.join(PLACEMENTS)}; got {sglang.placement!r}")
    if sglang.tp_size < 1 or sglang.student_servers < 0 or sglang.teacher_servers < 0:
        raise ConfigError("sglang.tp_size must be >= 1 and sglang.student_servers / teacher_servers >= 0")
    if sglang.mem_fraction_static is not None and not 0 < sglang.mem_fraction_static < 1:
        raise ConfigError(f"sglang.mem_fraction_static must be in (0, 1); got {sglang.mem_fraction_static}")
    if sglang.port_base and not 1024 <= sglang.port_base <= 65000:
        raise ConfigError(f"sglang.port_base must be 0 (free ports) or in [1024, 65000]; got {sglang.port_base}")
    for key in ("nodes", "gpus_per_node", "trainer_nodes", "rollout_nodes"):
        if getattr(cluster, key) < 0:
            raise ConfigError(f"cluster.{key} must be >= 0; got {getattr(cluster, key)}")
    bad = [m for m in cluster.container_mounts if ":" not in m]
    if bad:
        raise ConfigError(f"cluster.container_mounts entries must look like /src:/dst; got {bad}")
