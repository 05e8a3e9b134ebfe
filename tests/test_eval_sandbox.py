"""The code sandbox: hostile programs (infinite loop, memory hog, network, file writes) are scored wrong, within
the limits, and the harness process is unharmed; correct code passes."""
import os
import resource
import socket
import time

import pytest

from megatron_tropd.evaluation.benchmarks import Problem, load_benchmark
from megatron_tropd.evaluation.sandbox import (
    FAILED, PASSED, TIMEOUT, SandboxLimits, network_namespace_available, run_python, sandbox_description,
)
from megatron_tropd.evaluation.scorers import CodeScorer

LIMITS = SandboxLimits(wall_s=3.0, cpu_s=1, memory_mb=512)  # for programs that must fail
ROOMY = SandboxLimits(wall_s=30.0, cpu_s=10, memory_mb=512)  # for programs that must pass, even on a busy machine


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}


@pytest.fixture
def harness_state():
    """Snapshot of the test (harness) process; asserted unchanged after each hostile program."""
    before = (os.getpid(), resource.getrlimit(resource.RLIMIT_AS), resource.getrlimit(resource.RLIMIT_CPU),
              os.getcwd(), _env())
    yield
    after = (os.getpid(), resource.getrlimit(resource.RLIMIT_AS), resource.getrlimit(resource.RLIMIT_CPU),
             os.getcwd(), dict(os.environ))
    assert after[:4] == before[:4]
    changed = {k for k in set(after[4]) | set(before[4]) if after[4].get(k) != before[4].get(k)} - {"PYTEST_CURRENT_TEST"}
    assert not changed, f"environment changed: {sorted(changed)}"
    assert len(bytearray(64 << 20)) == 64 << 20  # the harness can still allocate


def test_correct_program_passes_and_wrong_fails(harness_state):
    ok = run_python("def f(x):\n    return x * 2\nassert f(3) == 6\nprint('ok')", ROOMY)
    assert ok.status == PASSED and ok.stdout.strip() == "ok"
    bad = run_python("def f(x):\n    return x + 2\nassert f(3) == 6", ROOMY)
    assert bad.status == FAILED and "AssertionError" in bad.detail
    syn = run_python("def f(:\n", ROOMY)
    assert syn.status == FAILED and "SyntaxError" in syn.stderr


def test_infinite_loop_hits_cpu_limit_within_wall_limit(harness_state):
    t = time.monotonic()
    r = run_python("while True:\n    pass", LIMITS)
    assert r.status == TIMEOUT  # CPU limit (1 s), or the wall limit on a busy machine
    assert time.monotonic() - t < LIMITS.wall_s + 1.0


def test_sleeping_program_hits_wall_limit_and_its_children_die(harness_state, tmp_path):
    t = time.monotonic()
    code = "import os, time\nif os.fork() == 0:\n    time.sleep(30)\ntime.sleep(30)"
    r = run_python(code, SandboxLimits(wall_s=1.0, cpu_s=1))
    assert r.status == TIMEOUT and "wall" in r.detail
    assert time.monotonic() - t < 2.5
    # no sandbox process is left behind (the whole group was killed)
    time.sleep(0.2)
    left = [p for p in os.listdir("/proc") if p.isdigit() and _cmdline(p).startswith("import os, time")]
    assert not left


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def test_memory_hog_is_stopped(harness_state):
    t = time.monotonic()
    r = run_python("x = bytearray(4 << 30)\nprint('allocated')", ROOMY)
    assert r.status == FAILED and "MemoryError" in r.detail and "allocated" not in r.stdout
    r = run_python("x = []\nwhile True:\n    x.append(' ' * (1 << 20))", SandboxLimits(wall_s=3.0, cpu_s=1, memory_mb=128))
    assert r.status in (FAILED, TIMEOUT) and r.status != PASSED
    assert time.monotonic() - t < ROOMY.wall_s + 2 * LIMITS.wall_s


def test_output_flood_is_capped(harness_state):
    r = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", LIMITS)
    assert r.status in (FAILED, TIMEOUT)
    assert len(r.stdout) <= LIMITS.output_chars + 100


@pytest.mark.parametrize("namespace", [True, False])
def test_network_is_blocked_before_it_leaves(harness_state, namespace):
    """A listener in the harness gets no connection; the external address fails at once (nothing is sent:
    the audit hook refuses before the system call, and the empty namespace has no route)."""
    limits = SandboxLimits(wall_s=10.0, cpu_s=5, memory_mb=512, network_namespace=namespace)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.3)
    port = listener.getsockname()[1]
    try:
        for target in [("127.0.0.1", port), ("10.255.255.1", 80)]:
            # a connect that was not blocked would hang past the wall limit (status timeout, not failed)
            code = (f"import socket\ns = socket.create_connection({target!r}, timeout=30)\n"
                    "print('CONNECTED')\n")
            t = time.monotonic()
            r = run_python(code, limits)
            assert r.status == FAILED and "CONNECTED" not in r.stdout, (target, r)
            assert "network access is disabled" in r.stderr
            assert time.monotonic() - t < limits.wall_s, "blocked at once, not by a connect timeout"
        with pytest.raises(socket.timeout):
            listener.accept()
        # the harness itself still has network: its own listener accepts a local connection
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            conn, _ = listener.accept()
            conn.close()
    finally:
        listener.close()


@pytest.mark.skipif(not network_namespace_available(), reason="unshare cannot create a network namespace here")
def test_network_namespace_blocks_raw_libc_connect(harness_state):
    """ctypes bypasses the Python audit hook; the empty network namespace still has no route (ENETUNREACH)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.3)
    port = listener.getsockname()[1]
    code = f"""
import ctypes, struct, errno, sys
libc = ctypes.CDLL(None, use_errno=True)
for ip, port in [((127, 0, 0, 1), {port}), ((10, 255, 255, 1), 80)]:
    fd = libc.socket(2, 1, 0)
    assert fd >= 0, "socket() failed"
    addr = struct.pack("!HH4B8x", 2, port, *ip)[0:2][::-1] + struct.pack("!H4B8x", port, *ip)
    rc = libc.connect(fd, addr, len(addr))
    print(ip, rc, errno.errorcode.get(ctypes.get_errno()))
    assert rc != 0
sys.exit(3)
"""
    try:
        r = run_python(code, SandboxLimits(wall_s=10.0, cpu_s=5, memory_mb=512))
        assert r.returncode == 3, r  # both connects failed (and the program got to the end)
        assert r.stdout.count("ENETUNREACH") == 2, r.stdout
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()


def test_program_cannot_write_harness_files(harness_state, tmp_path):
    if not sandbox_description()["runs_as_nobody"]:
        pytest.skip("not root, or setpriv unavailable: the sandbox runs as the harness user (documented)")
    target = tmp_path / "victim.txt"
    target.write_text("safe")
    os.chmod(tmp_path, 0o755)
    r = run_python(f"open({str(target)!r}, 'w').write('pwned')", ROOMY)
    assert r.status == FAILED and "Permission denied" in r.stderr
    assert target.read_text() == "safe"


def test_humaneval_canonical_passes_and_hostile_completions_fail(harness_state):
    bench = load_benchmark("humaneval", limit=1)
    p = bench.problems[0]
    scorer = CodeScorer(LIMITS)
    assert CodeScorer(ROOMY)(p.answer, p).correct  # the canonical solution (a raw continuation of the prompt)
    fenced = "Here you go:\n```python\n" + p.code_prompt + p.answer + "```\n"
    assert CodeScorer(ROOMY)(fenced, p).correct  # a full redefinition in a code block
    t = time.monotonic()
    assert not scorer("    while True:\n        pass\n", p).correct
    assert not scorer("    import socket\n    socket.create_connection(('10.255.255.1', 80))\n", p).correct
    assert not scorer("    return True\n", p).correct
    assert time.monotonic() - t < 3 * (LIMITS.wall_s + 2)  # each stopped by its limit (+ start-up on a busy box)


def test_stdin_stdout_tests():
    p = Problem(id="io", prompt="sum", tests=[{"input": "1 2\n", "output": "3"}, {"input": "5 5\n", "output": "10"}])
    scorer = CodeScorer(ROOMY)
    assert scorer("```python\na, b = map(int, input().split())\nprint(a + b)\n```", p).correct
    s = scorer("```python\na, b = map(int, input().split())\nprint(a * b)\n```", p)
    assert not s.correct and "case 0" in s.detail
