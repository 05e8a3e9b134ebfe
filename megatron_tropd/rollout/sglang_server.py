"""SGLang server processes and HTTP plumbing: launch, health checks, stop, JSON requests, load balancing.

A launched server is `python -m sglang.launch_server ...` in its own process group (the launcher spawns the
tokenizer / scheduler / detokenizer processes): `stop` sends SIGTERM to the launcher, which tears its children
down in ~5 s, then SIGKILLs the whole group after a grace period so nothing outlives the trainer.
Talks HTTP only (`requests`): the SGLang venv and the trainer venv never share a process.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from megatron_tropd.rollout.sglang_config import SGLangConfig

logger = logging.getLogger(__name__)

STUB_DIR = Path(__file__).resolve().parent / "cpu_stubs"  # holds the import-only `sgl_kernel` stand-in (package data)


class SGLangServerError(RuntimeError):
    """A server failed to start, died, or kept failing a request. `status`: the HTTP status, when there was one."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """One SGLang server of a role. `proc` is set when this process launched it (then it can be relaunched)."""

    url: str
    role: str = "student"
    index: int = 0
    proc: subprocess.Popen | None = None
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    outstanding: int = 0  # in-flight requests (least-outstanding balancing)
    launches: int = 0

    @property
    def name(self) -> str:
        return f"{self.role}[{self.index}] {self.url}"

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        if not self.log_path or not self.log_path.is_file():
            return ""
        lines = self.log_path.read_text(errors="replace").splitlines()[-n:]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ HTTP
def post(url: str, path: str, payload: dict | None, timeout: float) -> dict:
    """POST JSON, return the JSON body; raises requests exceptions (connection) or SGLangServerError (4xx/5xx)."""
    r = requests.post(url.rstrip("/") + path, json=payload if payload is not None else {}, timeout=timeout)
    if r.status_code >= 400:
        raise SGLangServerError(f"POST {url}{path} -> HTTP {r.status_code}: {r.text[:500]}", r.status_code)
    if not r.content:
        return {}
    try:
        return r.json()
    except ValueError:
        return {"text": r.text}


def get(url: str, path: str, timeout: float) -> requests.Response:
    return requests.get(url.rstrip("/") + path, timeout=timeout)


# ------------------------------------------------------------------------------------------------ launch
def resolve_device(cfg: SGLangConfig) -> str:
    if cfg.device != "auto":
        return cfg.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _needs_stub(cfg: SGLangConfig, python: str, device: str) -> bool:
    if cfg.sgl_kernel_stub != "auto":
        return cfg.sgl_kernel_stub == "on"
    if device != "cpu":
        return False
    probe = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('sgl_kernel') else 1)"
    try:
        return subprocess.run([python, "-c", probe], timeout=60, capture_output=True).returncode != 0
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SGLangServerError(f"cannot run the SGLang interpreter {python!r} ({e}); set sglang.python or "
                                "TROPD_SGLANG_PYTHON (scripts/setup_sglang_env.sh prints one)") from e


def server_command(model_path: str | Path, port: int, cfg: SGLangConfig, device: str,
                   weight_version: int | None = None) -> list[str]:
    """The launch argv. On cpu: the torch-native recipe (docs/rollout.md) - float32, torch_native attention,
    no overlap scheduler (10x slower with it), a KV-cache cap (otherwise it takes 15 GB)."""
    argv = [cfg.resolved_python(), "-m", "sglang.launch_server", "--model-path", str(model_path),
            "--host", cfg.host, "--port", str(port), "--tp-size", str(cfg.tp_size), "--device", device]
    dtype = cfg.dtype if cfg.dtype != "auto" or device != "cpu" else "float32"
    argv += ["--dtype", dtype]
    max_total = cfg.max_total_tokens or (8192 if device == "cpu" else None)
    if max_total:
        argv += ["--max-total-tokens", str(max_total)]
    if device == "cpu":
        # --sleep-on-idle: an idle scheduler blocks on its sockets instead of spinning (measured: ~17% of a core
        # per idle server on the shared 2-core machines, e.g. a teacher server waiting for scoring requests)
        argv += ["--attention-backend", "torch_native", "--disable-overlap-schedule", "--sleep-on-idle"]
    if cfg.mem_fraction_static is not None:
        argv += ["--mem-fraction-static", str(cfg.mem_fraction_static)]
    if cfg.context_length:
        argv += ["--context-length", str(cfg.context_length)]
    if weight_version is not None:
        argv += ["--weight-version", str(weight_version)]
    return argv + list(cfg.extra_args)


def launch(model_path: str | Path, cfg: SGLangConfig, log_dir: str | Path, role: str, index: int,
           weight_version: int | None = 0, port: int | None = None) -> Server:
    """Start one server (does not wait for it; see `wait_healthy`)."""
    if not Path(model_path).is_dir():
        raise ValueError(f"SGLang model path {model_path} is not a directory (an HF checkpoint dir is needed)")
    device = resolve_device(cfg)
    python = cfg.resolved_python()
    port = port or (cfg.port_base + index + (100 if role == "teacher" else 0) if cfg.port_base else free_port())
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if device == "cpu":
        env["SGLANG_USE_CPU_ENGINE"] = "1"  # without it model init imports vllm and fails
    if _needs_stub(cfg, python, device):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(STUB_DIR), os.environ.get("PYTHONPATH", "")) if p)
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    server = Server(url=f"http://{'127.0.0.1' if cfg.host in ('0.0.0.0', '') else cfg.host}:{port}", role=role,
                    index=index, argv=server_command(model_path, port, cfg, device, weight_version), env=env,
                    log_path=log_dir / f"sglang-{role}{index}.log")
    _start(server)
    return server


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that launched it dies (even by SIGKILL), so a crashed
    trainer leaves no server behind (Linux prctl PR_SET_PDEATHSIG; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


_LIVE: dict[int, Server] = {}  # launched servers not yet stopped (stopped at interpreter exit)


@atexit.register
def _stop_all() -> None:
    for s in list(_LIVE.values()):
        stop(s, grace_s=5.0)


def _start(server: Server) -> None:
    main_thread = threading.current_thread() is threading.main_thread()
    with open(server.log_path, "ab") as log:  # the child keeps its own descriptor
        log.write(f"\n==== launch {server.launches}: {' '.join(server.argv)}\n".encode())
        log.flush()
        server.proc = subprocess.Popen(server.argv, env={**os.environ, **server.env}, stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True,  # own process group: stop() kills all of it
                                       # PDEATHSIG follows the launching *thread*: only from the main one
                                       preexec_fn=_die_with_parent if main_thread else None)
    server.launches += 1
    _LIVE[server.proc.pid] = server
    _record(server)
    logger.info(f"launched SGLang {server.name} (pid {server.proc.pid}), log {server.log_path}")


def _record(server: Server) -> None:
    """{log_dir}/servers.json: role, url, pid, log of every launched server (operators, fault tests)."""
    path = server.log_path.parent / "servers.json"
    try:
        rows = json.loads(path.read_text()) if path.is_file() else []
    except ValueError:
        rows = []
    rows = [r for r in rows if not (r["role"] == server.role and r["index"] == server.index)]
    rows.append({"role": server.role, "index": server.index, "url": server.url, "pid": server.proc.pid,
                 "log": str(server.log_path), "launches": server.launches})
    path.write_text(json.dumps(rows, indent=1))


def relaunch(server: Server, model_path: str | Path, weight_version: int) -> None:
    """Stop (if needed) and start again on the same port with `model_path` (the newest synced weights)."""
    if server.proc is None:
        raise SGLangServerError(f"{server.name} was attached by URL, not launched here: cannot relaunch it")
    stop(server)
    argv = list(server.argv)
    argv[argv.index("--model-path") + 1] = str(model_path)
    if "--weight-version" in argv:
        argv[argv.index("--weight-version") + 1] = str(weight_version)
    else:
        argv += ["--weight-version", str(weight_version)]
    server.argv = argv
    _start(server)


def wait_healthy(servers: list[Server], timeout_s: float, poll_s: float = 1.0) -> float:
    """Poll /health_generate (a real one-token generation) until every server answers 200; seconds waited.
    Fails fast when a launched server exits, with the tail of its log. (The one health poller: the trainer's
    engines and `tropd launch` both use it.)"""
    t0 = time.monotonic()
    pending = list(servers)
    while pending:
        s = pending[0]
        if not s.alive():
            raise SGLangServerError(f"SGLang {s.name} exited with code {s.proc.returncode} during start-up; "
                                    f"log {s.log_path}:\n{s.log_tail()}")
        try:
            if get(s.url, "/health_generate", timeout=30).status_code == 200:
                pending.pop(0)
                continue
        except requests.RequestException:
            pass
        if time.monotonic() - t0 > timeout_s:
            raise SGLangServerError(f"SGLang {s.name} not healthy after {timeout_s:.0f}s "
                                    f"(sglang.startup_timeout_s); log {s.log_path}:\n{s.log_tail()}")
        time.sleep(poll_s)
    return time.monotonic() - t0


def stop(server: Server, grace_s: float = 15.0) -> None:
    """SIGTERM the launcher, then SIGKILL its process group after `grace_s` (no-op for attached servers)."""
    p = server.proc
    if p is None:
        return
    _LIVE.pop(p.pid, None)
    pgid = p.pid  # start_new_session: the launcher leads its own process group
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    if pgid is not None:
        try:
            os.killpg(pgid, signal.SIGKILL)  # stragglers (scheduler / detokenizer) of this server only
        except (ProcessLookupError, PermissionError):
            pass
    try:
        p.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


# ------------------------------------------------------------------------------------------------ balancing
class ServerPool:
    """The servers of one role; `acquire` picks one (least outstanding requests, or round robin)."""

    def __init__(self, servers: list[Server], policy: str = "least_outstanding"):
        if not servers:
            raise ValueError("ServerPool needs at least one server")
        self.servers = servers
        self.policy = policy
        self._lock = threading.Lock()
        self._next = 0

    def acquire(self, exclude: set[str] = frozenset()) -> Server:
        with self._lock:
            cands = [s for s in self.servers if s.url not in exclude] or self.servers
            if self.policy == "round_robin":
                s = cands[self._next % len(cands)]
                self._next += 1
            else:
                s = min(cands, key=lambda x: (x.outstanding, x.index))
            s.outstanding += 1
            return s

    def release(self, server: Server) -> None:
        with self._lock:
            server.outstanding -= 1
