"""Build the rollout engines a run asks for, and hand them the student's weights after every optimizer step."""
from __future__ import annotations

from pathlib import Path

from megatron_tropd.distributed.parallel import ParallelGroups


def build_engines(cfg, student_dir: Path, teacher_dir: Path, vocab: int, pad_id: int, on_this_rank: bool) -> dict:
    """{"student": engine, "teacher": engine (only when the teacher writes: prefixes, offline rollouts, held-out
    teacher samples)} on the rank that generates (global rank 0), {} elsewhere. The student engine starts from the
    same HF weights as the megatron student."""
    if cfg.rollout.engine not in ("embedded", "sglang"):
        raise ValueError(f"rollout.engine={cfg.rollout.engine!r} is unknown; use embedded or sglang")
    if cfg.rollout.engine == "sglang":
        from megatron_tropd.rollout.sglang_config import SGLangConfig, validate

        validate(getattr(cfg, "sglang", SGLangConfig()))  # on every rank: bad settings fail everywhere at once
    if not on_this_rank:
        return {}
    needs_teacher = needs_teacher_engine(cfg)
    if cfg.rollout.engine == "sglang":
        from megatron_tropd.rollout.sglang_scoring import sglang_scores_teacher

        return build_sglang_engines(cfg, student_dir, teacher_dir, needs_teacher or sglang_scores_teacher(cfg),
                                    vocab=vocab)
    from megatron_tropd.models.arch import torch_dtype
    from megatron_tropd.rollout.embedded import EmbeddedEngine

    dtype = torch_dtype(cfg.rollout.engine_dtype)
    engines = {"student": EmbeddedEngine(str(student_dir), dtype=dtype, vocab_size=vocab, pad_token_id=pad_id)}
    if needs_teacher:
        engines["teacher"] = EmbeddedEngine(str(teacher_dir), dtype=dtype, vocab_size=vocab, pad_token_id=pad_id)
    return engines


def needs_teacher_engine(cfg) -> bool:
    """The teacher writes tokens when TrOPD prefixes are on, when some step has teacher-written (offline) rollouts,
    or when the held-out evaluation samples the teacher (eval.teacher_samples with data.eval_size > 0; with SGLang
    only where a teacher server is configured: sglang.teacher_urls or sglang.teacher_servers >= 1)."""
    offline = getattr(cfg, "offline", None)
    if (cfg.guidance.enabled and cfg.guidance.prefix_fraction > 0) or (offline is not None and offline.active):
        return True
    if not (getattr(cfg.eval, "teacher_samples", False) and cfg.data.eval_size > 0):
        return False
    sg = getattr(cfg, "sglang", None)
    return cfg.rollout.engine != "sglang" or bool(sg is not None and (sg.urls("teacher") or sg.teacher_servers > 0))


def build_sglang_engines(cfg, student_dir: Path, teacher_dir: Path, needs_teacher: bool,
                         vocab: int | None = None) -> dict:
    """Attach to the configured / exported server URLs of each role, or launch servers (all at once, then wait
    for every /health_generate). Launched servers are owned by the engines: `close()` stops them; a failed
    start-up stops the ones already started. When the teacher servers also score (`sglang_scores_teacher`) at
    rollout.temperature T != 1, launched ones serve the teacher folded for T (sglang_scoring.fold_temperature)
    and the teacher engine samples prefixes at T / T_fold; attached ones report their fold on /model_info."""
    import logging

    from megatron_tropd.rollout import sglang_server as srv
    from megatron_tropd.rollout.sglang import SGLangEngine
    from megatron_tropd.rollout.sglang_config import SGLangConfig
    from megatron_tropd.rollout.sglang_scoring import fold_temperature, servers_fold, sglang_scores_teacher

    sg = getattr(cfg, "sglang", SGLangConfig())
    run_dir = Path(cfg.train.run_dir)
    log_dir = Path(sg.log_dir) if sg.log_dir else run_dir / "sglang"
    weights_dir = Path(sg.weights_dir) if sg.weights_dir else run_dir / "sglang_weights"
    roles = {"student": (Path(student_dir), sg.student_servers)}
    folds = {"student": 1.0, "teacher": 1.0}
    if needs_teacher:
        t = float(cfg.rollout.temperature)
        if sglang_scores_teacher(cfg) and t != 1.0 and not sg.urls("teacher"):
            # input log-probs are at the server's raw logits: serve the teacher's logits / T
            teacher_dir = fold_temperature(teacher_dir, run_dir / f"sglang_teacher_T{t:g}", t)
            folds["teacher"] = t
        roles["teacher"] = (Path(teacher_dir), sg.teacher_servers)
    launched: dict[str, list] = {}
    try:
        for role, (path, count) in roles.items():
            if not sg.urls(role):
                if count < 1:
                    raise ValueError(f"rollout.engine=sglang needs {role} servers: set sglang.{role}_urls or "
                                     f"sglang.{role}_servers >= 1")
                launched[role] = [srv.launch(path, sg, log_dir, role, i, weight_version=0) for i in range(count)]
        waited = srv.wait_healthy([s for ss in launched.values() for s in ss], sg.startup_timeout_s) \
            if launched else 0.0
        if launched:
            logging.getLogger(__name__).info(f"SGLang servers healthy after {waited:.0f}s (logs in {log_dir})")
        engines = {}
        for role, (path, _) in roles.items():
            fold = folds[role]
            if role == "teacher" and sg.urls(role):  # attached: whatever their checkpoints are folded for
                fold = servers_fold(sg.urls(role), sg.teacher_logit_temperature)
            engines[role] = SGLangEngine(urls=sg.urls(role) or None, servers=launched.get(role), cfg=sg, role=role,
                                         base_model_dir=path, weights_dir=weights_dir if role == "student" else None,
                                         logit_temperature=fold, vocab_size=vocab)
        return engines
    except BaseException:
        for ss in launched.values():
            for s in ss:
                srv.stop(s)
        raise


def sync_weights(engines: dict, student, groups: ParallelGroups, arch, version: int) -> None:
    """Stream the student's HF-named tensors into the student engine (collective over the TP x PP ranks: every rank
    takes part in the gathers, the generating rank consumes the stream). A failed update raises on every rank
    (the run stops instead of training on stale weights)."""
    import torch.distributed as dist

    from megatron_tropd.conversion.hf_io import iter_hf_tensors

    stream = iter_hf_tensors(student.gpt, groups, arch)
    error = None
    if "student" in engines:
        try:
            engines["student"].update_weights(stream, version)
        except Exception as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
            error = e
    else:
        for _ in stream:
            pass
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None and error is None:
            raise RuntimeError(f"weight sync to version {version} failed on the generating rank: {box[0]}")
    if error is not None:
        raise error
