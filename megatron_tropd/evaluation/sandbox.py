"""Run untrusted (model-written) Python in a child process with limits; the harness process is never at risk.

Layers (each documented with its limits in docs/evaluation.md):
- a fresh temporary directory as cwd and HOME, deleted afterwards; an environment with only PATH/LANG/HOME (no
  proxies, no PYTHONPATH, no credentials) and `python -I` (isolated mode: ignores PYTHON* variables, user site);
- `resource.setrlimit`, set by the child's first Python statements: RLIMIT_CPU (CPU seconds), RLIMIT_AS
  (address space), RLIMIT_FSIZE (file size: also caps stdout/stderr, which go to files), RLIMIT_NOFILE,
  RLIMIT_CORE = 0, and RLIMIT_NPROC when running as nobody;
- a wall-clock timeout; the child runs in its own session and the whole process group is SIGKILLed at the end;
- network: the child runs in a new, empty network namespace (`unshare -n` as root, `unshare -rn` otherwise: only
  a down loopback, so every connect fails with ENETUNREACH before a packet exists) when that works here, and in
  every case a Python audit hook in the child refuses to create AF_INET/AF_INET6/AF_PACKET sockets and refuses
  connect/bind/sendto to IP addresses and DNS look-ups before the system call;
- privileges: when the harness runs as root and `setpriv` works, the child runs as uid/gid 65534 (nobody) with
  no capabilities; otherwise it runs as the harness user and CAN read/write that user's files.
"""
from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

PASSED, FAILED, TIMEOUT, ERROR = "passed", "failed", "timeout", "error"

# Runs in the child before the program: the resource limits (set here rather than in a preexec_fn, which is not
# safe when the harness scores on threads), then an audit hook (cannot be removed once added) refusing IP sockets.
_GUARD = r'''
import resource, sys
for _name, _value in LIMITS:
    resource.setrlimit(getattr(resource, _name), (_value, _value + 1 if _name == "RLIMIT_CPU" else _value))
del _name, _value
def _tropd_no_network(event, args):
    if event == "socket.__new__":
        family = args[1] if len(args) > 1 else None
        if family is not None and int(family) in (2, 10, 17):  # AF_INET, AF_INET6, AF_PACKET
            raise PermissionError("network access is disabled in the tropd sandbox")
    elif event in ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"):
        if len(args) > 1 and not isinstance(args[1], (str, bytes)):  # IP addresses are tuples; AF_UNIX paths pass
            raise PermissionError("network access is disabled in the tropd sandbox")
    elif event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr"):
        raise PermissionError("network access is disabled in the tropd sandbox")
sys.addaudithook(_tropd_no_network)
del _tropd_no_network
import runpy
sys.argv = ["program.py"]
runpy.run_path("program.py", run_name="__main__")
'''


@dataclass(frozen=True)
class SandboxLimits:
    wall_s: float = 10.0  # wall-clock limit (the process group is killed)
    cpu_s: int = 5  # RLIMIT_CPU: SIGXCPU at the soft limit, SIGKILL one second later
    memory_mb: int = 1024  # RLIMIT_AS (virtual address space; the interpreter itself needs ~30 MB)
    fsize_mb: int = 16  # RLIMIT_FSIZE: largest file the program may write (stdout/stderr included)
    nofile: int = 64  # RLIMIT_NOFILE
    nproc: int = 64  # RLIMIT_NPROC, applied only when the program runs as nobody (it counts per real uid)
    output_chars: int = 4000  # how much of stdout/stderr is kept in the result
    network_namespace: bool = True  # use `unshare -rn` when it works here (the audit hook is always on)
    drop_privileges: bool = True  # run as nobody when root and the interpreter allows it
    python: str = sys.executable


@dataclass
class SandboxResult:
    status: str  # passed | failed | timeout | error
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    detail: str = ""  # short reason: "exit 1: AssertionError", "wall limit 10s", "signal SIGKILL", ...

    @property
    def passed(self) -> bool:
        return self.status == PASSED

    def to_dict(self) -> dict:
        return asdict(self)


@functools.lru_cache(maxsize=None)
def _works(cmd: tuple[str, ...]) -> bool:
    try:
        return subprocess.run(list(cmd), capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


_SETPRIV = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all")


@functools.lru_cache(maxsize=None)
def _prefix(python: str, network_namespace: bool, drop_privileges: bool) -> tuple[str, ...]:
    """The launcher in front of `python`: the strongest combination that actually starts Python here.

    As root: `unshare -n` (new network namespace, no user namespace) then `setpriv` to uid/gid 65534 with no
    capabilities. As another user: `unshare -rn` (user + network namespace). Each layer is probed and dropped
    if it does not work on this machine (the audit hook still blocks sockets in Python).
    """
    root = os.geteuid() == 0
    net: tuple[str, ...] = ()
    if network_namespace and shutil.which("unshare"):
        net = ("unshare", "-n") if root else ("unshare", "-rn")
    priv: tuple[str, ...] = _SETPRIV if (drop_privileges and root and shutil.which("setpriv")) else ()
    for candidate in (net + priv, net, priv, ()):
        if not candidate or _works(candidate + (python, "-I", "-c", "pass")):
            return candidate
    return ()


def network_namespace_available(limits: "SandboxLimits | None" = None) -> bool:
    """Whether sandboxed programs get an empty network namespace here (unshare works)."""
    limits = limits or SandboxLimits()
    return "unshare" in _prefix(limits.python, limits.network_namespace, limits.drop_privileges)


def sandbox_description(limits: "SandboxLimits | None" = None) -> dict:
    """What protection is actually in force on this machine (logged into every eval summary)."""
    limits = limits or SandboxLimits()
    prefix = _prefix(limits.python, limits.network_namespace, limits.drop_privileges)
    return {
        "launcher": " ".join(prefix),
        "network_namespace": "unshare" in prefix,
        "audit_hook_network_guard": True,
        "runs_as_nobody": "setpriv" in prefix,
        **{k: v for k, v in asdict(limits).items() if k != "python"},
    }


def _guard_source(limits: SandboxLimits, as_nobody: bool) -> str:
    """The bootstrap with this run's limits filled in (soft = hard, except CPU: SIGXCPU, then SIGKILL 1 s later)."""
    mb = 1 << 20
    values = [("RLIMIT_CPU", int(limits.cpu_s)), ("RLIMIT_AS", limits.memory_mb * mb),
              ("RLIMIT_FSIZE", limits.fsize_mb * mb), ("RLIMIT_NOFILE", limits.nofile), ("RLIMIT_CORE", 0)]
    if as_nobody:  # fork bombs: capped per uid 65534 (root itself is exempt from RLIMIT_NPROC)
        values.append(("RLIMIT_NPROC", limits.nproc))
    return _GUARD.replace("LIMITS", repr(values), 1)


def _tail(path: str, n: int) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return text if len(text) <= n else text[: n // 2] + "\n...[truncated]...\n" + text[-n // 2 :]


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_python(code: str, limits: SandboxLimits = SandboxLimits(), stdin: str = "") -> SandboxResult:
    """Run `code` as a Python program under `limits`. Never raises for anything the program does.

    Status: passed (exit 0), failed (non-zero exit or killed by a signal, e.g. an assertion, MemoryError,
    an exception), timeout (wall limit, or CPU limit: SIGXCPU/SIGKILL after cpu_s), error (the sandbox itself
    could not start the program).
    """
    start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="tropd_sandbox_")
    try:
        prefix = _prefix(limits.python, limits.network_namespace, limits.drop_privileges)
        cmd = [*prefix, limits.python, "-I", "-B", "-c", _guard_source(limits, "setpriv" in prefix)]
        if "setpriv" in prefix:
            os.chmod(workdir, 0o777)  # the program runs as nobody and writes its outputs here
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
            f.write(code)
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
               "PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": workdir}
        out_path, err_path = os.path.join(workdir, "stdout.txt"), os.path.join(workdir, "stderr.txt")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                proc = subprocess.Popen(
                    cmd, cwd=workdir, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err,
                    start_new_session=True, close_fds=True,
                )
            except OSError as e:
                return SandboxResult(ERROR, None, "", "", time.monotonic() - start, f"could not start: {e}")
            timed_out = False
            try:
                proc.communicate(input=stdin.encode(), timeout=limits.wall_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc)  # also reaps anything the program forked into its group
                proc.wait()
        wall = time.monotonic() - start
        stdout, stderr = _tail(out_path, limits.output_chars), _tail(err_path, limits.output_chars)
        rc = proc.returncode
        if timed_out:
            return SandboxResult(TIMEOUT, rc, stdout, stderr, wall, f"wall limit {limits.wall_s:g}s")
        if rc == 0:
            return SandboxResult(PASSED, rc, stdout, stderr, wall, "")
        if rc is not None and rc < 0:
            sig = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
            if -rc in (signal.SIGXCPU, signal.SIGKILL) and _cpu_exhausted(stderr, sig, limits, wall):
                return SandboxResult(TIMEOUT, rc, stdout, stderr, wall, f"CPU limit {limits.cpu_s}s ({sig})")
            return SandboxResult(FAILED, rc, stdout, stderr, wall, f"signal {sig}")
        last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        return SandboxResult(FAILED, rc, stdout, stderr, wall, f"exit {rc}: {last[:200]}")
    except Exception as e:  # the harness must survive anything; report it as a sandbox error
        return SandboxResult(ERROR, None, "", "", time.monotonic() - start, f"{type(e).__name__}: {e}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _cpu_exhausted(stderr: str, sig: str, limits: SandboxLimits, wall: float) -> bool:
    # SIGXCPU is only sent for RLIMIT_CPU; a SIGKILL counts as CPU exhaustion when the run lasted past cpu_s.
    return sig == "SIGXCPU" or wall >= limits.cpu_s
