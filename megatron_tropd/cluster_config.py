"""Config sections for SGLang servers (`sglang:`) and the SLURM cluster (`cluster:`).

    cfg, sglang, cluster = load_run_config("examples/configs/paper_r1distill_1.5b_skywork_7b.yaml", ["cluster.nodes=4"])

The `sglang` and `cluster` sections are parsed here; the rest of the file goes through `config.load_config`.
While `Config` has no `sglang` / `cluster` fields the two sections are stripped before `load_config`; once they
are added to `Config` the whole file goes through `load_config` and the sections are taken from its result.
"""
from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from megatron_tropd.config import Config, ConfigError, load_config

PLACEMENTS = ("dedicated", "colocated")


@dataclass
class SGLangConfig:
    """SGLang servers for rollout generation (student weights) and teacher prefixes (teacher weights)."""

    student_servers: int = 1  # servers serving the student (rollouts); weights synced every step
    teacher_servers: int = 1  # servers serving the teacher (guidance prefixes); 0 = no teacher server
    tp_size: int = 1  # GPUs (tensor parallel) per server
    placement: str = "dedicated"  # dedicated: own nodes (cluster.rollout_nodes) | colocated: on trainer GPUs
    port_base: int = 30000  # server i listens on port_base + i (per node)
    mem_fraction_static: float = 0.85  # SGLang --mem-fraction-static; colocated needs < 0.5 (trainer shares GPU)
    host: str = "0.0.0.0"  # bind address
    dtype: str = "auto"  # SGLang --dtype
    context_length: int | None = None  # None = the model's
    extra_args: list[str] = field(default_factory=list)  # passed verbatim to sglang.launch_server
    python: str = "python"  # interpreter with SGLang (the Docker image: /opt/sglang/bin/python, its own venv)
    startup_timeout_s: int = 900  # how long the trainer waits for /health


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
    account: str = ""
    time_limit: str = "04:00:00"
    rdzv_port: int = 29500  # torchrun c10d rendezvous port on the first trainer node
    log_dir: str = "logs"  # per-job logs: {log_dir}/{job_id}/
    env: dict[str, str] = field(default_factory=dict)  # extra environment for every process


def _check(sglang: SGLangConfig, cluster: ClusterConfig) -> None:
    if sglang.placement not in PLACEMENTS:
        raise ConfigError(f"sglang.placement must be one of {', '.join(PLACEMENTS)}; got {sglang.placement!r}")
    if sglang.tp_size < 1 or sglang.student_servers < 0 or sglang.teacher_servers < 0:
        raise ConfigError("sglang.tp_size must be >= 1 and sglang.student_servers / teacher_servers >= 0")
    if not 0 < sglang.mem_fraction_static < 1:
        raise ConfigError(f"sglang.mem_fraction_static must be in (0, 1); got {sglang.mem_fraction_static}")
    if not 1024 <= sglang.port_base <= 65000:
        raise ConfigError(f"sglang.port_base must be in [1024, 65000]; got {sglang.port_base}")
    for key in ("nodes", "gpus_per_node", "trainer_nodes", "rollout_nodes"):
        if getattr(cluster, key) < 0:
            raise ConfigError(f"cluster.{key} must be >= 0; got {getattr(cluster, key)}")
    bad = [m for m in cluster.container_mounts if ":" not in m]
    if bad:
        raise ConfigError(f"cluster.container_mounts entries must look like /src:/dst; got {bad}")


def _split(data: dict, overrides: list[str]) -> tuple[dict, dict, list[str], list[str]]:
    """(our sections, the rest of the YAML, our overrides, the rest of the overrides)."""
    ours = {k: data.pop(k) for k in ("sglang", "cluster") if k in data}
    mine = [o for o in overrides if o.split("=", 1)[0].split(".", 1)[0] in ("sglang", "cluster")]
    return ours, data, mine, [o for o in overrides if o not in mine]


def load_sections(ours: dict, overrides: list[str], where: str = "config") -> tuple[SGLangConfig, ClusterConfig]:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    @dataclass
    class _Sections:
        sglang: SGLangConfig = field(default_factory=SGLangConfig)
        cluster: ClusterConfig = field(default_factory=ClusterConfig)

    try:
        merged = OmegaConf.merge(OmegaConf.structured(_Sections), OmegaConf.create(ours or {}))
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"{where}: invalid config{f' key {key!r}' if key else ''}: "
                          f"{str(e).splitlines()[0]}") from None
    _check(obj.sglang, obj.cluster)
    return obj.sglang, obj.cluster


def load_run_config(path: str | Path, overrides: list[str] | None = None
                    ) -> tuple[Config, SGLangConfig, ClusterConfig]:
    """The run config plus the `sglang` and `cluster` sections (works before and after they join `Config`)."""
    import yaml

    overrides = list(overrides or [])
    if not Path(path).is_file():
        raise ConfigError(f"config file not found: {path}")
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    ours, rest, mine, others = _split(data, overrides)
    sglang, cluster = load_sections(ours, mine, where=str(path))
    names = {f.name for f in dataclasses.fields(Config)}
    if {"sglang", "cluster"} <= names:
        cfg = load_config(path, overrides)
        return cfg, cfg.sglang, cfg.cluster  # type: ignore[attr-defined]
    with tempfile.TemporaryDirectory() as tmp:
        stripped = Path(tmp) / Path(path).name
        stripped.write_text(yaml.safe_dump(rest, sort_keys=False))
        try:
            cfg = load_config(stripped, others)
        except ConfigError as e:
            raise ConfigError(str(e).replace(str(stripped), str(path))) from None
    return cfg, sglang, cluster
