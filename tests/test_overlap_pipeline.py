"""rollout.overlap on the tiny models of test_train_loop.py: the next step's rollouts are generated while this step
trains (timeline), one weight version old, with the ratio against the engine's log-probs; start-up checks, exact
resume after a SIGKILL, and an error in the generation thread reaching the caller."""
import json
import sys
from pathlib import Path

import pytest
import torch

from megatron_tropd.distributed.spawn import run_distributed

sys.path.insert(0, str(Path(__file__).parent))
from conftest import kill_after_checkpoint  # noqa: E402
from test_train_loop import ROOT, _cli, _metrics, _overrides, _train  # noqa: E402

STEPS = 4
OPD = {"objective.name": "opd", "guidance.enabled": "false", "train.steps": STEPS, "data.eval_size": 0}
OVERLAP = {"rollout.overlap": "true", "rollout.max_weight_lag": 1}


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    """Metrics of the same 4-step run without and with overlap."""
    out = {}
    for name, extra in (("plain", {}), ("overlap", OVERLAP)):
        run_dir = tmp_path_factory.mktemp(name)
        run_distributed(_train, 1, args=(_overrides(tiny_models, run_dir, **OPD, **extra),))
        out[name] = _records(run_dir)
    return out


def test_timeline_overlaps_generation_with_the_update(runs):
    for name, rows in runs.items():
        assert [r["step"] for r in rows] == list(range(STEPS))
        for r in rows:
            assert r["timeline/rollout_start"] <= r["timeline/rollout_end"] <= r["timeline/update_start"]
            assert r["timeline/update_start"] < r["timeline/update_end"]
    plain, over = runs["plain"], runs["overlap"]
    for n in range(1, STEPS - 1):
        # overlap: step n+1's rollouts start while step n's update runs; plain: only after it
        assert over[n + 1]["timeline/rollout_start"] < over[n]["timeline/update_end"]
        assert over[n + 1]["timeline/rollout_start"] >= over[n - 1]["timeline/update_end"]  # after the sync of n-1
        assert plain[n + 1]["timeline/rollout_start"] >= plain[n]["timeline/update_end"]


def test_samples_are_exactly_one_version_old_with_overlap(runs):
    assert [r["rollout/weight_version"] for r in runs["overlap"]] == [0] + list(range(STEPS - 1))
    assert [r["rollout/weight_lag"] for r in runs["overlap"]] == [0] + [1] * (STEPS - 1)
    assert [r["rollout/weight_version"] for r in runs["plain"]] == list(range(STEPS))
    assert all(r["weight_version"] == r["step"] + 1 for rows in runs.values() for r in rows)
    # the ratio is taken against the engine's log-probs: the student moved one update since they were sampled
    assert all(r["behaviour/logprob_shift"] != 0.0 for r in runs["overlap"][1:])
    assert "behaviour/logprob_shift" not in runs["plain"][0]


def test_ratio_is_taken_against_the_rollout_logprobs():
    from megatron_tropd.objectives.opd import opd_term
    from megatron_tropd.training.step import behaviour_logprobs

    g = torch.Generator().manual_seed(0)
    lp_s = (-torch.rand(2, 5, generator=g, dtype=torch.float64)).requires_grad_()
    lp_old, lp_roll, lp_t = (-torch.rand(2, 5, generator=g, dtype=torch.float64) for _ in range(3))
    own = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)  # the rest: teacher-written
    behaviour = behaviour_logprobs(lp_old, lp_roll, own)
    assert torch.equal(behaviour[own], lp_roll[own]) and torch.equal(behaviour[~own], lp_old[~own])
    loss, _ = opd_term(lp_s, behaviour, lp_t, own)
    loss.sum().backward()
    # d(-rho r)/d lp_s = -rho r with rho = exp(lp_s - lp_roll), r = lp_t - lp_roll on the student's own tokens
    expected = -torch.exp(lp_s.detach() - lp_roll) * (lp_t - lp_roll)
    torch.testing.assert_close(lp_s.grad[own], expected[own])
    assert torch.all(lp_s.grad[~own] == 0)


def test_overlap_needs_a_weight_lag_of_at_least_one(tiny_models, tmp_path):
    from megatron_tropd.config import ConfigError, load_config

    overrides = _overrides(tiny_models, tmp_path, **{"rollout.overlap": "true", "rollout.max_weight_lag": 0})
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "examples/configs/smollm2_tropd_cpu.yaml", overrides)
    msg = str(e.value)
    assert "\n" not in msg and "rollout.overlap" in msg and "rollout.max_weight_lag" in msg
    cfg = load_config(ROOT / "examples/configs/smollm2_tropd_cpu.yaml",
                      _overrides(tiny_models, tmp_path, **OVERLAP))
    assert cfg.rollout.overlap and cfg.rollout.max_weight_lag == 1


def test_resume_after_kill_matches_uninterrupted_overlapped_run(tiny_models, tmp_path):
    extra = {**OPD, **OVERLAP, "train.save_interval": 1, "train.keep_last": 3}
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    proc = _cli(_overrides(tiny_models, full_dir, **extra))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    proc = _cli(_overrides(tiny_models, killed_dir, **extra))
    killed_at = kill_after_checkpoint(proc, killed_dir, 1)
    assert killed_at < STEPS - 1, "the run finished before it could be killed; the test proves nothing"
    trainer = json.loads((killed_dir / "checkpoints" / f"step_{killed_at:06d}" / "trainer.json").read_text())
    assert trainer["prefetched"]["step"] == killed_at + 1  # the next step's one-version-old rollouts
    resumed = _cli(_overrides(tiny_models, killed_dir, **extra), resume=True)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "resumed from" in out
    assert _metrics(killed_dir) == _metrics(full_dir)


def _train_failing_generation(groups, overrides):
    """Train with the generation of step 2 raising inside the generation thread; returns what reached the caller
    and the threads still alive afterwards."""
    import threading

    from megatron_tropd.training import loop

    real = loop.generate_rollouts

    def failing(run, prompts, step):
        if step == 2:
            raise ValueError(f"engine exploded in {threading.current_thread().name}")
        return real(run, prompts, step)

    loop.generate_rollouts = failing
    try:
        _train(groups, overrides)
        caught = None
    except ValueError as e:
        caught = str(e)
    finally:
        loop.generate_rollouts = real
    return caught, [t.name for t in threading.enumerate() if t.name.startswith("tropd-rollouts")]


def test_an_error_in_the_generation_thread_reaches_the_caller(tiny_models, tmp_path):
    overrides = _overrides(tiny_models, tmp_path, **OPD, **OVERLAP)
    caught, alive = run_distributed(_train_failing_generation, 1, args=(overrides,))[0]
    assert caught is not None and caught.startswith("engine exploded in tropd-rollouts")
    assert alive == []  # joined by Run.close()
    rows = _records(tmp_path)
    assert [r["step"] for r in rows] == [0]  # step 1 trained, then its hand-off (step 2's generation) raised
