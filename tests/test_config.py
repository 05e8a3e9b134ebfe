"""Typed config: YAML + overrides, clear errors, and the generated reference in docs/ stays complete and current."""
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_tropd.config import ConfigError, all_fields, load_config

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "examples/configs/smollm2_tropd_cpu.yaml"


def test_main_config_loads_with_overrides():
    cfg = load_config(MAIN, ["train.steps=3", "objective.outlier=clip", "rollout.stop_token_ids=[5,6]"])
    assert cfg.train.steps == 3 and cfg.objective.outlier == "clip" and cfg.rollout.stop_token_ids == [5, 6]
    assert cfg.objective.name == "tropd" and cfg.objective.topk == 64 and cfg.objective.prefix_beta == 1e-3


@pytest.mark.parametrize("override,needle", [
    ("train.stepz=3", "train.stepz"),
    ("train.steps=abc", "train.steps"),
    ("objective.outlier=foo", "outlier 'foo'"),
    ("rollout.engine=vllm", "rollout.engine"),
    ("optim.micro_batch_size=0", "optim.micro_batch_size"),
    ("parallel.sequence_parallel=true", "sequence_parallel"),
    ("data.source=jsonl", "data.path"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(MAIN, [override])
    assert needle in str(e.value)


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(MAIN, ["train.steps"])


def test_reference_doc_is_current_and_complete():
    subprocess.run([sys.executable, str(ROOT / "tools/gen_config_docs.py"), "--check"], check=True)
    text = (ROOT / "docs/configuration.md").read_text()
    for key in all_fields():
        row = next(line for line in text.splitlines() if line.startswith(f"| `{key}` |"))
        assert not row.rstrip().endswith("|  |"), f"{key} has no documentation comment"


def test_cli_reports_config_errors_without_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "megatron_tropd.cli", "train", "--config", str(MAIN),
                          "objective.name=nope"], capture_output=True, text=True)
    assert out.returncode != 0
    assert "unknown objective name 'nope'" in out.stderr and "Traceback" not in out.stderr
