"""Settings of the SGLang rollout engine (`sglang:` section): which servers, how to launch them, how to talk to
them, how to hand them new weights.

Until `Config` has an `sglang` field, the engine reads `getattr(cfg, "sglang", SGLangConfig())` and the URL lists
fall back to the environment (`TROPD_SGLANG_STUDENT_URLS` / `TROPD_SGLANG_TEACHER_URLS`, comma-separated: what
`tropd launch` exports) and the interpreter to `TROPD_SGLANG_PYTHON`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

FAILURE_POLICIES = ("fail", "relaunch")
SYNC_MODES = ("disk", "tensor", "distributed")
BALANCING = ("least_outstanding", "round_robin")


@dataclass
class SGLangConfig:
    # -- which servers: attach by URL, else launch `*_servers` of them here (rank 0) -------------------------------
    student_urls: list[str] = field(default_factory=list)  # running servers serving the student; [] = launch
    teacher_urls: list[str] = field(default_factory=list)  # running servers serving the teacher; [] = launch
    student_servers: int = 1  # servers launched for the student when student_urls is empty
    teacher_servers: int = 1  # servers launched for the teacher (only when teacher prefixes are on)
    placement: str = "dedicated"  # `tropd launch` only: dedicated (own nodes) | colocated (on trainer GPUs)
    # -- launch settings (`python -m sglang.launch_server`) ----------------------------------------------------
    python: str = ""  # interpreter with SGLang; "" = $TROPD_SGLANG_PYTHON, else "python"
    host: str = "127.0.0.1"  # bind address of launched servers (loopback: nothing else can reach them)
    port_base: int = 0  # server i gets port_base + i; 0 = a free port each
    device: str = "auto"  # auto (cuda if the trainer sees a GPU, else cpu) | cuda | cpu
    tp_size: int = 1  # --tp-size per server
    dtype: str = "auto"  # --dtype; auto = float32 on cpu, the model's on cuda
    mem_fraction_static: float | None = None  # --mem-fraction-static (GPU); None = SGLang's default
    max_total_tokens: int | None = None  # --max-total-tokens (KV-cache cap); None = 8192 on cpu, SGLang's on cuda
    context_length: int | None = None  # --context-length; None = the model's
    extra_args: list[str] = field(default_factory=list)  # appended verbatim to the launch command
    sgl_kernel_stub: str = "auto"  # put rollout/cpu_stubs (an import-only sgl_kernel) on PYTHONPATH: auto (cpu and no real sgl_kernel) | on | off
    startup_timeout_s: float = 300.0  # wait this long for /health_generate after launch
    log_dir: str = ""  # server logs; "" = {train.run_dir}/sglang
    # -- requests ------------------------------------------------------------------------------------------------
    request_timeout_s: float = 300.0  # per HTTP request (one /generate of one sample)
    retries: int = 2  # extra attempts per request after a connection error / 5xx
    backoff_s: float = 1.0  # first retry delay, doubled per attempt
    concurrency: int = 16  # in-flight /generate requests per engine (all servers of the role together)
    load_balance: str = "least_outstanding"  # least_outstanding | round_robin
    on_server_failure: str = "fail"  # fail: raise naming server + request | relaunch: restart it (launched only)
    # -- weight sync (student servers, after every optimizer step) ---------------------------------------------
    weight_sync: str = "disk"  # disk (portable: safetensors dir + /update_weights_from_disk) | tensor | distributed
    weights_dir: str = ""  # where the disk path writes versioned HF dirs; "" = {train.run_dir}/sglang_weights
    keep_weight_versions: int = 2  # versioned weight dirs kept on disk (the newest ones)
    update_timeout_s: float = 600.0  # per weight-update request
    pause_during_update: bool = True  # pause_generation -> flush_cache -> update -> continue_generation
    bucket_bytes: int = 512 << 20  # tensor / distributed paths: bytes per update request (bucket)
    nccl_master_addr: str = ""  # distributed path: address of trainer rank 0 as the servers see it
    nccl_master_port: int = 29700  # distributed path: rendezvous port of the weight-update group
    update_group_name: str = "tropd_weight_sync"  # distributed path: name of the NCCL group
    # -- teacher scoring on the teacher servers (`teacher.scorer: sglang`, rollout/sglang_scoring.py) -------------
    score_while_generating: bool = True  # teacher.scorer=sglang: score each rollout as soon as it finishes (overlaps generation; on CPU servers that share cores it is slower, docs/rollout.md)
    teacher_logit_temperature: float | None = None  # attached teacher servers whose model_path this machine cannot read: the temperature their checkpoint is folded for (1.0 = plain); None = read the fold marker

    def resolved_python(self) -> str:
        return self.python or os.environ.get("TROPD_SGLANG_PYTHON", "") or "python"

    def urls(self, role: str) -> list[str]:
        """Configured URLs of a role, else the ones `tropd launch` exported."""
        own = list(self.student_urls if role == "student" else self.teacher_urls)
        if own:
            return own
        env = os.environ.get(f"TROPD_SGLANG_{role.upper()}_URLS", "")
        return [u.strip() for u in env.split(",") if u.strip()]


def validate(cfg: SGLangConfig) -> None:
    """Raise ValueError naming the bad key and the fix."""
    def bad(key: str, value, want: str):
        raise ValueError(f"sglang.{key}={value!r} is invalid: {want}")

    if cfg.on_server_failure not in FAILURE_POLICIES:
        bad("on_server_failure", cfg.on_server_failure, f"use one of {FAILURE_POLICIES}")
    if cfg.weight_sync not in SYNC_MODES:
        bad("weight_sync", cfg.weight_sync, f"use one of {SYNC_MODES}")
    if cfg.load_balance not in BALANCING:
        bad("load_balance", cfg.load_balance, f"use one of {BALANCING}")
    if cfg.placement not in ("dedicated", "colocated"):
        bad("placement", cfg.placement, "use dedicated | colocated")
    if cfg.device not in ("auto", "cpu", "cuda"):
        bad("device", cfg.device, "use auto | cpu | cuda")
    if cfg.sgl_kernel_stub not in ("auto", "on", "off"):
        bad("sgl_kernel_stub", cfg.sgl_kernel_stub, "use auto | on | off")
    for key in ("student_servers", "teacher_servers", "retries"):
        if getattr(cfg, key) < 0:
            bad(key, getattr(cfg, key), "must be >= 0")
    for key in ("tp_size", "concurrency", "keep_weight_versions"):
        if getattr(cfg, key) < 1:
            bad(key, getattr(cfg, key), "must be >= 1")
    for key in ("startup_timeout_s", "request_timeout_s", "update_timeout_s"):
        if getattr(cfg, key) <= 0:
            bad(key, getattr(cfg, key), "must be > 0 seconds")
    if cfg.teacher_logit_temperature is not None and not cfg.teacher_logit_temperature > 0:
        bad("teacher_logit_temperature", cfg.teacher_logit_temperature, "must be > 0 (or null: read the marker)")
    if cfg.port_base and not 1024 <= cfg.port_base <= 65000:
        bad("port_base", cfg.port_base, "use 0 (free ports) or a port in [1024, 65000]")
    for u in cfg.student_urls + cfg.teacher_urls:
        if not u.startswith(("http://", "https://")):
            bad("student_urls/teacher_urls", u, "URLs look like http://host:port")
