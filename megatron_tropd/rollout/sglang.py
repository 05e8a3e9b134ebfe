"""`SGLangEngine`: rollouts from SGLang HTTP servers (one or more per role), and student weight sync.

Generation: one `/generate` per sample (`input_ids` = prompt + teacher prefix, `return_logprob`, the sampling
params, `stop_token_ids`, `sampling_seed` from (seed, request_id, sample index)), at most `sglang.concurrency` in
flight, spread over the role's servers (least outstanding or round robin). Each sample records the
`meta_info.weight_version` the server reported *for that request*, so the trainer can refuse stale samples.
Failures: connection errors / 5xx are retried with exponential back-off; a launched server that died is
relaunched (`on_server_failure: relaunch`, with the newest synced weights) or the call fails with an error that
names the server, the request and the server's log (`fail`). Every HTTP call has a timeout: nothing hangs.

Log-probs: SGLang 0.5.23 reports log(softmax(logits / T)) of the sampled token, of the *unfiltered* tempered
distribution (its sampler filters a sorted copy for top-p/top-k), the embedded engine's convention; greedy (T = 0)
reports the T = 1 distribution. Tested against the megatron student at T = 1 and at T = 0.7 with top_p = 0.8.

Weight sync (`update_weights`, student servers only), wrapped in pause_generation -> flush_cache -> update ->
continue_generation:
- disk (portable, runs on CPU): the HF-named tensor stream is written as safetensors into
  `{weights_dir}/v{version:06d}` (temp dir + rename: a reader never sees half a checkpoint; config/tokenizer
  copied from the base model so a relaunched server can start from it; the newest `keep_weight_versions` kept),
  then `/update_weights_from_disk {model_path, weight_version}` on every student server;
- tensor (colocated GPUs) and distributed (NCCL broadcast to dedicated servers): the request flows are here, but
  they need CUDA tensors and NCCL; on a machine without CUDA they raise a clear error.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

import requests
import torch

from megatron_tropd.rollout.base import GenerationRequest, Sample, SamplingParams, sample_seed, start_samples
from megatron_tropd.rollout.sglang_config import SGLangConfig, validate
from megatron_tropd.atomic import atomic_directory
from megatron_tropd.rollout import sglang_server as srv
from megatron_tropd.rollout.sglang_server import SGLangServerError, Server, ServerPool

logger = logging.getLogger(__name__)



class _Aborted(SGLangServerError):
    """The server aborted a request (pause_generation(mode=abort) during a weight update); it is retried."""


class WeightSyncError(RuntimeError):
    """A weight update did not take effect; the servers still hold older weights (do not train on them)."""


class SGLangEngine:
    """A `RolloutEngine` over SGLang servers of one role ("student" gets weight updates, "teacher" does not)."""

    def __init__(self, urls: list[str] | None = None, *, servers: list[Server] | None = None,
                 cfg: SGLangConfig | None = None, role: str = "student", weight_version: int = 0,
                 base_model_dir: str | Path | None = None, weights_dir: str | Path | None = None,
                 check_health: bool = True, logit_temperature: float = 1.0, vocab_size: int | None = None):
        """urls: attach to running servers; servers: handles from `sglang_server.launch` (owned: closed here).
        base_model_dir: the HF dir the servers started from (config/tokenizer for synced weight dirs).
        logit_temperature: the servers' checkpoint is temperature-folded (logits / logit_temperature, see
        sglang_scoring.fold_temperature): requests are sent at temperature / logit_temperature, which samples
        and reports log-probs at `temperature` of the unfolded model (greedy: same tokens, NaN log-probs).
        vocab_size: the real vocabulary (the tokenizer's); when the served model (base_model_dir's config.json) has
        more logit rows, every request masks them (`logit_bias` -1e30): no padding id is ever sampled and the
        reported log-probs are normalised over the real vocabulary, as the trainer's."""
        self.cfg = cfg or SGLangConfig()
        validate(self.cfg)
        if servers is None:
            if not urls:
                raise ValueError("SGLangEngine needs server URLs (sglang.student_urls / teacher_urls) or launched "
                                 "servers")
            servers = [Server(url=u.rstrip("/"), role=role, index=i) for i, u in enumerate(urls)]
        self.role = role
        self.pool = ServerPool(servers, self.cfg.load_balance)
        self.base_model_dir = Path(base_model_dir) if base_model_dir else None
        self.weights_dir = Path(weights_dir) if weights_dir else None
        self._version = weight_version
        self._stale: str | None = None  # set when a weight update failed: generation refuses to run
        self._relaunch_lock = threading.Lock()
        self._latest_model_path: Path | None = self.base_model_dir
        self._closed = False
        if not logit_temperature > 0:
            raise ValueError(f"logit_temperature must be > 0; got {logit_temperature}")
        self.logit_temperature = float(logit_temperature)
        self._padding_bias = _padding_bias(self.base_model_dir, vocab_size)
        self.stats = {"requests": 0, "retries": 0, "relaunches": 0, "last_sync_s": 0.0, "last_update_s": 0.0}
        if check_health:
            for s in servers:
                if s.proc is None:
                    self._check_reachable(s)

    # -- properties / control ----------------------------------------------------------------------------------
    @property
    def weight_version(self) -> int:
        return self._version

    @property
    def servers(self) -> list[Server]:
        return self.pool.servers

    def _check_reachable(self, s: Server) -> None:
        try:
            r = srv.get(s.url, "/health", timeout=10)
            if r.status_code != 200:
                raise SGLangServerError(f"HTTP {r.status_code}")
        except (requests.RequestException, SGLangServerError) as e:
            raise SGLangServerError(f"SGLang {s.name} is not reachable ({e}); start it or fix "
                                    f"sglang.{self.role}_urls") from e

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for s in self.servers:
            srv.stop(s)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- generation ----------------------------------------------------------------------------------------------
    def generate(self, requests_: list[GenerationRequest], params: SamplingParams,
                 on_sample: Callable[[Sample], None] | None = None) -> list[list[Sample]]:
        """on_sample: called (in this thread) with each sample as soon as it is complete, while the others are
        still generating (e.g. `SGLangTeacherScorer.prefetch`: scoring overlaps generation)."""
        if self._stale:
            raise WeightSyncError(f"SGLang {self.role} servers hold stale weights ({self._stale}); refusing to "
                                  "generate until a weight update succeeds")
        stop = set(params.stop_token_ids)
        out: list[list[Sample]] = []
        jobs: list[tuple[Sample, dict, str]] = []
        for req in requests_:
            cap, opened = start_samples(req, params, self._version)
            prefix = list(req.prefix_ids)
            for k, s, to_generate in opened:
                if to_generate:
                    jobs.append((s, self._payload(req, prefix, cap - len(prefix), k, params),
                                 f"request_id={req.request_id} sample={k}"))
                elif on_sample is not None:
                    on_sample(s)  # complete already (its prefix ended it)
            group = [s for _, s, _ in opened]
            out.append(group)
        if jobs:
            # greedy on a folded server picks the same tokens, but the T = 1 log-probs (the greedy convention)
            # cannot be recovered from folded logits: NaN, so that nothing can use them by mistake
            greedy_on_fold = params.temperature == 0 and self.logit_temperature != 1
            self._run_jobs(jobs, stop, on_sample, nan_logprobs=greedy_on_fold)
        return out

    def _payload(self, req: GenerationRequest, prefix: list[int], budget: int, k: int,
                 params: SamplingParams) -> dict:
        # SGLang also stops at the model's EOS ids (`ignore_eos` would disable stop_token_ids too); the trainer
        # always passes the tokenizer's EOS among the stop ids, so both engines stop at the same tokens there.
        # sampling_seed is honoured only by servers started with --enable-deterministic-inference (GPU attention
        # backends); the CPU torch-native server ignores it (docs/rollout.md, "Determinism").
        # on a temperature-folded server (logits / T_fold) sampling at T / T_fold is sampling at T
        sp = {"temperature": float(params.temperature) / self.logit_temperature, "top_p": float(params.top_p),
              "max_new_tokens": budget, "stop_token_ids": list(params.stop_token_ids), "skip_special_tokens": False,
              "no_stop_trim": True, "sampling_seed": sample_seed(params.seed, req.request_id, k)}
        if self._padding_bias:
            sp["logit_bias"] = self._padding_bias
        return {"input_ids": list(req.prompt_ids) + prefix, "sampling_params": sp, "return_logprob": True,
                "logprob_start_len": -1}

    def _run_jobs(self, jobs: list[tuple[Sample, dict, str]], stop: set[int],
                  on_sample: Callable[[Sample], None] | None = None, nan_logprobs: bool = False) -> None:
        workers = min(self.cfg.concurrency, len(jobs))
        with cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"sglang-{self.role}") as ex:
            futs = {ex.submit(self._generate_one, payload, what): (s, what) for s, payload, what in jobs}
            try:
                for fut in cf.as_completed(futs):
                    s, what = futs[fut]
                    self._fill(s, fut.result(), stop, what)
                    if nan_logprobs:
                        s.logprobs = [float("nan")] * len(s.logprobs)
                    if on_sample is not None:
                        on_sample(s)
            except BaseException:
                for f in futs:
                    f.cancel()
                raise

    def request(self, payload: dict, what: str) -> dict:
        """One `/generate` with this engine's retries, back-off, timeouts and dead-server policy (what
        `sglang_scoring.SGLangTeacherScorer` sends; `what` names the request in errors)."""
        if self._stale:
            raise WeightSyncError(f"SGLang {self.role} servers hold stale weights ({self._stale})")
        return self._generate_one(payload, what)

    def _generate_one(self, payload: dict, what: str) -> dict:
        """POST /generate with retries and back-off; relaunch a dead launched server if the policy says so."""
        attempts, delay, tried = self.cfg.retries + 1, self.cfg.backoff_s, set()
        last: Exception | None = None
        for attempt in range(attempts):
            server = self.pool.acquire(exclude=tried)
            try:
                self.stats["requests"] += 1
                resp = srv.post(server.url, "/generate", payload, timeout=self.cfg.request_timeout_s)
                fin = (resp.get("meta_info") or {}).get("finish_reason") or {}
                if isinstance(fin, dict) and fin.get("type") == "abort":
                    # aborted (e.g. by pause_generation during a weight update): regenerate it whole, so one
                    # sample never mixes two weight versions
                    raise _Aborted(f"{server.name} aborted {what}: {fin.get('message', fin)}")
                resp["_server"] = server.name
                return resp
            except _Aborted as e:
                last = e
                if attempt + 1 < attempts:
                    self.stats["retries"] += 1
                    time.sleep(delay)
                    delay *= 2
                continue
            except (requests.RequestException, SGLangServerError) as e:
                last = e
                if isinstance(e, SGLangServerError) and e.status is not None and 400 <= e.status < 500:
                    raise SGLangServerError(f"SGLang {server.name} rejected {what}: {e}") from e  # 4xx: no retry
                if len(self.servers) > 1:
                    tried.add(server.url)
                dead = not server.alive() or not self._responds(server)
                logger.warning(f"SGLang {server.name}: {what} failed (attempt {attempt + 1}/{attempts}): "
                               f"{type(e).__name__}: {e}{' [server down]' if dead else ''}")
                if dead:
                    self._handle_dead(server, what, e)
                if attempt + 1 < attempts:
                    self.stats["retries"] += 1
                    time.sleep(delay)
                    delay *= 2
            finally:
                self.pool.release(server)
        raise SGLangServerError(f"SGLang {self.role}: {what} failed {attempts} times (sglang.retries="
                                f"{self.cfg.retries}); last error: {type(last).__name__}: {last}")

    def _responds(self, server: Server) -> bool:
        try:
            return srv.get(server.url, "/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def _handle_dead(self, server: Server, what: str, err: Exception) -> None:
        if self.cfg.on_server_failure == "fail" or server.proc is None:
            if len([s for s in self.servers if s.alive()]) > 1 and server.proc is None:
                return  # attached: another server of the role may still take the retry
            tail = server.log_tail(15)
            raise SGLangServerError(
                f"SGLang {server.name} is down while serving {what} ({type(err).__name__}: {err}); "
                f"sglang.on_server_failure={self.cfg.on_server_failure}"
                f"{'' if server.proc is not None else ' (attached by URL: cannot relaunch)'}"
                f"{f'; log {server.log_path} ends with:' + chr(10) + tail if tail else ''}") from err
        with self._relaunch_lock:  # one thread relaunches; the others find it healthy again
            if self._responds(server):
                return
            path = self._latest_model_path or self.base_model_dir
            logger.warning(f"relaunching SGLang {server.name} from {path} (weight version {self._version})")
            srv.relaunch(server, path, self._version)
            self.stats["relaunches"] += 1
            srv.wait_healthy([server], self.cfg.startup_timeout_s)

    def _fill(self, s: Sample, resp: dict, stop: set[int], what: str) -> None:
        meta = resp.get("meta_info") or {}
        entries = meta.get("output_token_logprobs")
        if entries is None:
            raise SGLangServerError(f"SGLang {self.role}: {what}: response has no meta_info.output_token_logprobs "
                                    f"(keys {sorted(meta)}); is return_logprob supported by this server?")
        ids = [int(e[1]) for e in entries]
        if "output_ids" in resp and list(resp["output_ids"]) != ids:
            raise SGLangServerError(f"SGLang {self.role}: {what}: output_ids and output_token_logprobs disagree")
        s.response_ids.extend(ids)
        s.logprobs = [float(e[0]) for e in entries]
        fin = meta.get("finish_reason") or {}
        kind = fin.get("type") if isinstance(fin, dict) else str(fin)
        s.finish_reason = "stop" if (kind == "stop" or (ids and ids[-1] in stop)) else "length"
        # A request that ran across an update reports one span per version: record the oldest (conservative;
        # the trainer's max_weight_lag check then sees it).
        spans = meta.get("weight_versions") or []
        versions = [self._parse_version(sp.get("version"), what) for sp in spans if isinstance(sp, dict)]
        s.weight_version = min(versions) if versions else self._parse_version(meta.get("weight_version"), what)
        if len(set(versions)) > 1:
            s.meta["weight_versions"] = spans
        s.meta["server"] = resp.get("_server")
        s.meta["engine"] = "sglang"

    def _parse_version(self, v, what: str) -> int:
        try:
            return int(v)
        except (TypeError, ValueError):
            if self.stats["last_update_s"] == 0.0:  # never updated: the server serves its launch weights
                return self._version
            raise SGLangServerError(f"SGLang {self.role}: {what}: server reports weight_version={v!r} after an "
                                    f"update to {self._version}") from None

    # -- weight sync ---------------------------------------------------------------------------------------------
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Hand the servers a new set of HF-named weights (the whole stream is consumed even on failure so the
        other ranks' gathers complete). Raises WeightSyncError when any server did not take them."""
        if self.role != "student":
            raise ValueError("weight updates go to the student engine only")
        t0 = time.time()
        mode = self.cfg.weight_sync
        try:
            if mode == "disk":
                path = self._write_version(named_tensors, version)
                self._update_all(lambda s: self._update_from_disk(s, path, version))
                self._latest_model_path = path
                self._prune_versions()
            elif mode == "tensor":
                self._update_from_tensor(named_tensors, version)
            else:
                self._update_distributed(named_tensors, version)
        except BaseException as e:
            for _ in named_tensors:  # drain: the stream is collective over the model-parallel ranks
                pass
            self._stale = f"update to version {version} failed: {e}"
            raise WeightSyncError(f"SGLang weight sync ({mode}) to version {version} failed (the servers keep "
                                  f"version {self._version}): {e}") from e
        self._version = version
        self._stale = None
        self.stats["last_sync_s"] = time.time() - t0

    def _write_version(self, named_tensors, version: int) -> Path:
        from megatron_tropd.conversion.hf_io import copy_tokenizer, write_safetensors_shards

        if self.weights_dir is None:
            raise ValueError("the disk weight-sync path needs weights_dir (sglang.weights_dir or the run dir)")
        self.weights_dir.mkdir(parents=True, exist_ok=True)
        final = self.weights_dir / f"v{version:06d}"
        with atomic_directory(final, overwrite=True) as tmp:
            write_safetensors_shards(named_tensors, tmp)
            if self.base_model_dir is not None:  # a relaunched server starts from this dir: make it complete
                for name in ("config.json", "generation_config.json"):
                    if (self.base_model_dir / name).is_file():
                        shutil.copy2(self.base_model_dir / name, tmp / name)
                copy_tokenizer(self.base_model_dir, tmp)
        return final

    def _prune_versions(self) -> None:
        dirs = sorted(p for p in self.weights_dir.glob("v[0-9]*") if p.is_dir())
        for old in dirs[: -self.cfg.keep_weight_versions]:
            if old != self._latest_model_path:
                shutil.rmtree(old, ignore_errors=True)

    def _update_all(self, fn) -> None:
        """Run one update per server in parallel; collect every failure into one error."""
        errors = []
        with cf.ThreadPoolExecutor(max_workers=len(self.servers)) as ex:
            for s, f in [(s, ex.submit(fn, s)) for s in self.servers]:
                try:
                    f.result()
                except Exception as e:  # noqa: BLE001 - reported together below
                    errors.append(f"{s.name}: {e}")
        if errors:
            raise WeightSyncError("; ".join(errors))

    def _paused(self, s: Server):
        engine = self

        class _Ctx:
            def __enter__(self):
                if engine.cfg.pause_during_update:
                    # abort: in-flight requests come back aborted and are regenerated with the new weights
                    srv.post(s.url, "/pause_generation", {"mode": "abort"}, timeout=30)
                    srv.post(s.url, "/flush_cache?timeout=30", None, timeout=60)

            def __exit__(self, *exc):
                if engine.cfg.pause_during_update:
                    try:
                        srv.post(s.url, "/continue_generation", {}, timeout=30)
                    except (requests.RequestException, SGLangServerError) as e:
                        if exc[0] is None:
                            raise
                        logger.warning(f"continue_generation on {s.name} failed after a failed update: {e}")

        return _Ctx()

    def _update_from_disk(self, s: Server, path: Path, version: int) -> None:
        t0 = time.time()
        with self._paused(s):
            try:
                r = srv.post(s.url, "/update_weights_from_disk",
                             {"model_path": str(path), "weight_version": str(version)},
                             timeout=self.cfg.update_timeout_s)
            except SGLangServerError as e:
                if e.status == 400:  # SGLang answers a failed load with 400 {"success": false, "message": ...}
                    raise WeightSyncError(f"/update_weights_from_disk {path} was refused: {e}") from e
                raise
        if not r.get("success", False):
            raise WeightSyncError(f"/update_weights_from_disk {path} was refused: {r.get('message', r)}")
        self.stats["last_update_s"] = time.time() - t0

    # Colocated and disaggregated paths: GPU clusters only. They follow SGLang's request formats; they are not
    # exercised on the CPU test machines (no CUDA, no NCCL) and refuse to run there.
    def _require_cuda(self, mode: str) -> None:
        if not torch.cuda.is_available():
            raise WeightSyncError(f"sglang.weight_sync={mode} needs CUDA (CUDA IPC handles / NCCL); this machine "
                                  "has none. Use sglang.weight_sync=disk (portable)")

    def _buckets(self, named_tensors):
        bucket, size = [], 0
        for name, t in named_tensors:
            nbytes = t.numel() * t.element_size()
            if bucket and size + nbytes > self.cfg.bucket_bytes:
                yield bucket
                bucket, size = [], 0
            bucket.append((name, t))
            size += nbytes
        if bucket:
            yield bucket

    def _update_from_tensor(self, named_tensors, version: int) -> None:
        """Colocated: the trainer's GPU tensors are shared with the server by CUDA IPC handles, bucket by bucket
        (`/update_weights_from_tensor` with SGLang's serialized named tensors; the last bucket sets the version)."""
        self._require_cuda("tensor")
        import base64
        import pickle

        from torch.multiprocessing.reductions import reduce_tensor

        buckets = list(self._buckets((n, t.cuda().contiguous()) for n, t in named_tensors))
        for s in self.servers:
            with self._paused(s):
                for i, bucket in enumerate(buckets):
                    # SGLang's MultiprocessingSerializer: pickled (name, reduce_tensor(t)) list, base64 for JSON.
                    blob = base64.b64encode(pickle.dumps([(n, reduce_tensor(t)) for n, t in bucket])).decode()
                    last = i == len(buckets) - 1
                    r = srv.post(s.url, "/update_weights_from_tensor",
                                 {"serialized_named_tensors": [blob] * self.cfg.tp_size, "load_format": None,
                                  "flush_cache": last, "weight_version": str(version) if last else None},
                                 timeout=self.cfg.update_timeout_s)
                    if not r.get("success", False):
                        raise WeightSyncError(f"{s.name}: /update_weights_from_tensor refused: {r.get('message')}")

    def _update_distributed(self, named_tensors, version: int) -> None:
        """Disaggregated: an NCCL group {trainer rank 0} + every server's TP ranks; per bucket the server is told
        names/dtypes/shapes (`/update_weights_from_distributed`) while rank 0 broadcasts the tensors."""
        self._require_cuda("distributed")
        import torch.distributed as dist

        if not self.cfg.nccl_master_addr:
            raise WeightSyncError("sglang.weight_sync=distributed needs sglang.nccl_master_addr (trainer rank 0's "
                                  "address as the servers see it)")
        world = 1 + len(self.servers) * self.cfg.tp_size
        if not hasattr(self, "_nccl_group"):
            with cf.ThreadPoolExecutor(max_workers=len(self.servers) + 1) as ex:
                futs = [ex.submit(srv.post, s.url, "/init_weights_update_group",
                                  {"master_address": self.cfg.nccl_master_addr,
                                   "master_port": self.cfg.nccl_master_port, "rank_offset": 1 + i * self.cfg.tp_size,
                                   "world_size": world, "group_name": self.cfg.update_group_name,
                                   "backend": "nccl"}, self.cfg.update_timeout_s)
                        for i, s in enumerate(self.servers)]
                self._nccl_group = _init_nccl_group(self.cfg, world)
                for f in futs:
                    if not f.result().get("success", False):
                        raise WeightSyncError(f"/init_weights_update_group refused: {f.result()}")
        for s in self.servers:
            srv.post(s.url, "/pause_generation", {"mode": "abort"}, timeout=30)
            srv.post(s.url, "/flush_cache?timeout=30", None, timeout=60)
        try:
            buckets = list(self._buckets((n, t.cuda().contiguous()) for n, t in named_tensors))
            for i, bucket in enumerate(buckets):
                last = i == len(buckets) - 1
                body = {"names": [n for n, _ in bucket], "dtypes": [str(t.dtype).removeprefix("torch.")
                                                                   for _, t in bucket],
                        "shapes": [list(t.shape) for _, t in bucket], "group_name": self.cfg.update_group_name,
                        "flush_cache": last, "weight_version": str(version) if last else None}
                with cf.ThreadPoolExecutor(max_workers=len(self.servers)) as ex:
                    futs = [ex.submit(srv.post, s.url, "/update_weights_from_distributed", body,
                                      self.cfg.update_timeout_s) for s in self.servers]
                    for _, t in bucket:
                        dist.broadcast(t, src=0, group=self._nccl_group)
                    for f in futs:
                        if not f.result().get("success", False):
                            raise WeightSyncError(f"/update_weights_from_distributed refused: {f.result()}")
        finally:
            for s in self.servers:
                srv.post(s.url, "/continue_generation", {}, timeout=30)


def _padding_bias(model_dir: Path | None, vocab_size: int | None) -> dict[str, float] | None:
    """logit_bias masking the logit rows of `model_dir`'s model beyond the real vocabulary (None: nothing to mask)."""
    from megatron_tropd.models.hf_mapping import config_vocab_size

    rows = config_vocab_size(model_dir) if vocab_size is not None else None
    if rows is None:
        return None
    return {str(i): -1e30 for i in range(int(vocab_size), rows)} or None


def _init_nccl_group(cfg: SGLangConfig, world: int):
    """Rank 0 of a fresh NCCL group with the servers (separate from the trainer's default group)."""
    from torch.distributed.distributed_c10d import _new_process_group_helper, _world, rendezvous, PrefixStore

    init_method = f"tcp://{cfg.nccl_master_addr}:{cfg.nccl_master_port}"
    store, rank, world = next(rendezvous(init_method, 0, world))
    store = PrefixStore(cfg.update_group_name, store)
    pg, _ = _new_process_group_helper(world, 0, [], "nccl", store, group_name=cfg.update_group_name)
    _world.pg_group_ranks[pg] = {i: i for i in range(world)}
    return pg
