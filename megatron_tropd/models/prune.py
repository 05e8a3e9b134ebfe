"""Students made from a teacher by pruning: NVIDIA ModelOpt's Minitron pruning of the megatron-core model, and the
every-k-th-layer cut it is compared with.

Minitron (Sreenivas et al. 2024, arXiv:2407.14679; ModelOpt mode `mcore_minitron`) runs the teacher on calibration
sequences and ranks
- layers (depth) by 1 - cos(h_in, h_out), the mean cosine distance between a layer's input and output hidden states
  (a layer that barely changes the residual stream is the first to go); the lowest-scoring layers are dropped;
- ffn neurons, attention heads (within their query group) and hidden channels (width) by the L2 norm over the batch of
  the sequence-mean |activation| (the fc2 input, the linear_proj input per head, and the pre-norm outputs); width is cut
  to the most important channels and the weights are sliced in place.
The pruned model is an ordinary `GPTModel` again, exported with the project's HF exporter (teacher's tokenizer).

ModelOpt's megatron plugin is TP=1, PP=1 only (it asserts so). Version 0.43.0 is the newest usable here: 0.44.0 to
0.47.0 import `transformer_engine` unconditionally in `modelopt/torch/nas/plugins/megatron.py` (ModuleNotFoundError
without TE, which cannot be installed without CUDA). On 0.43.0 three things need help, each applied only for the
duration of `minitron_compat()` (docs/pruning.md):
1. the local spec's norm is `torch.nn.RMSNorm`, which ModelOpt's dynamic-module registry does not know (KeyError
   "<class 'torch.nn.modules.normalization.RMSNorm'> is not registered for a dynamic module!"): a dynamic RMSNorm
   with the `num_features` hparam ModelOpt passes, registered for the call and unregistered after;
2. on CPU, `drop_mcore_language_model_layers` calls `.cuda()` on two tensors (RuntimeError "Found no NVIDIA
   driver") -> `Tensor.cuda` is the identity (cpu_compat.tensor_cuda_is_noop);
3. on gloo, the same function all-gathers a 0-d tensor -> the input is viewed as shape [1].
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from megatron_tropd.atomic import atomic_directory, tmp_sibling
from megatron_tropd.distributed import cpu_compat
from megatron_tropd.models.arch import ModelArch, head_dim
from megatron_tropd.models.gpt import BuildOptions, build_gpt_model

METHODS = ("minitron", "every_k")
MODELOPT_VERSION = "0.43.0"  # the pinned, tested release (requirements-nodeps.txt)
PRUNE_INFO = "prune_info.json"  # written beside the exported weights: method, kept layers, scores, versions
SCORES_FILE = "rank0.pth"  # ModelOpt's search checkpoint inside a scores directory (TP=1, PP=1: one rank)


class PruneError(ValueError):
    """A pruning request that cannot be carried out (bad target, missing dependency, unsupported layout)."""


# ---------------------------------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class PruneTarget:
    """The student's shape; None keeps the teacher's value."""

    num_layers: int | None = None
    ffn_hidden_size: int | None = None
    hidden_size: int | None = None
    num_attention_heads: int | None = None

    def check(self, arch: ModelArch) -> None:
        """Clear errors for a target the teacher `arch` cannot be pruned to."""
        fields = {"num_layers": ("--target-layers", arch.num_layers),
                  "ffn_hidden_size": ("--ffn-hidden", arch.ffn_hidden_size),
                  "hidden_size": ("--hidden", arch.hidden_size),
                  "num_attention_heads": ("--heads", arch.num_attention_heads)}
        for name, (flag, teacher) in fields.items():
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, int) or value < 1:
                raise PruneError(f"{name} ({flag}) must be a positive integer, got {value!r}")
            if value > teacher:
                raise PruneError(f"{name} ({flag}) = {value} is larger than the teacher's {teacher}: pruning only "
                                 f"removes; choose a value in 1..{teacher}")
        heads = self.num_attention_heads
        if heads is not None and heads % arch.num_query_groups:
            per = arch.num_attention_heads // arch.num_query_groups
            raise PruneError(
                f"num_attention_heads (--heads) = {heads} is not a multiple of the teacher's "
                f"{arch.num_query_groups} query groups (heads are pruned within each group; ModelOpt keeps every "
                f"group): choose one of {[arch.num_query_groups * k for k in range(1, per + 1)]}")
        hidden = self.hidden_size if self.hidden_size is not None else arch.hidden_size
        heads = heads if heads is not None else arch.num_attention_heads
        if hidden % heads:
            # transformers 5.x refuses such a config.json ("The hidden size (384) is not a multiple of the number of
            # attention heads (9)") although head_dim is explicit: the student would not load
            raise PruneError(f"hidden_size (--hidden) = {hidden} is not a multiple of the student's {heads} attention "
                             f"heads, which transformers requires of a Llama config; choose e.g. "
                             f"{max(hidden // heads, 1) * heads} or {(hidden // heads + 1) * heads}")
        if not self.changes(arch):
            raise PruneError("the target equals the teacher (nothing to prune): set --target-layers, --ffn-hidden, "
                             "--hidden or --heads below the teacher's values")

    def changes(self, arch: ModelArch) -> dict[str, int]:
        """The hparams that differ from the teacher (ModelOpt's `export_config`)."""
        out = {}
        for name in ("num_layers", "ffn_hidden_size", "hidden_size", "num_attention_heads"):
            value = getattr(self, name)
            if value is not None and value != getattr(arch, name):
                out[name] = value
        return out

    def apply(self, arch: ModelArch) -> ModelArch:
        """The student's architecture (head_dim kept: heads and hidden are pruned independently)."""
        return arch.replace(kv_channels=head_dim(arch), **self.changes(arch))


def hf_config_for(teacher_cfg: dict, student: ModelArch) -> dict:
    """The teacher's HF config.json with the student's shape (everything else, e.g. rope, special ids, kept)."""
    cfg = dict(teacher_cfg)
    cfg.update(num_hidden_layers=student.num_layers, hidden_size=student.hidden_size,
               intermediate_size=student.ffn_hidden_size, num_attention_heads=student.num_attention_heads,
               num_key_value_heads=student.num_query_groups, head_dim=student.kv_channels)
    if isinstance(cfg.get("layer_types"), list):
        cfg["layer_types"] = cfg["layer_types"][: student.num_layers]
    cfg.pop("quantization_config", None)
    return cfg


def every_k_for(num_layers: int, target_layers: int) -> int:
    """k such that keeping layers 0, k, 2k, ... of `num_layers` leaves `target_layers` (clear error otherwise)."""
    if not 1 <= target_layers <= num_layers:
        raise PruneError(f"--target-layers {target_layers} must be in 1..{num_layers} (the teacher's layers)")
    if num_layers % target_layers:
        divisors = [d for d in range(1, num_layers + 1) if num_layers % d == 0]
        raise PruneError(f"--method every_k keeps every (L / N)-th layer, so N must divide the teacher's "
                         f"L = {num_layers} layers; {target_layers} does not. Choose N in {divisors} or --method "
                         f"minitron")
    return num_layers // target_layers


# ---------------------------------------------------------------------------------------------------- ModelOpt


def modelopt_unavailable_reason() -> str | None:
    """None when ModelOpt's Minitron pruning can be used here, else why not (for errors and docs)."""
    import warnings

    try:
        import modelopt
    except ImportError as e:
        return (f"nvidia-modelopt is not installed ({e}); install the pinned release: pip install --no-deps "
                f"nvidia-modelopt=={MODELOPT_VERSION} pulp scipy (see docs/dependencies.md)")
    version = getattr(modelopt, "__version__", "?")
    try:
        with warnings.catch_warnings():  # "transformers 5.x is not tested": its HF plugins are not used here
            warnings.filterwarnings("ignore", message=".*transformers version", category=UserWarning)
            import modelopt.torch.prune  # noqa: F401
            from modelopt.torch.prune.plugins import mcore_minitron  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure to import the plugin makes Minitron unusable
        return f"nvidia-modelopt {version}: its Minitron plugin does not import ({type(e).__name__}: {e})"
    if version != MODELOPT_VERSION:
        return (f"nvidia-modelopt {version} is installed but only {MODELOPT_VERSION} is supported with megatron-core's "
                f"local layer spec (see docs/pruning.md)")
    return None


@contextlib.contextmanager
def minitron_compat() -> Iterator[None]:
    """Scoped fixes that let ModelOpt 0.43.0 prune a local-spec GPTModel (and do so on CPU / gloo); see the module
    docstring. Everything is undone on exit."""
    import torch.distributed as dist
    from modelopt.torch.nas.modules.norm import _DynamicLayerNorm
    from modelopt.torch.nas.registry import DMRegistry

    class _DynamicTorchRMSNorm(_DynamicLayerNorm):
        """torch.nn.RMSNorm with ModelOpt's shared `num_features` (= hidden_size) hparam, as for FusedLayerNorm."""

        def _setup(self, *, num_features):
            self._register_hparam("num_features", num_features)
            self._register_dynamic_attribute("weight", self._cut_to_active_features)
            self._register_dynamic_attribute("normalized_shape", self._get_normalized_shape)

    registered = torch.nn.RMSNorm not in DMRegistry
    if registered:
        DMRegistry.register({torch.nn.RMSNorm: "torch.nn.RMSNorm"})(_DynamicTorchRMSNorm)
    gather = dist.all_gather_into_tensor

    def gather_1d(output, input, *args, **kwargs):  # gloo cannot all-gather 0-d tensors
        return gather(output, input.reshape(1) if input.dim() == 0 else input, *args, **kwargs)

    dist.all_gather_into_tensor = gather_1d
    try:
        with cpu_compat.tensor_cuda_is_noop():
            yield
    finally:
        dist.all_gather_into_tensor = gather
        if registered:
            DMRegistry.unregister(torch.nn.RMSNorm)


@dataclass
class MinitronResult:
    arch: ModelArch  # the student's
    kept_layers: list[int]  # 0-based teacher layer indices, in order
    layer_scores: list[float]  # per teacher layer (0-based): ModelOpt's 1 - cos(h_in, h_out), summed over batches
    seconds: float
    scores_cached: bool = False  # the calibration statistics came from `scores_dir` (no forward passes)


def _forward_loop(calib: Sequence[Sequence[int]], device: torch.device) -> Callable:
    def loop(model) -> None:
        for ids in calib:  # one sequence per pass: no padding to dilute the activation statistics
            tokens = torch.tensor([list(ids)], dtype=torch.long, device=device)  # [1, s]
            pos = torch.arange(tokens.shape[1], device=device)[None]
            model(tokens, pos, None)

    return loop


def minitron_prune(model, arch: ModelArch, target: PruneTarget, calib: Sequence[Sequence[int]], groups,
                   scores_dir: Path | None = None) -> MinitronResult:
    """Prune `model` (a whole GPTModel of `arch` on a TP=1, PP=1 group, teacher weights loaded) in place to
    `target`, ranking layers / neurons / heads / channels on the calibration token sequences `calib`.

    `scores_dir`: ModelOpt's search checkpoint (the calibration activations and layer scores) for *this* teacher
    and calibration set. When it holds one, the forward passes are skipped (ModelOpt's re-pruning path); otherwise
    it is written there (atomically) for the next target. The caller keys the directory (`scores_key`)."""
    reason = modelopt_unavailable_reason()
    if reason:
        raise PruneError(reason)
    if groups.tp_size != 1 or groups.pp_size != 1:
        raise PruneError(f"ModelOpt Minitron prunes a whole model on one rank (TP=1, PP=1); got tp={groups.tp_size} "
                         f"pp={groups.pp_size}")
    if not calib or any(len(s) < 2 for s in calib):
        raise PruneError("Minitron needs calibration sequences of at least 2 tokens (--calib-prompts >= 1)")
    target.check(arch)
    import modelopt.torch.prune as mtp
    from megatron.core.models.gpt import GPTModel
    from modelopt.torch.prune.plugins.mcore_minitron import get_mcore_minitron_config

    # Divisors of 1: every size the user asks for is a choice (the defaults, 256 / 512 / 2, suit large models).
    mode_cfg = get_mcore_minitron_config(hidden_size_divisor=1, ffn_hidden_size_divisor=1, num_layers_divisor=1)
    t0 = time.perf_counter()
    search = {"forward_loop": _forward_loop(calib, groups.device)}
    cached = scores_dir is not None and (Path(scores_dir) / SCORES_FILE).is_file()
    if scores_dir is not None:
        # ModelOpt names a directory checkpoint's file rank<r>.pth; a fresh one is written beside and renamed.
        # (a directory that does not exist yet: ModelOpt would try to torch.load an existing empty one)
        tmp = tmp_sibling(scores_dir)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by an interrupted run
        search["checkpoint"] = str(scores_dir if cached else tmp) + "/"
    with minitron_compat():
        model, state = mtp.prune(model, mode=[("mcore_minitron", mode_cfg)],
                                 constraints={"export_config": target.changes(arch)}, dummy_input=None,
                                 config=search)
    if scores_dir is not None and not cached:
        tmp = tmp_sibling(scores_dir)
        Path(scores_dir).mkdir(parents=True, exist_ok=True)
        (tmp / SCORES_FILE).replace(Path(scores_dir) / SCORES_FILE)
        tmp.rmdir()
    if type(model) is not GPTModel:
        raise PruneError(f"ModelOpt returned a {type(model).__name__}, expected a plain GPTModel after export")
    scores = state["layer_scores"]  # 1-based layer number -> float
    ranked = state["sorted_layers"]  # 1-based, most important first
    n = target.num_layers or arch.num_layers
    kept = sorted(i - 1 for i in ranked[:n])
    return MinitronResult(target.apply(arch), kept, [float(scores[i + 1]) for i in range(arch.num_layers)],
                          time.perf_counter() - t0, cached)


def scores_key(teacher_dir: str | Path, calib: Sequence[Sequence[int]]) -> str:
    """A name for the calibration statistics of (teacher weights, calibration set, ModelOpt version)."""
    h = hashlib.sha256()
    teacher_dir = Path(teacher_dir)
    h.update((teacher_dir / "config.json").read_bytes())
    for f in sorted(teacher_dir.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
    h.update(json.dumps([list(map(int, c)) for c in calib]).encode())
    h.update(MODELOPT_VERSION.encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------- end to end


@dataclass
class PruneReport:
    """What was made (also written as prune_info.json)."""

    method: str
    out_dir: str
    teacher: str
    teacher_arch: dict
    student_arch: dict
    kept_layers: list[int]
    layer_scores: list[float] | None = None
    calibration: dict = field(default_factory=dict)
    params_teacher: int = 0
    params_student: int = 0
    roundtrip_max_abs_diff: float | None = None  # exported HF checkpoint reloaded by our loader vs the pruned model
    seconds: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    fallback_from: dict | None = None  # set when this method replaced one that could not run (method, reason)


def param_count(arch: ModelArch) -> int:
    """Parameters of an HF Llama-family checkpoint of `arch` (tied output counted once, no vocab padding)."""
    h, hd = arch.hidden_size, head_dim(arch)
    q, kv = arch.num_attention_heads * hd, arch.num_query_groups * hd
    layer = h * (q + 2 * kv) + q * h + 3 * h * arch.ffn_hidden_size + 2 * h
    if arch.add_qkv_bias:
        layer += q + 2 * kv
    if arch.qk_layernorm:
        layer += 2 * hd
    emb = arch.vocab_size * h
    return arch.num_layers * layer + emb * (1 if arch.tie_word_embeddings else 2) + h


def load_teacher(hf_dir: str | Path, groups):
    """(megatron GPTModel with the teacher's weights, its ModelArch); local layer spec (what ModelOpt 0.43 prunes)."""
    from megatron_tropd.conversion.hf_io import load_hf_checkpoint_into_model
    from megatron_tropd.models.hf_mapping import arch_from_hf_config

    arch = arch_from_hf_config(hf_dir)
    model = build_gpt_model(arch, groups, BuildOptions(use_te=False))
    load_hf_checkpoint_into_model(model, hf_dir, arch, groups)
    return model.eval(), arch


@torch.no_grad()
def full_logits(model, ids: Sequence[int], device) -> torch.Tensor:
    tokens = torch.tensor([list(ids)], dtype=torch.long, device=device)
    return model(tokens, torch.arange(tokens.shape[1], device=device)[None], None).float()


@torch.no_grad()
def roundtrip_diff(model, arch: ModelArch, hf_dir: Path, groups, ids: Sequence[int]) -> float:
    """Max |logit difference| between `model` and the HF checkpoint `hf_dir` loaded back by our loader."""
    from megatron_tropd.conversion.hf_io import load_hf_checkpoint_into_model

    again = build_gpt_model(arch, groups, BuildOptions(use_te=False)).eval()
    load_hf_checkpoint_into_model(again, hf_dir, arch, groups)
    v = arch.vocab_size
    return float((full_logits(model, ids, groups.device)[..., :v] - full_logits(again, ids, groups.device)[..., :v]
                  ).abs().max())


def prune_teacher(teacher_dir: str | Path, out_dir: str | Path, target: PruneTarget, method: str, groups,
                  calib: Sequence[Sequence[int]] = (), calib_info: dict | None = None, overwrite: bool = False,
                  scores_root: str | Path | None = None, fallback_from: dict | None = None,
                  log: Callable[[str], None] = lambda s: None) -> PruneReport:
    """Make a student HF checkpoint in `out_dir` (complete or absent) from the HF teacher `teacher_dir`:
    `method` "minitron" (ModelOpt, on the calibration sequences `calib`) or "every_k" (layers 0, k, 2k, ...).
    `scores_root`: where calibration statistics are kept per (teacher, calibration set), so that several targets
    pay for the calibration passes once."""
    from megatron_tropd.conversion.hf_io import copy_tokenizer, export_hf_checkpoint
    from megatron_tropd.models.builtin import make_layer_subset_student
    from megatron_tropd.models.hf_mapping import arch_from_hf_config

    teacher_dir, out_dir = Path(teacher_dir), Path(out_dir)
    if method not in METHODS:
        raise PruneError(f"--method must be one of {METHODS}, got {method!r}")
    if out_dir.exists() and not overwrite:
        raise PruneError(f"{out_dir} exists; remove it or pass --overwrite")
    arch = arch_from_hf_config(teacher_dir)
    target.check(arch)
    teacher_cfg = json.loads((teacher_dir / "config.json").read_text())
    report = PruneReport(method=method, out_dir=str(out_dir), teacher=str(teacher_dir),
                         teacher_arch=dataclasses.asdict(arch), student_arch={}, kept_layers=[],
                         calibration=dict(calib_info or {}), params_teacher=param_count(arch),
                         versions=_versions(method), fallback_from=fallback_from)
    t0 = time.perf_counter()
    if method == "every_k":
        width = {k: v for k, v in target.changes(arch).items() if k != "num_layers"}
        if width:
            raise PruneError(f"--method every_k only removes layers; width targets {width} need --method minitron")
        k = every_k_for(arch.num_layers, target.num_layers or arch.num_layers)
        student = target.apply(arch)
        report.kept_layers = list(range(0, arch.num_layers, k))
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
            cut = make_layer_subset_student(teacher_dir, tmp / "cut", keep_every=k)
            for f in cut.iterdir():
                f.replace(tmp / f.name)
            cut.rmdir()
            _finish(report, student, tmp, t0)
        return report

    model, _ = load_teacher(teacher_dir, groups)
    report.seconds["load_teacher"] = round(time.perf_counter() - t0, 2)
    log(f"teacher loaded ({report.seconds['load_teacher']} s); Minitron on {len(calib)} calibration sequences, "
        f"target {target.changes(arch)}")
    scores_dir = Path(scores_root) / scores_key(teacher_dir, calib) if scores_root is not None else None
    result = minitron_prune(model, arch, target, calib, groups, scores_dir)
    report.seconds["minitron"] = round(result.seconds, 2)
    report.calibration["scores_cached"] = result.scores_cached
    report.kept_layers, report.layer_scores = result.kept_layers, result.layer_scores
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        t1 = time.perf_counter()
        export_hf_checkpoint(model, groups, result.arch, tmp, hf_config=hf_config_for(teacher_cfg, result.arch),
                             overwrite=True)  # replaces the (empty) tmp dir whole
        copy_tokenizer(teacher_dir, tmp)
        report.seconds["export"] = round(time.perf_counter() - t1, 2)
        report.roundtrip_max_abs_diff = roundtrip_diff(model, result.arch, tmp, groups, calib[0])
        if not report.roundtrip_max_abs_diff < 1e-3:
            raise PruneError(f"exported checkpoint does not reproduce the pruned model: max |logit diff| "
                             f"{report.roundtrip_max_abs_diff:.3g} (export/loader mismatch; nothing was written)")
        _finish(report, result.arch, tmp, t0)
    return report


def _finish(report: PruneReport, student: ModelArch, tmp: Path, t0: float) -> None:
    report.student_arch = dataclasses.asdict(student)
    report.params_student = param_count(student)
    report.seconds["total"] = round(time.perf_counter() - t0, 2)
    (tmp / PRUNE_INFO).write_text(json.dumps(dataclasses.asdict(report), indent=2))


def _versions(method: str) -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in (["nvidia-modelopt"] if method == "minitron" else []) + ["megatron-core", "torch"]:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def parse_minitron_name(variant: str) -> PruneTarget:
    """The target of a built-in Minitron student name: 'minitron15' (15 layers), 'minitron30-ffn768' (width only),
    'minitron15-ffn1024-hidden512-heads6' (both)."""
    import re

    m = re.fullmatch(r"minitron(\d+)((?:-(?:ffn|hidden|heads)\d+)*)", variant)
    if not m:
        raise PruneError(f"unknown pruned-student name {variant!r}: expected minitron<layers>[-ffn<F>][-hidden<H>]"
                         f"[-heads<A>], e.g. minitron15")
    width = dict(re.findall(r"-(ffn|hidden|heads)(\d+)", m.group(2)))
    return PruneTarget(num_layers=int(m.group(1)), ffn_hidden_size=int(width["ffn"]) if "ffn" in width else None,
                       hidden_size=int(width["hidden"]) if "hidden" in width else None,
                       num_attention_heads=int(width["heads"]) if "heads" in width else None)
