"""examples/replication/run.py (issue 17, item 5): the aggregation against hand computations, the dry-run's grid of
commands, and one real end-to-end call on tiny random models (then a second call that skips the complete runs)."""
import importlib.util
import json
import math
import shlex
import sys
import time
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


def _load_run_module():
    spec = importlib.util.spec_from_file_location("replication_run", ROOT / "examples/replication/run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


rep = _load_run_module()


def _write_run(run_dir: Path, before: dict | None, after: dict, grad_norms: list[float], eval0: dict | None = None):
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"before": before, "after": after, "steps": len(grad_norms)}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "grad_norm": g, "loss": 0.0}) + "\n"
                                                   for i, g in enumerate(grad_norms)))
    if eval0 is not None:
        (run_dir / "eval_metrics.jsonl").write_text(json.dumps({"step": 0, **eval0}) + "\n")


# --- (a) aggregation -----------------------------------------------------------------------------------------------
def test_spike_count_by_hand():
    # steps > 0: [1, 1, 2, 1, 100] -> median 1, threshold 5: one spike (100); step 0's 50 is excluded
    assert rep.spike_count(list(enumerate([50.0, 1.0, 1.0, 2.0, 1.0, 100.0]))) == 1
    # median of [1, 2, 3, 4] = 2.5 -> threshold 12.5; 12.5 itself is not a spike (strictly greater)
    assert rep.spike_count(list(enumerate([0.0, 1.0, 2.0, 3.0, 4.0, 12.5]))) == 0
    assert rep.spike_count([(0, 1.0), (1, 1.0), (2, float("nan")), (3, 1.0)]) == 1  # non-finite counts
    assert rep.spike_count([(0, 7.0)]) == 0  # only step 0
    assert rep.spike_count([]) == 0
    assert rep.SPIKE_FACTOR == 5.0


def test_mean_std_population():
    s = rep.mean_std([1.0, 2.0, 4.0])
    assert s["n"] == 3 and s["mean"] == pytest.approx(7 / 3)
    assert s["std"] == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 3))
    assert rep.mean_std([None, float("nan"), 3.0]) == {"mean": 3.0, "std": 0.0, "n": 1}
    assert rep.mean_std([]) == {"mean": None, "std": None, "n": 0}


def test_aggregate_synthetic_runs(tmp_path):
    out = tmp_path / "out"
    specs = rep.plan_runs(out, ["unhealed"], ["opd", "tropd"], [0, 1], heal_checkpoint=None)
    by = {(s.method, s.seed): s for s in specs}
    _write_run(by["opd", 0].run_dir, {"forward_kl": 4.0, "reverse_kl": 3.0}, {"forward_kl": 3.0, "reverse_kl": 2.0},
               [9.0, 1.0, 1.0, 6.0, 1.0])  # steps > 0 median 1: 6 > 5 is a spike
    _write_run(by["opd", 1].run_dir, {"forward_kl": 4.0, "reverse_kl": 3.0}, {"forward_kl": 2.0, "reverse_kl": 1.0},
               [1.0, 1.0, 30.0, 40.0, 1.0])  # median of [1, 30, 40, 1] = 15.5: no spike
    # a resumed run: summary "before" is None, taken from eval_metrics.jsonl's step 0
    _write_run(by["tropd", 0].run_dir, None, {"forward_kl": 1.0, "reverse_kl": 1.5}, [1.0, 2.0, 2.0, 11.0, 2.0],
               eval0={"forward_kl": 5.0, "reverse_kl": 3.5})  # median 2, 11 > 10: a spike
    _write_run(by["tropd", 1].run_dir, {"forward_kl": 4.0}, {"forward_kl": 2.0, "reverse_kl": float("nan")},
               [1.0, 1.0, 1.0, 1.0, 1.0])
    results = rep.aggregate([rep.load_run(s) for s in specs])
    opd, tropd = results["unhealed"]["opd"], results["unhealed"]["tropd"]
    assert opd["seeds"] == [0, 1]
    assert opd["after"]["forward_kl"] == pytest.approx({"mean": 2.5, "std": 0.5, "n": 2})
    assert opd["before"]["reverse_kl"] == pytest.approx({"mean": 3.0, "std": 0.0, "n": 2})
    assert opd["grad_spikes"] == pytest.approx({"mean": 0.5, "std": 0.5, "n": 2, "total": 1})
    assert tropd["before"]["forward_kl"] == pytest.approx({"mean": 4.5, "std": 0.5, "n": 2})
    assert tropd["before"]["reverse_kl"] == pytest.approx({"mean": 3.5, "std": 0.0, "n": 1})  # seed 1 has none
    assert tropd["after"]["reverse_kl"] == pytest.approx({"mean": 1.5, "std": 0.0, "n": 1})  # nan ignored
    assert tropd["after"]["top1_agreement"] == {"mean": None, "std": None, "n": 0}
    assert tropd["grad_spikes"]["total"] == 1
    # paired after - before per run: opd -1 and -2 (forward KL); tropd -4 (seed 0: its before from eval0) and -2
    assert opd["change"]["forward_kl"] == pytest.approx({"mean": -1.5, "std": 0.5, "n": 2})
    assert tropd["change"]["forward_kl"] == pytest.approx({"mean": -3.0, "std": 1.0, "n": 2})
    assert tropd["change"]["reverse_kl"] == pytest.approx({"mean": -2.0, "std": 0.0, "n": 1})  # seed 1: nan after
    md = rep.results_markdown(results, failed=["unhealed/jsd_seed0"])
    assert "## unhealed" in md and "| opd | 2 |" in md and "2.500 ± 0.500" in md and "unhealed/jsd_seed0" in md
    assert "| tropd | **-3.000 ± 1.000** |" in md and "| opd | -1.500 ± 0.500 |" in md  # tropd: best change


# --- (b) the dry run -----------------------------------------------------------------------------------------------
def test_dry_run_one_command_per_run(tmp_path, capsys):
    seeds = [0, 1, 2]
    assert rep.main(["--dry-run", "--out", str(tmp_path), "--heal-checkpoint", "/ck/step_11",
                     "--override", "data.size=50"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(lines) == len(rep.SETTINGS) * len(rep.DEFAULT_METHODS) * len(seeds) == 60
    seen = set()
    for line in lines:
        argv = shlex.split(line)
        assert argv[1:6] == ["-m", "megatron_tropd.cli", "train", "--config", str(rep.CONFIG)] and "--resume" in argv
        ov = dict(a.split("=", 1) for a in argv if "=" in a)
        run_dir = Path(ov["train.run_dir"])
        setting, (method, seed) = run_dir.parent.name, run_dir.name.rsplit("_seed", 1)
        assert run_dir.parent.parent == tmp_path.resolve() and ov["train.seed"] == seed
        assert all(ov[k] == v for k, v in rep.METHODS[method].items())
        assert ov.get("student.megatron_checkpoint") == ("/ck/step_11" if setting == "healed" else None)
        assert ov["data.size"] == "50" and argv[-1] == "data.size=50"  # the extra overrides come last
        # the first method of each (setting, seed) evaluates before training, the others share its result
        assert ov.get("eval.before") == (None if method == rep.DEFAULT_METHODS[0] else "false")
        seen.add((setting, method, int(seed)))
    assert seen == {(s, m, k) for s in rep.SETTINGS for m in rep.DEFAULT_METHODS for k in seeds}
    assert rep.METHODS["tropd_noguide"]["guidance.enabled"] == "false" and rep.METHODS["tropd"]["objective.outlier"]
    assert rep.METHODS["topk_fkl"]["objective.name"] == "topk_fkl" and "topk_fkl" in rep.DEFAULT_METHODS


# --- (c) end to end on tiny models -----------------------------------------------------------------------------------
def test_end_to_end_tiny(tiny_models, tmp_path, capsys):
    out = tmp_path / "rep"
    tiny = [f"student.path={tiny_models / 'student'}", f"teacher.path={tiny_models / 'teacher'}", "train.steps=1",
            "data.size=16", "data.eval_size=2", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2",
            "rollout.max_new_tokens=8", "optim.micro_batch_size=2", "objective.topk=8", "objective.eopd_topk=4"]
    argv = ["--out", str(out), "--settings", "unhealed", "--methods", "opd", "tropd", "--seeds", "0", "1",
            "--plot-metrics", "grad_norm", "--override", *tiny]
    assert rep.main(argv) == 0, capsys.readouterr().out
    first = capsys.readouterr().out
    assert first.count(": done in ") == 4, first
    for method in ("opd", "tropd"):
        for seed in (0, 1):
            run_dir = out / "unhealed" / f"{method}_seed{seed}"
            assert json.loads((run_dir / "summary.json").read_text())["steps"] == 1
            assert not (run_dir / "checkpoints").exists()  # pruned once complete
    md = (out / "results.md").read_text()
    assert "| opd | 2 |" in md and "| tropd | 2 |" in md and "forward_kl" in md
    results = json.loads((out / "results.json").read_text())["results"]["unhealed"]
    assert results["tropd"]["after"]["forward_kl"]["n"] == 2
    for seed in (0, 1):  # tropd ran with eval.before=false and shares opd's "before" (same student, prompts, seed)
        mine = out / "unhealed" / f"tropd_seed{seed}"
        assert json.loads((mine / "summary.json").read_text())["before"] is None
        shared = [json.loads(x) for x in (mine / "eval_metrics.jsonl").read_text().splitlines()]
        ref = [json.loads(x) for x in (out / "unhealed" / f"opd_seed{seed}" / "eval_metrics.jsonl").read_text()
               .splitlines()]
        assert [r["step"] for r in shared] == [0, 1]
        assert shared[0]["before_shared_from"] == str((out / "unhealed" / f"opd_seed{seed}").resolve())
        assert {k: v for k, v in shared[0].items() if k != "before_shared_from"} == ref[0]
    assert results["tropd"]["before"]["forward_kl"] == results["opd"]["before"]["forward_kl"]
    assert list((out / "unhealed" / "plots").glob("*.png"))
    t0 = time.time()
    assert rep.main(argv) == 0
    second = capsys.readouterr().out
    assert second.count("complete, skipped") == 4 and ": done in " not in second
    assert time.time() - t0 < 30
