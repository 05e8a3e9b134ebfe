"""`tropd launch [--dry-run] CONFIG [key=value ...]`: resolve a run config against SLURM (or this machine).

It prints (and without --dry-run, starts for THIS node) exactly:
- the node roles: trainer nodes first, dedicated SGLang nodes last (or servers colocated on trainer GPUs);
- one `torchrun` per trainer node (static rendezvous at the first trainer node, so node i holds global ranks
  [i*G, (i+1)*G) and the printed rank layout is the real one);
- one `python -m sglang.launch_server` per server (GPUs, port, TP, memory fraction);
- the TP/PP/DP coordinates of every trainer rank (megatron-core order tp-cp-ep-dp-pp: TP fastest, then DP,
  then PP) for the student and for each teacher with a layout of its own (`teacher.scorer: own_layout`, time-shared
  on the same GPUs; a same-layout teacher shares the student's coordinates, so their vocabulary shards coincide);
- the per-GPU memory plan from `tropd plan`, each role in its own layout.

The trainer learns the server URLs from TROPD_SGLANG_STUDENT_URLS / TROPD_SGLANG_TEACHER_URLS
(comma-separated `http://host:port`).
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import sys
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from megatron_tropd.config import ClusterConfig, load_run_config
from megatron_tropd.rollout import sglang_server as srv
from megatron_tropd.rollout.sglang_config import SGLangConfig

DEFAULT_PORT_BASE = 30000  # sglang.port_base = 0 means "free ports" locally; on a cluster, ports from here
from megatron_tropd.config import Config


# ------------------------------------------------------------------------------------------------ environment
def expand_nodelist(text: str) -> list[str]:
    """SLURM hostlist -> hostnames: 'node[01-03,07],gpu-a[1-2]b' -> node01 node02 node03 node07 gpu-a1b gpu-a2b."""
    out: list[str] = []
    for item in _split_top(text.strip()):
        m = re.search(r"\[([^\]]*)\]", item)
        if not m:
            if item:
                out.append(item)
            continue
        head, tail = item[: m.start()], item[m.end():]
        for part in m.group(1).split(","):
            lo, _, hi = part.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise ValueError(f"cannot parse SLURM node list {text!r} (range {part!r})")
            width = len(lo)
            for i in range(int(lo), int(hi or lo) + 1):
                out.extend(expand_nodelist(f"{head}{i:0{width}d}{tail}"))
    return out


def _split_top(text: str) -> list[str]:
    """Split at commas outside brackets."""
    items, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    return [i.strip() for i in items if i.strip()]


def hostnames(nodelist: str) -> list[str]:
    """`scontrol show hostnames` when available (authoritative), else `expand_nodelist`."""
    if shutil.which("scontrol"):
        try:
            res = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True)
            hosts = res.stdout.split()
            if hosts:
                return hosts
        except (subprocess.SubprocessError, OSError):
            pass
    return expand_nodelist(nodelist)


def _gpus_from_env(env: Mapping[str, str]) -> int | None:
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = env.get(key)
        if value:
            m = re.search(r"(\d+)(\(|$)", value.split(",")[0])  # '8', 'h100:8', '8(x2)'
            if m:
                return int(m.group(1))
    return None


def _local_gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch/CUDA: no GPUs
        return 0


@dataclass
class ClusterEnv:
    hosts: list[str]
    gpus_per_node: int
    job_id: str
    node_id: int  # this node's index in hosts
    slurm: bool


def resolve_env(env: Mapping[str, str], cluster: ClusterConfig) -> ClusterEnv:
    """The allocation from SLURM_* variables, or the local machine; config values (non-zero) win."""
    slurm = "SLURM_JOB_ID" in env and "SLURM_JOB_NODELIST" in env
    if slurm:
        hosts = hostnames(env["SLURM_JOB_NODELIST"])
        nnodes = int(env.get("SLURM_NNODES", len(hosts)))
        if nnodes != len(hosts):
            raise ValueError(f"SLURM_NNODES={nnodes} but SLURM_JOB_NODELIST expands to {len(hosts)} hosts {hosts}")
        gpus = cluster.gpus_per_node or _gpus_from_env(env)
        if not gpus:
            raise ValueError("cannot tell GPUs per node: request them with #SBATCH --gpus-per-node=N "
                             "or set cluster.gpus_per_node")
        node_id = int(env.get("SLURM_NODEID", "0"))
        job_id = env["SLURM_JOB_ID"]
    else:
        hosts = [env.get("TROPD_HOSTNAME", "localhost")]
        gpus = cluster.gpus_per_node or _local_gpu_count() or 1
        node_id, job_id = 0, env.get("TROPD_JOB_ID", "local")
    if cluster.nodes and cluster.nodes != len(hosts):
        raise ValueError(f"cluster.nodes={cluster.nodes} but the allocation has {len(hosts)} nodes; "
                         f"set cluster.nodes=0 (take it from SLURM) or match #SBATCH --nodes")
    if not 0 <= node_id < len(hosts):
        raise ValueError(f"SLURM_NODEID={node_id} is outside the {len(hosts)} allocated nodes")
    return ClusterEnv(hosts, gpus, job_id, node_id, slurm)


# ------------------------------------------------------------------------------------------------ the plan
@dataclass
class Server:
    role: str  # student | teacher
    index: int
    host: str
    port: int
    gpus: list[int]
    model_path: str

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass
class RankInfo:
    rank: int
    host: str
    local_rank: int
    tp: int
    pp: int
    dp: int


@dataclass
class TeacherLayout:
    name: str
    kind: str  # same_layout | own_layout | sglang
    tp: int
    pp: int
    dp: int


@dataclass
class LaunchPlan:
    env: ClusterEnv
    trainer_hosts: list[str]
    rollout_hosts: list[str]
    tp: int
    pp: int
    dp: int
    ranks: list[RankInfo]
    servers: list[Server]
    processes: dict[str, list[tuple[dict[str, str], list[str]]]] = field(default_factory=dict)  # host -> (env, argv)
    notes: list[str] = field(default_factory=list)
    teachers: list[TeacherLayout] = field(default_factory=list)


def rank_coords(rank: int, tp: int, pp: int, dp: int) -> tuple[int, int, int]:
    """(tp_rank, pp_rank, dp_rank) in megatron-core's default order tp-cp-ep-dp-pp (cp = ep = 1)."""
    return rank % tp, rank // (tp * dp), (rank // tp) % dp


def _place_servers(cfg: Config, sg: SGLangConfig, hosts: list[str], gpus: int) -> list[Server]:
    slots_per_node = gpus // sg.tp_size
    if slots_per_node < 1:
        raise ValueError(f"sglang.tp_size={sg.tp_size} exceeds the {gpus} GPUs of a node")
    wanted = [("student", i, cfg.student.path) for i in range(sg.student_servers)]
    wanted += [("teacher", i, cfg.teacher.path) for i in range(sg.teacher_servers)]
    capacity = slots_per_node * len(hosts)
    if len(wanted) > capacity:
        raise ValueError(f"{len(wanted)} SGLang servers x TP {sg.tp_size} do not fit on {len(hosts)} node(s) x "
                         f"{gpus} GPUs ({capacity} slots); add cluster.rollout_nodes or lower sglang.*_servers")
    servers = []
    for n, (role, i, path) in enumerate(wanted):
        slot = n % slots_per_node
        host = hosts[n // slots_per_node]
        servers.append(Server(role, i, host, (sg.port_base or DEFAULT_PORT_BASE) + slot,
                              list(range(slot * sg.tp_size, (slot + 1) * sg.tp_size)), path))
    return servers


def make_plan(cfg: Config, sg: SGLangConfig, cl: ClusterConfig, env: ClusterEnv, config_path: str,
              overrides: list[str]) -> LaunchPlan:
    hosts, gpus = env.hosts, env.gpus_per_node
    use_sglang = cfg.rollout.engine == "sglang" and (sg.student_servers + sg.teacher_servers) > 0
    rollout_nodes = cl.rollout_nodes if (use_sglang and sg.placement == "dedicated") else 0
    if use_sglang and sg.placement == "dedicated" and rollout_nodes == 0:
        raise ValueError("sglang.placement=dedicated needs cluster.rollout_nodes >= 1 (or use "
                         "sglang.placement=colocated)")
    trainer_nodes = cl.trainer_nodes or len(hosts) - rollout_nodes
    if trainer_nodes < 1 or trainer_nodes + rollout_nodes > len(hosts):
        raise ValueError(f"trainer_nodes={trainer_nodes} + rollout_nodes={rollout_nodes} must fit the "
                         f"{len(hosts)} allocated nodes; request more nodes or lower cluster.rollout_nodes")
    trainer_hosts = hosts[:trainer_nodes]
    rollout_hosts = hosts[len(hosts) - rollout_nodes:] if rollout_nodes else []
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    world = trainer_nodes * gpus
    if world % (tp * pp):
        raise ValueError(f"trainer world size {world} ({trainer_nodes} nodes x {gpus} GPUs) is not divisible by "
                         f"TP {tp} x PP {pp}; change parallel.* or cluster.trainer_nodes")
    dp = world // (tp * pp)
    from megatron_tropd.training.teachers import teacher_specs

    teachers = [TeacherLayout(s.name, s.kind, s.tp, s.pp, world // (s.tp * s.pp) if s.tp else 0)
                for s in teacher_specs(cfg, world)]
    ranks = []
    for r in range(world):
        t, p, d = rank_coords(r, tp, pp, dp)
        ranks.append(RankInfo(r, trainer_hosts[r // gpus], r % gpus, t, p, d))
    servers = []
    notes = []
    if use_sglang:
        servers = _place_servers(cfg, sg, rollout_hosts if sg.placement == "dedicated" else trainer_hosts, gpus)
        if sg.placement == "colocated" and (sg.mem_fraction_static or 0.9) > 0.5:
            notes.append(f"colocated servers with mem_fraction_static={sg.mem_fraction_static}: the trainer "
                         f"shares these GPUs; keep it <= 0.5 unless the servers release memory during training")
    elif cfg.rollout.engine == "embedded":
        notes.append("rollout.engine=embedded: no SGLang servers (generation runs inside the trainer ranks)")
    plan = LaunchPlan(env, trainer_hosts, rollout_hosts, tp, pp, dp, ranks, servers, notes=notes, teachers=teachers)
    plan.processes = node_processes(plan, sg, cl, config_path, overrides)
    return plan


def _env_prefix(env: dict[str, str]) -> str:
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())


def server_argv(s: Server, sg: SGLangConfig) -> list[str]:
    python = sg.resolved_python()
    # Trainer ranks on other nodes reach these servers: a loopback bind address (the local default) becomes 0.0.0.0.
    host = "0.0.0.0" if sg.host in ("127.0.0.1", "localhost") else sg.host
    argv = [python, "-m", "sglang.launch_server", "--model-path", s.model_path,
            "--tp-size", str(sg.tp_size), "--host", host, "--port", str(s.port)]
    if sg.mem_fraction_static is not None:
        argv += ["--mem-fraction-static", str(sg.mem_fraction_static)]
    argv += ["--dtype", sg.dtype]
    if sg.context_length:
        argv += ["--context-length", str(sg.context_length)]
    return argv + list(sg.extra_args)


def trainer_env(plan: LaunchPlan, cl: ClusterConfig) -> dict[str, str]:
    env = {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}  # megatron: ordered TP/SP communication kernels
    for role in ("student", "teacher"):
        urls = [s.url for s in plan.servers if s.role == role]
        if urls:
            env[f"TROPD_SGLANG_{role.upper()}_URLS"] = ",".join(urls)
    env.update(cl.env)
    return env


def trainer_argv(plan: LaunchPlan, node_rank: int, cl: ClusterConfig, config_path: str,
                 overrides: list[str]) -> list[str]:
    return ["torchrun", f"--nnodes={len(plan.trainer_hosts)}", f"--nproc-per-node={plan.env.gpus_per_node}",
            f"--node-rank={node_rank}", "--rdzv-backend=static",
            f"--rdzv-endpoint={plan.trainer_hosts[0]}:{cl.rdzv_port}", f"--rdzv-id={plan.env.job_id}",
            "--max-restarts=0", "-m", "megatron_tropd.cli", "train", "--config", config_path, *overrides]


def node_processes(plan: LaunchPlan, sg: SGLangConfig, cl: ClusterConfig, config_path: str,
                   overrides: list[str]) -> dict[str, list[tuple[dict[str, str], list[str]]]]:
    """host -> [(extra environment, argv)]: servers first, then the node's torchrun."""
    out: dict[str, list[tuple[dict[str, str], list[str]]]] = {h: [] for h in plan.env.hosts}
    for s in plan.servers:
        out[s.host].append(({"CUDA_VISIBLE_DEVICES": ",".join(map(str, s.gpus)), **cl.env}, server_argv(s, sg)))
    tenv = trainer_env(plan, cl)
    for i, host in enumerate(plan.trainer_hosts):
        out[host].append((tenv, trainer_argv(plan, i, cl, config_path, overrides)))
    return out


def command_line(env: dict[str, str], argv: list[str]) -> str:
    return f"{_env_prefix(env)} {shlex.join(argv)}".strip()


# ------------------------------------------------------------------------------------------------ memory plan
_ALIASES = {"deepseek-r1-distill-qwen-1.5b": "r1-distill-qwen-1.5b", "skywork-or1-math-7b": "skywork-or1-math-7b",
            "qwen3-1.7b": "qwen3-1.7b", "qwen3-4b": "qwen3-4b", "qwen3-8b": "qwen3-8b", "qwen3-32b": "qwen3-32b"}


def _arch_for(path: str, preset: str | None):
    from megatron_tropd.cluster import plan as planmod

    if preset:
        return planmod.resolve_arch(preset)
    if path and (Path(path) / "config.json").is_file():
        return planmod.resolve_arch(path)
    base = Path(path.split(":", 1)[-1]).name.lower()
    for alias, name in _ALIASES.items():
        if alias in base:
            return planmod.PRESETS[name]
    return None


def memory_summary(cfg: Config, plan: LaunchPlan, student_arch: str | None, teacher_arch: str | None,
                   flash: bool = True) -> str:
    """`tropd plan` for this run (the student and `teacher`, each in its layout); flash=True: GPU runs use the
    Transformer Engine spec (no [s, s] scores)."""
    from megatron_tropd.cluster import plan as planmod

    s, t = _arch_for(cfg.student.path, student_arch), _arch_for(cfg.teacher.path, teacher_arch)
    if s is None or t is None:
        return ("memory plan: skipped (no config.json at student/teacher path on this host; pass "
                "--student-arch/--teacher-arch with a preset: " + ", ".join(planmod.PRESETS) + ")")
    seq = (cfg.data.max_prompt_tokens or 512) + cfg.rollout.max_new_tokens
    layout = planmod.Layout(plan.tp, plan.pp, plan.dp, cfg.parallel.sequence_parallel,
                            cfg.parallel.use_distributed_optimizer)
    work = planmod.Workload(seq, cfg.optim.micro_batch_size, cfg.student.recompute_activations,
                            cfg.student.dtype, cfg.teacher.dtype, flash_attention=flash)
    kind = "flash/TE attention" if flash else "local attention"
    head = f"memory plan (sequence {seq} tokens, micro-batch {work.micro_batch}, {kind}):\n"
    first = plan.teachers[0] if plan.teachers else TeacherLayout(cfg.teacher.name, "same_layout", plan.tp, plan.pp,
                                                                 plan.dp)
    extra = ("\nnote: the other teachers' weights add to each GPU's resident memory (see tropd plan)"
             if len(plan.teachers) > 1 else "")
    if first.kind == "same_layout":
        return head + planmod.format_plan(planmod.memory_plan(s, t, layout, work), layout) + extra
    s_plan = planmod.student_plan(s, layout, work)
    if first.kind == "sglang":
        return head + planmod.format_role(s_plan, cfg.student.path) + "\n" + planmod.format_pair(
            planmod.pair_plan(s, t, layout, None, work, "servers")) + extra
    t_layout = planmod.teacher_layout(first.tp, first.pp, len(plan.ranks), cfg.parallel.sequence_parallel)
    pair = planmod.pair_plan(s, t, layout, t_layout, work, "own_layout", cfg.teacher.offload)
    return "\n".join([head + planmod.format_role(s_plan, cfg.student.path),
                      planmod.format_role(pair.teacher, cfg.teacher.path, "(own layout, time-shared)"),
                      planmod.format_pair(pair)]) + extra


def _layout_lines(plan: LaunchPlan) -> list[str]:
    world = len(plan.ranks)
    if all(t.kind == "same_layout" for t in plan.teachers):
        return [f"layout (student and teacher): TP={plan.tp} PP={plan.pp} DP={plan.dp} world={world}"]
    lines = [f"layout (student): TP={plan.tp} PP={plan.pp} DP={plan.dp} world={world}"]
    for t in plan.teachers:
        label = "teacher" if t.name == "teacher" else f"teacher {t.name}"
        if t.kind == "sglang":
            lines.append(f"layout ({label}): scored by the SGLang teacher servers")
        elif t.kind == "same_layout":
            lines.append(f"layout ({label}): the student's (TP={t.tp} PP={t.pp} DP={t.dp})")
        else:
            lines.append(f"layout ({label}): TP={t.tp} PP={t.pp} DP={t.dp} world={world} (own layout, "
                         f"time-shared with the student on the trainer GPUs)")
    return lines


def describe(plan: LaunchPlan, memory: str) -> str:
    e = plan.env
    lines = [f"job {e.job_id}: {len(e.hosts)} node(s) x {e.gpus_per_node} GPUs "
             f"({'SLURM' if e.slurm else 'local'}); this node: {e.hosts[e.node_id]} (node {e.node_id})",
             f"trainer nodes: {' '.join(plan.trainer_hosts)}",
             f"rollout nodes: {' '.join(plan.rollout_hosts) or '-'}",
             *_layout_lines(plan), "ranks:"]
    own = [t for t in plan.teachers if t.kind == "own_layout"]
    for r in plan.ranks:
        line = f"  rank {r.rank:>4} {r.host} local {r.local_rank}: tp={r.tp} pp={r.pp} dp={r.dp}"
        for t in own:
            tt, tpp, td = rank_coords(r.rank, t.tp, t.pp, t.dp)
            line += f" | {'teacher' if t.name == 'teacher' else 'teacher ' + t.name}: tp={tt} pp={tpp} dp={td}"
        lines.append(line)
    lines.append("servers:" if plan.servers else "servers: none")
    for s in plan.servers:
        lines.append(f"  {s.role}[{s.index}] {s.url} gpus {','.join(map(str, s.gpus))}")
    lines += [f"note: {n}" for n in plan.notes]
    lines.append("commands:")
    for host in e.hosts:
        for env_, argv in plan.processes.get(host, []):
            lines.append(f"  [{host}] {command_line(env_, argv)}")
    lines.append(memory)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="print the plan and commands; start nothing")
    parser.add_argument("--student-arch", default=None, help="plan preset when the student config.json is "
                        "not on this host")
    parser.add_argument("--teacher-arch", default=None, help="same for the teacher")
    parser.add_argument("config", help="YAML run config (with optional sglang: and cluster: sections)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides (passed on to tropd train)")


def run(args: argparse.Namespace) -> int:
    try:
        cfg, sg, cl = load_run_config(args.config, args.overrides)
        env = resolve_env(os.environ, cl)
        plan = make_plan(cfg, sg, cl, env, args.config, list(args.overrides))
    except ValueError as e:  # ConfigError included: one line naming the key and the fix, no traceback
        print(f"tropd launch: {e}", file=sys.stderr)
        return 2
    print(describe(plan, memory_summary(cfg, plan, args.student_arch, args.teacher_arch)), flush=True)
    if args.dry_run:
        return 0
    return launch_this_node(plan, sg, cl)


def launch_this_node(plan: LaunchPlan, sg: SGLangConfig, cl: ClusterConfig, poll_s: float = 5.0) -> int:
    """Start this node's servers (logs in {log_dir}/{job}/), then its torchrun; stop the servers at the end.
    SIGTERM/SIGINT (SLURM preemption) are forwarded to every child."""
    host = plan.env.hosts[plan.env.node_id]
    log_dir = Path(cl.log_dir) / plan.env.job_id
    log_dir.mkdir(parents=True, exist_ok=True)
    children: list[subprocess.Popen] = []

    def stop(signum=signal.SIGTERM, _frame=None):
        for c in children:
            if c.poll() is None:
                c.send_signal(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    base_env = {**os.environ, **cl.env}
    procs = plan.processes.get(host, [])
    try:
        for (env, argv), s in zip(procs, [s for s in plan.servers if s.host == host]):
            log = open(log_dir / f"{host}-sglang-{s.role}{s.index}.log", "ab")  # noqa: SIM115 - child owns it
            children.append(subprocess.Popen(argv, env={**base_env, **env}, stdout=log, stderr=subprocess.STDOUT))
        if host not in plan.trainer_hosts:
            return max((c.wait() for c in children), default=0)  # a rollout node serves until stopped
        srv.wait_healthy([srv.Server(s.url, s.role, s.index) for s in plan.servers], sg.startup_timeout_s, poll_s)
        env, argv = procs[-1]
        trainer = subprocess.Popen(argv, env={**base_env, **env})
        children.append(trainer)
        print(f"[launch] {host}: trainer node {plan.trainer_hosts.index(host)} started (pid {trainer.pid})",
              flush=True)
        return trainer.wait()
    finally:
        stop()
        for c in children:
            try:
                c.wait(timeout=30)
            except subprocess.TimeoutExpired:
                c.kill()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
