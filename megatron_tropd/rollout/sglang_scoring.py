"""`SGLangTeacherScorer`: the teacher's per-token outputs from SGLang servers instead of a megatron teacher.

One `/generate` per sequence, nothing generated:
    {"input_ids": prompt + response, "sampling_params": {"max_new_tokens": 0, "temperature": ...},
     "return_logprob": true, "logprob_start_len": len(prompt) - 1, "top_logprobs_num": k,
     "return_flat_raw_top_logprobs": true, "return_flat_raw_top_logprobs_b64": true}
`meta_info.input_token_logprobs[i]` is log p(x[L + i] | x[< L + i]) with L = logprob_start_len; entry 0 is None
(position L's own log-prob needs position L - 1, which is outside the window), so starting at len(prompt) - 1 gives
exactly the response tokens (teacher prefix included). `input_top_logprobs_{val,idx}_flat_b64` are the top-k at the
same positions (float32 / int32 little endian, `input_top_logprobs_shape` = [r, k] after the null first row).

Temperature. SGLang 0.5.23 computes input (prompt-position) log-probs and top log-probs from the raw logits:
`srt/layers/logprob_processor.py`, `InputLogprobProcessor._forward_by_chunk`: `chunk_logits = get_logits_fn(...)`
(l. 657), then `compute_row_log_normalizer(chunk_logprobs)` (l. 726; the default SGLANG_ENABLE_FAST_INPUT_LOGPROBS
path: `logit - max - logsumexp`, l. 782) or `torch.nn.functional.log_softmax(chunk_logprobs, dim=-1)` (l. 734), with
no temperature anywhere on that path. The request's `temperature`, `SGLANG_RETURN_ORIGINAL_LOGPROB` (read only in
`srt/layers/sampler.py`) and custom logit processors (`Sampler._preprocess_logits`, next-token logits only) touch
only the sampler, i.e. output tokens. So a raw server gives input log-probs at T = 1 whatever the request says
(measured: identical bits at request temperature 1.0 and 0.7). Top-k of the raw logits cannot give log-probs at T !=
1 either (the normaliser needs the whole vocabulary).

What makes it exact at T != 1: serve a *temperature-folded* teacher. With a final RMSNorm `y = g * x / rms(x)` and
logits `W y` (Llama / Qwen2 / Qwen3), replacing g by g / T gives logits `W y / T` exactly (in real arithmetic; in
float32 the extra rounding is ~1e-7 relative), so the server's raw log-probs are the teacher's log-probs at T.
`fold_temperature` writes such a checkpoint (the shard holding `model.norm.weight` rewritten, every other file
symlinked, a marker file `tropd_logit_temperature.json`); servers report their `model_path` on `/model_info`, so
the scorer checks the marker of every server before scoring and refuses a server folded for another temperature
(or an unfolded one at T != 1) with one line naming the fix. A folded server also generates correctly: sampling at
T / T_fold from logits z / T_fold is sampling at T from z (the engine's `logit_temperature` does that), so one
teacher server serves both teacher prefixes and scoring.

What a server cannot give: the full-vocabulary teacher entropy (EOPD's gate, entropy thresholds on the teacher)
and full-vocabulary KL need every logit; `check_requirements` refuses those objectives at start-up and names the
scorer that can (the megatron teacher, `teacher.scorer: megatron`).

Where the scores go: `score(micro_batches, req)` is called on every rank (the step calls the teacher collectively);
every last-stage rank sends its rows (sample id, prompt, response) to the rank holding the servers (global rank 0,
where the engines live), which scores them and scatters O(tokens x k) values back (two object collectives per
step; nothing without a process group). Overlap: `prefetch(sample)` (on rank 0) submits a finished sample's scoring
request to a thread pool while other rollouts are still generating (`generate_mixed(..., on_sample=
scorer.prefetch)`); `score` then finds it done. Failures: every request has a timeout and the engine's retries /
relaunch (`sglang.on_server_failure`); a dead server is one clear `SGLangServerError` on every rank, or a
relaunch, never a hang.
"""
from __future__ import annotations

import base64
import concurrent.futures as cf
import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from megatron_tropd.atomic import atomic_directory
from megatron_tropd.config import ConfigError
from megatron_tropd.models.hf_mapping import config_vocab_size
from megatron_tropd.rollout import sglang_server as srv
from megatron_tropd.rollout.sglang_server import SGLangServerError
from megatron_tropd.training.scoring import TeacherTokens

FOLD_MARKER = "tropd_logit_temperature.json"
FINAL_NORM = "model.norm.weight"  # HF name of the final RMSNorm weight (Llama, Qwen2, Qwen3)
FOLDABLE_MODEL_TYPES = ("llama", "qwen2", "qwen3")
TEMPERATURE_RTOL = 1e-6  # a server folded for T' serves T when |T' - T| <= rtol * T


# ------------------------------------------------------------------------------------------------ outputs
@dataclass
class SampleScores:
    """The teacher's outputs at one sample's r response tokens (teacher prefix included)."""

    lp: torch.Tensor  # [r] float32
    tk_lp: torch.Tensor | None  # [r, k] float32, or None when k = 0
    tk_ids: torch.Tensor | None  # [r, k] int64
    temperature: float  # the temperature they were taken at (checked against the rollout's)


class ScorerCapabilityError(ConfigError):
    """The objective needs a teacher output this scorer cannot produce (raised at start-up, before models load)."""


# What an SGLang scoring server can serve; everything else needs the full logits (the megatron teacher).
CAPABILITIES = {"token_logprobs": True, "topk": True, "entropy": False, "full_vocab_kl": False}


def check_requirements(req, objective_name: str = "the objective", key: str = "teacher") -> None:
    """Raise ScorerCapabilityError (one line naming the scorer that can) when `req` (objectives.Requirements)
    needs the full-vocabulary teacher entropy or KL, which a server returning top-k log-probs cannot give."""
    needs = []
    if req.teacher_entropy:
        needs.append("the full-vocabulary teacher entropy (ent_t, e.g. EOPD's entropy gate)")
    if req.entropy_threshold == "teacher":
        needs.append("teacher entropies for its entropy threshold")
    if req.full_vocab_kl is not None:
        needs.append(f"the full-vocabulary {req.full_vocab_kl} KL (every teacher logit)")
    if getattr(req, "offline_kl", None) is not None:
        needs.append(f"the full-vocabulary {req.offline_kl} KL on teacher-written rollouts (offline distillation)")
    if needs:
        raise ScorerCapabilityError(
            f"{key}.scorer=sglang cannot serve {objective_name}: it needs {' and '.join(needs)}, and an SGLang "
            f"server returns only sampled-token and top-k log-probs; use {key}.scorer=megatron (the megatron "
            f"teacher computes them on its vocabulary shards)")


# ------------------------------------------------------------------------------------------------ folding
def fold_temperature(hf_dir: str | Path, out_dir: str | Path, temperature: float) -> Path:
    """A copy of the HF checkpoint whose logits are the original's divided by `temperature` (final-norm weight
    scaled by 1 / T; the shard holding it is rewritten, every other file is a symlink). Idempotent: an existing
    folded dir for the same source and T is returned as is; written to a temp sibling and renamed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    hf_dir, out_dir = Path(hf_dir).resolve(), Path(out_dir)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"fold temperature must be a finite number > 0; got {temperature!r}")
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{hf_dir} is not an HF checkpoint dir (no config.json)")
    model_type = json.loads(cfg_path.read_text()).get("model_type", "")
    if model_type not in FOLDABLE_MODEL_TYPES:
        raise ValueError(f"cannot fold a temperature into {hf_dir}: model_type {model_type!r} is not one of "
                         f"{FOLDABLE_MODEL_TYPES} (a final RMSNorm whose weight scales the logits linearly)")
    want = {"logit_temperature": float(temperature), "source": str(hf_dir), "folded": FINAL_NORM}
    marker = out_dir / FOLD_MARKER
    if marker.is_file():
        have = json.loads(marker.read_text())
        if {k: have.get(k) for k in want} == want:
            return out_dir
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        shard = json.loads(index.read_text())["weight_map"].get(FINAL_NORM)
    else:
        shards = sorted(p.name for p in hf_dir.glob("*.safetensors"))
        shard = shards[0] if len(shards) == 1 else None
    if shard is None:
        raise ValueError(f"{hf_dir}: no {FINAL_NORM} in its safetensors (index or single file)")
    with atomic_directory(out_dir, overwrite=True) as tmp:
        for p in hf_dir.iterdir():
            if p.name != shard and p.name != FOLD_MARKER:
                os.symlink(p.resolve(), tmp / p.name)
        with safe_open(str(hf_dir / shard), framework="pt") as f:
            meta = f.metadata()
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        if FINAL_NORM not in tensors:
            raise ValueError(f"{hf_dir / shard} does not hold {FINAL_NORM}")
        g = tensors[FINAL_NORM]
        tensors[FINAL_NORM] = (g.double() / float(temperature)).to(g.dtype)
        save_file(tensors, str(tmp / shard), metadata=meta or {"format": "pt"})
        (tmp / FOLD_MARKER).write_text(json.dumps({**want, "note": "logits = source logits / logit_temperature; "
                                                   "written by megatron_tropd.rollout.sglang_scoring"}, indent=1))
    return out_dir


def logit_temperature_of(model_path: str | Path) -> float | None:
    """The fold of a checkpoint dir: its marker's temperature, 1.0 for a plain dir, None if not readable here."""
    p = Path(model_path)
    if (p / FOLD_MARKER).is_file():
        return float(json.loads((p / FOLD_MARKER).read_text())["logit_temperature"])
    return 1.0 if (p / "config.json").is_file() else None


def server_logit_temperature(url: str, timeout: float = 30.0) -> tuple[float | None, str]:
    """(fold, model_path) of a running server, from `/model_info` and the marker in its model_path."""
    import requests

    try:
        r = srv.get(url, "/model_info", timeout=timeout)
        r.raise_for_status()
        path = r.json().get("model_path", "")
    except (requests.RequestException, ValueError) as e:
        raise SGLangServerError(f"SGLang {url}: cannot read /model_info ({type(e).__name__}: {e})") from e
    return logit_temperature_of(path) if path else None, path


def same_temperature(a: float, b: float) -> bool:
    return abs(a - b) <= TEMPERATURE_RTOL * max(abs(a), abs(b))


def server_fold(url: str, declared: float | None = None, name: str | None = None) -> tuple[float, str]:
    """(fold, model_path) of one server: its marker, else `declared` (sglang.teacher_logit_temperature) for a
    model_path this machine cannot read; a declared value that contradicts a readable marker is an error."""
    name = name or url
    fold, path = server_logit_temperature(url)
    if fold is None:
        if declared is None:
            raise SGLangServerError(
                f"SGLang {name} serves {path!r}, which this machine cannot read, so its logit temperature is "
                f"unknown; set sglang.teacher_logit_temperature to the temperature its checkpoint was folded for "
                f"(1.0 = not folded)")
        return float(declared), path
    if declared is not None and not same_temperature(fold, declared):
        raise SGLangServerError(f"SGLang {name}: sglang.teacher_logit_temperature={declared} but its checkpoint "
                                f"{path} is folded for {fold}")
    return fold, path


def servers_fold(urls: Sequence[str], declared: float | None = None) -> float:
    """The common fold of a role's servers (they must agree)."""
    folds = {url: server_fold(url, declared) for url in urls}
    values = sorted({f for f, _ in folds.values()})
    if len(values) > 1:
        raise SGLangServerError(f"SGLang teacher servers serve checkpoints folded for different temperatures: "
                                f"{ {u: f for u, (f, _) in folds.items()} }")
    return values[0]


def sglang_scores_teacher(cfg) -> bool:
    """Whether the run's (first) teacher scores on SGLang servers (`teacher.scorer: sglang`)."""
    return getattr(getattr(cfg, "teacher", None), "scorer", "megatron") == "sglang"


def check_for_run(cfg, spec, req, objective_name: str) -> None:
    """Start-up checks of a teacher with `scorer: sglang`, before any model loads (ConfigError, one line each).
    `spec` names the teacher's config key (`spec.key`, e.g. "teacher"); `req` is the objective's Requirements.
    (The `check` of an external scorer in training/teachers.py.)"""
    key = getattr(spec, "key", "teacher")
    if key != "teacher":
        raise ScorerCapabilityError(f"{key}.scorer=sglang: the SGLang teacher servers (sglang.teacher_urls / "
                                    f"teacher_servers) serve teacher.path; only the first teacher can score on them")
    if cfg.rollout.engine != "sglang":
        raise ScorerCapabilityError(f"{key}.scorer=sglang scores on the SGLang teacher servers, which "
                                    f"rollout.engine=sglang launches or attaches; set rollout.engine=sglang (got "
                                    f"{cfg.rollout.engine!r}) or {key}.scorer=megatron")
    if not cfg.rollout.temperature > 0:
        raise ScorerCapabilityError(f"{key}.scorer=sglang needs rollout.temperature > 0 (got "
                                    f"{cfg.rollout.temperature})")
    check_requirements(req, f"objective.name={objective_name!r}", key)
    if getattr(cfg.data, "eval_size", 0) > 0:
        raise ScorerCapabilityError(f"{key}.scorer=sglang cannot compute the held-out metrics (full-vocabulary KL "
                                    f"between student and teacher needs every teacher logit): set data.eval_size=0 "
                                    f"or {key}.scorer=megatron")


def build_for_run(ctx: dict) -> "SGLangTeacherScorer":
    """The scorer of a run, on every rank (the `build` of an external scorer in training/teachers.py). ctx: cfg,
    groups, engines (the teacher engine on global rank 0 only), score (ScoreOptions), vocab, pad_id, objective."""
    cfg, groups, engines = ctx["cfg"], ctx["groups"], ctx["engines"]
    engine = engines.get("teacher")
    if groups.rank == 0 and engine is None:
        raise ConfigError("teacher.scorer=sglang: no SGLang teacher engine was built (rollout.engine=sglang launches "
                          "sglang.teacher_servers or attaches sglang.teacher_urls)")
    req = ctx["objective"].requirements
    return SGLangTeacherScorer(engine if groups.rank == 0 else None, ctx["score"].temperature, ctx["vocab"],
                               topk=req.teacher_topk, pad_id=ctx["pad_id"], groups=groups,
                               declared_fold=cfg.sglang.teacher_logit_temperature)


# ------------------------------------------------------------------------------------------------ scorer
class SGLangTeacherScorer:
    """A `TeacherScorer` (training/scoring.py) on SGLang teacher servers: lp_t and top-k at the rollout temperature.

    engine: the teacher servers' `SGLangEngine` on the rank that holds them (`server_rank`, global rank 0), None on
    the other ranks. temperature: the rollout temperature (> 0); every server must serve logits at it (its
    checkpoint folded for it, or a plain one at T = 1), checked at construction. vocab_size: the real vocabulary.
    topk: the k `prefetch` requests (the objective's `teacher_topk`; `score` uses `req.teacher_topk`).
    groups: the student's ParallelGroups (None: one process, it is the last stage). declared_fold: the fold of
    attached servers whose model_path this machine cannot read (sglang.teacher_logit_temperature).
    """

    name = "sglang"
    capabilities = CAPABILITIES

    def __init__(self, engine, temperature: float, vocab_size: int, topk: int = 0, pad_id: int = 0, groups=None,
                 declared_fold: float | None = None, check_servers: bool = True, server_rank: int = 0,
                 model_vocab_size: int | None = None):
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"SGLang teacher scoring needs a rollout temperature > 0; got {temperature!r}")
        if topk < 0:
            raise ValueError(f"topk must be >= 0; got {topk}")
        self.engine, self.groups, self.server_rank = engine, groups, server_rank
        self.temperature = float(temperature)
        self.vocab_size, self.topk, self.pad_id = int(vocab_size), int(topk), int(pad_id)
        self.declared_fold = declared_fold
        # the served model's logit rows (config.json vocab_size >= the real vocabulary); None = read it from the
        # checkpoint the servers report (or the engine's base_model_dir) in check_servers
        self.model_vocab_size = int(model_vocab_size) if model_vocab_size else None
        workers = engine.cfg.concurrency if engine is not None else 1
        self._pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sglang-score")
        self._pending: dict[tuple, cf.Future] = {}  # prefetched: (prompt, response) -> Future[SampleScores]
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "prefetched": 0, "prefetch_hits": 0, "score_s": 0.0}
        if check_servers and engine is not None:
            self.check_servers()
        if self.model_vocab_size is None:
            self.model_vocab_size = self.vocab_size
        if self.model_vocab_size < self.vocab_size:
            raise ValueError(f"the teacher servers' model has {self.model_vocab_size} logit rows, fewer than the "
                             f"real vocabulary's {self.vocab_size} tokens")

    # -- start-up checks -----------------------------------------------------------------------------------------
    def check_servers(self) -> None:
        """Every server must serve logits at the rollout temperature (see the module doc); else one line + fix."""
        rows = set()
        for s in self.engine.servers:
            fold, path = server_fold(s.url, self.declared_fold, s.name)
            if not same_temperature(fold, self.temperature):
                raise SGLangServerError(self._temperature_error(s.name, path, fold))
            rows.add(config_vocab_size(path))
        base = getattr(self.engine, "base_model_dir", None)
        known = {v for v in rows if v is not None} or ({config_vocab_size(base)} - {None} if base else set())
        if len(known) > 1:
            raise SGLangServerError(f"SGLang teacher servers serve models of different vocabulary sizes {known}")
        if self.model_vocab_size is None:
            if not known:
                raise SGLangServerError("cannot tell the teacher servers' vocabulary size (no config.json readable "
                                        "at their model_path or the engine's base_model_dir); pass model_vocab_size")
            self.model_vocab_size = known.pop()

    def _temperature_error(self, name: str, path: str, fold: float) -> str:
        what = f"raw logits of {path} (temperature 1)" if fold == 1.0 else \
            f"logits of {path}, folded for temperature {fold:g}"
        return (f"SGLang {name} cannot score at rollout.temperature={self.temperature:g}: its input log-probs are "
                f"log_softmax of the {what}; SGLang 0.5.23 applies no temperature to input log-probs "
                f"(srt/layers/logprob_processor.py, InputLogprobProcessor). Fix: leave sglang.teacher_urls empty "
                f"so the trainer launches folded teacher servers, or launch them from `python -m "
                f"megatron_tropd.rollout.sglang_scoring fold TEACHER_DIR OUT_DIR --temperature "
                f"{self.temperature:g}`, or use teacher.scorer=megatron")

    # -- one sequence --------------------------------------------------------------------------------------------
    def payload(self, prompt_ids: Sequence[int], response_ids: Sequence[int], k: int) -> dict:
        n_extra = self.model_vocab_size - self.vocab_size  # logit rows beyond the real vocabulary (padding)
        out = {"input_ids": [int(t) for t in prompt_ids] + [int(t) for t in response_ids],
               # the temperature does not act on input log-probs (module doc): the fold does
               "sampling_params": {"max_new_tokens": 0, "temperature": 1.0},
               "return_logprob": True, "logprob_start_len": len(prompt_ids) - 1,
               "top_logprobs_num": int(k) + n_extra if k else 0,
               "return_flat_raw_top_logprobs": True, "return_flat_raw_top_logprobs_b64": True}
        if n_extra:  # their mass renormalises every value to the real vocabulary (parse_scores)
            out["token_ids_logprob"] = list(range(self.vocab_size, self.model_vocab_size))
        return out

    def score_sequence(self, prompt_ids: Sequence[int], response_ids: Sequence[int], k: int | None = None,
                       what: str = "") -> SampleScores:
        """Blocking: the teacher's outputs at the response tokens of one prompt + response (timeouts, retries and
        relaunch are the engine's: `sglang.request_timeout_s`, `retries`, `on_server_failure`)."""
        k = self.topk if k is None else int(k)
        if self.engine is None:
            raise SGLangServerError(f"{what or 'a sequence'}: this rank holds no SGLang teacher engine (global rank "
                                    f"{self.server_rank} does)")
        if not prompt_ids:
            raise ValueError("cannot score a sequence with an empty prompt")
        r = len(response_ids)
        if r == 0:
            empty = torch.zeros(0, k)
            return SampleScores(torch.zeros(0), empty if k else None, empty.long() if k else None, self.temperature)
        with self._lock:  # called from the pool's threads
            self.stats["requests"] += 1
        resp = self.engine.request(self.payload(prompt_ids, response_ids, k), what or f"score {len(prompt_ids)}+{r}")
        return parse_scores(resp, list(response_ids), k, self.vocab_size, self.temperature, what,
                            self.model_vocab_size)

    @staticmethod
    def _key(prompt_ids, response_ids) -> tuple:
        return (tuple(int(t) for t in prompt_ids), tuple(int(t) for t in response_ids))

    # -- overlap with generation (server rank) -----------------------------------------------------------------
    def prefetch(self, sample) -> None:
        """Submit a finished sample's scoring request (non-blocking; the engine calls it as samples complete)."""
        if self.engine is None:
            return
        key = self._key(sample.prompt_ids, sample.response_ids)
        with self._lock:
            if key not in self._pending:
                what = f"score request_id={sample.request_id} sample={sample.meta.get('sample_index', '?')}"
                self._pending[key] = self._pool.submit(self.score_sequence, key[0], key[1], None, what)
                self.stats["prefetched"] += 1

    def _serve(self, wanted: list[tuple[int, tuple, tuple]], k: int) -> list[SampleScores]:
        """Scores of every (sample id, prompt, response), prefetched ones reused; leftovers of the prefetch are
        dropped (they were for samples this step does not score)."""
        futs = []
        with self._lock:
            pending, self._pending = self._pending, {}
        try:
            for sid, prompt, response in wanted:
                key = (prompt, response)
                f = pending.get(key)
                if f is not None and (k == 0 or self.topk >= k):
                    self.stats["prefetch_hits"] += 1
                else:
                    f = self._pool.submit(self.score_sequence, prompt, response, k, f"score sample_id={sid}")
                    pending[key] = f
                futs.append(f)
            out = []
            for f in futs:
                sc = f.result()
                if k and sc.tk_lp.shape[-1] > k:
                    sc = SampleScores(sc.lp, sc.tk_lp[:, :k], sc.tk_ids[:, :k], sc.temperature)
                out.append(sc)
            return out
        finally:
            for f in pending.values():
                f.cancel()

    # -- the seam ------------------------------------------------------------------------------------------------
    def score(self, micro_batches: list, req) -> list[TeacherTokens]:
        """TeacherTokens per micro-batch (RolloutBatch), aligned with `mb.targets`, on the last pipeline stage; []
        elsewhere. Collective over the world when there is a process group (every rank calls it)."""
        import time

        import torch.distributed as dist

        check_requirements(req)
        t0 = time.perf_counter()
        k = int(req.teacher_topk)
        last = self.groups is None or self.groups.is_last_stage
        rows = _response_rows(micro_batches) if last else []
        wanted = [(int(micro_batches[m].sample_ids[i]), prompt, response) for m, i, prompt, response, _ in rows]
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world == 1:
            results = self._serve(wanted, k)
        else:
            rank = dist.get_rank()
            gathered = [None] * world if rank == self.server_rank else None
            dist.gather_object(wanted, gathered, dst=self.server_rank)
            parts = None
            if rank == self.server_rank:
                try:
                    flat = self._serve([w for g in gathered for w in g], k)
                    parts, n = [], 0
                    for g in gathered:
                        parts.append((None, flat[n:n + len(g)]))
                        n += len(g)
                except Exception as e:  # noqa: BLE001 - every rank raises it below (nobody waits forever)
                    parts = [(f"{type(e).__name__}: {e}", None)] * world
            box = [None]
            dist.scatter_object_list(box, parts, src=self.server_rank)
            error, results = box[0]
            if error is not None:
                raise SGLangServerError(f"SGLang teacher scoring (on global rank {self.server_rank}) failed: {error}")
        self.stats["score_s"] += time.perf_counter() - t0
        if not last:
            return []
        found = {(m, i): sc for (m, i, *_), sc in zip(rows, results)}
        out = []
        for m, mb in enumerate(micro_batches):
            b, s = mb.response_mask.shape
            lp = torch.zeros(b, s, dtype=torch.float32)
            tk_lp = torch.zeros(b, s, k, dtype=torch.float32) if k else None
            tk_ids = torch.full((b, s, k), self.pad_id, dtype=torch.int64) if k else None
            for (mm, i, _, response, p) in rows:
                if mm != m:
                    continue
                sc, r = found[(m, i)], len(response)
                lp[i, p - 1:p - 1 + r] = sc.lp
                if k:
                    tk_lp[i, p - 1:p - 1 + r] = sc.tk_lp
                    tk_ids[i, p - 1:p - 1 + r] = sc.tk_ids
            dev = mb.tokens.device
            out.append(TeacherTokens(lp_t=lp.to(dev), tk_lp=None if tk_lp is None else tk_lp.to(dev),
                                     tk_ids=None if tk_ids is None else tk_ids.to(dev)))
        return out

    def step_metrics(self) -> dict:
        """This step's scoring counters (logged by the loop, then reset): requests sent, how many samples were
        prefetched while rollouts were still generating and how many of those `score` reused, and the seconds
        `score` waited (small when scoring overlapped generation)."""
        out = {f"sglang_scoring/{k}": float(v) for k, v in self.stats.items()}
        self.stats = {k: 0 if isinstance(v, int) else 0.0 for k, v in self.stats.items()}
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _response_rows(micro_batches: list) -> list[tuple[int, int, tuple, tuple, int]]:
    """(micro-batch, row, prompt ids, response ids, prompt length) of every row with response targets: target t
    predicts tokens[t + 1], so response targets [p - 1, p - 1 + r) are response tokens [p, p + r)."""
    rows = []
    for m, mb in enumerate(micro_batches):
        resp, tokens = mb.response_mask.cpu(), mb.tokens.cpu()
        for i in range(mb.size):
            idx = resp[i].nonzero().squeeze(-1)
            if idx.numel() == 0:
                continue
            first, last = int(idx[0]), int(idx[-1])
            if last - first + 1 != idx.numel():
                raise ValueError(f"micro-batch {m} row {i}: response positions are not contiguous")
            p = first + 1
            rows.append((m, i, tuple(tokens[i, :p].tolist()), tuple(tokens[i, p:last + 2].tolist()), p))
    return rows


def _b64(meta: dict, name: str, dtype) -> np.ndarray:
    return np.frombuffer(base64.b64decode(meta[name]), dtype=np.dtype(dtype).newbyteorder("<"))


def parse_scores(resp: dict, response_ids: list[int], k: int, vocab_size: int, temperature: float,
                 what: str = "", model_vocab_size: int | None = None) -> SampleScores:
    """SampleScores from a `/generate` answer to `SGLangTeacherScorer.payload` (checks ids and shapes).

    The server normalises over its model's `model_vocab_size` logits; the trainer over the real vocabulary
    [0, vocab_size). With extra rows, the answer carries their log-probs (`input_token_ids_logprobs`) and every
    value is renormalised exactly: lp_real = lp_model - log(1 - sum_extra p), and the top-k are the best k real ids
    of the top-(k + extra) the payload asked for."""
    meta = resp.get("meta_info") or {}
    r = len(response_ids)
    n_extra = (model_vocab_size or vocab_size) - vocab_size
    entries = meta.get("input_token_logprobs")
    if entries is None:
        raise SGLangServerError(f"SGLang {what}: answer has no meta_info.input_token_logprobs (keys {sorted(meta)})")
    entries = entries[1:]  # entry 0 (position logprob_start_len) is None by construction
    if len(entries) != r or [int(e[1]) for e in entries] != list(response_ids):
        raise SGLangServerError(f"SGLang {what}: input_token_logprobs do not cover the {r} response tokens "
                                f"(got {len(entries)} entries); logprob_start_len not honoured?")
    lp = torch.tensor([float(e[0]) for e in entries], dtype=torch.float64)
    shift = torch.zeros(r, dtype=torch.float64)  # -log(1 - mass outside the real vocabulary), per position
    if n_extra:
        extra = (meta.get("input_token_ids_logprobs") or [None])[1:]
        if len(extra) != r or any(row is None or len(row) != n_extra for row in extra):
            raise SGLangServerError(f"SGLang {what}: no log-probs of the {n_extra} ids outside the real vocabulary "
                                    f"(input_token_ids_logprobs); token_ids_logprob not honoured?")
        log_mass = torch.logsumexp(torch.tensor([[float(e[0]) for e in row] for row in extra],
                                                dtype=torch.float64), -1)
        if not bool((log_mass < 0).all()):
            raise SGLangServerError(f"SGLang {what}: the teacher puts all its probability outside the real "
                                    f"vocabulary [0, {vocab_size}) at some position")
        shift = -torch.log1p(-torch.exp(log_mass))
    lp = (lp + shift).float()
    tk_lp = tk_ids = None
    if k:
        kk = k + n_extra
        if "input_top_logprobs_val_flat_b64" in meta:
            rows, width = meta["input_top_logprobs_shape"]
            null = int(meta.get("input_top_logprobs_null_prefix", 0))
            vals = _b64(meta, "input_top_logprobs_val_flat_b64", meta.get("input_top_logprobs_val_flat_b64_dtype",
                                                                          "float32")).reshape(rows, width)
            ids = _b64(meta, "input_top_logprobs_idx_flat_b64", meta.get("input_top_logprobs_idx_flat_b64_dtype",
                                                                         "int32")).reshape(rows, width)
            if null != 1 or rows != r:
                raise SGLangServerError(f"SGLang {what}: top log-probs have {rows} rows after {null} null ones; "
                                        f"expected {r} after 1")
            vals, ids = torch.from_numpy(vals.astype(np.float32)), torch.from_numpy(ids.astype(np.int64))
        else:  # nested [[logprob, id, text], ...] per position (servers without the flat format)
            tops = (meta.get("input_top_logprobs") or [])[1:]
            if len(tops) != r:
                raise SGLangServerError(f"SGLang {what}: {len(tops)} top-logprob rows for {r} response tokens")
            vals = torch.tensor([[float(e[0]) for e in row] for row in tops], dtype=torch.float32)
            ids = torch.tensor([[int(e[1]) for e in row] for row in tops], dtype=torch.int64)
        if vals.shape != (r, kk):
            raise SGLangServerError(f"SGLang {what}: top log-probs of shape {tuple(vals.shape)}, expected {(r, kk)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size + n_extra):
            raise SGLangServerError(f"SGLang {what}: top-k ids outside the server model's vocabulary [0, "
                                    f"{vocab_size + n_extra}) (max {int(ids.max())}); is it serving the teacher?")
        vals = vals.masked_fill(ids >= vocab_size, float("-inf"))  # padding rows are not tokens
        # the trainer's convention (ops.topk_logprobs): log-prob descending, ties by the lowest id
        order = torch.sort(ids, dim=-1, stable=True).indices
        vals, ids = vals.gather(1, order), ids.gather(1, order)
        order = torch.sort(vals, dim=-1, descending=True, stable=True).indices[:, :k]
        tk_lp, tk_ids = (vals.gather(1, order).double() + shift[:, None]).float(), ids.gather(1, order)
    return SampleScores(lp=lp, tk_lp=tk_lp, tk_ids=tk_ids, temperature=temperature)


def _register() -> None:
    """`teacher.scorer: sglang` behind the seam (training/teachers.py imports this module on first use)."""
    from megatron_tropd.training.teachers import ExternalScorer, register_scorer

    register_scorer("sglang", ExternalScorer(check=check_for_run, build=build_for_run))


_register()


def main(argv: list[str] | None = None) -> int:
    """`python -m megatron_tropd.rollout.sglang_scoring fold TEACHER_DIR OUT_DIR --temperature T`."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m megatron_tropd.rollout.sglang_scoring",
                                description="Write a temperature-folded teacher checkpoint for SGLang scoring "
                                            "servers (their input log-probs are then at T).")
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fold", help="logits / T via the final-norm weight; other files symlinked")
    f.add_argument("teacher_dir")
    f.add_argument("out_dir")
    f.add_argument("--temperature", type=float, required=True)
    args = p.parse_args(argv)
    try:
        out = fold_temperature(args.teacher_dir, args.out_dir, args.temperature)
    except ValueError as e:
        p.error(str(e))
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
