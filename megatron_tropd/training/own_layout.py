"""A frozen megatron teacher in its own TP/PP layout, time-shared on the student's ranks.

    teacher_groups = parallel.build_groups(4, 1)             # e.g. teacher TP4 x DP2 beside a TP1 x DP8 student
    scorer = OwnLayoutTeacherScorer(teacher, teacher_groups, student_groups, opts)
    teacher_out = scorer.score(micro_batches, req)           # the TeacherScorer seam (training/scoring.py)

The teacher scores the whole rollout batch, then the student trains (the two never run at once). One `score`:

1. rows: each student DP rank's sequences (sent by its last-stage, TP-rank-0 rank) are gathered to every rank
   (`all_gather_object` of the token ids, O(b x S) integers) in one canonical order: (student DP rank,
   micro-batch, row). Every rank sees the same list, whatever the two layouts are.
2. teacher pass: teacher DP rank d takes the d-th contiguous share of that list (padded with repeats of the last
   row to a multiple of teacher DP x micro-batch size; padding is scored and dropped), runs megatron's schedule
   on the teacher's own process groups, and computes lp_t / top-k / entropy on its own vocabulary shards
   (`ops`, reductions over the teacher's TP group): no logits leave a rank.
3. exchange: the teacher's last-stage TP-rank-0 ranks send each row's per-token record
   [s, 1 + 2k (+ 1 with entropy)] float32 (lp_t, top-k log-probs, top-k ids, entropy) straight to the student
   last-stage ranks that train that row, in one `all_to_all_single` over the world: O(tokens x k) values.

Full-vocabulary objectives need teacher logits shards aligned with the student's: only the same-layout scorer
(`scoring.MegatronTeacherScorer`) serves them; `teachers.check_scorer_serves` refuses them at start-up.
With `offload=True` (GPU) the teacher's weights wait in pinned host memory between scoring phases.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_tropd import ops
from megatron_tropd.distributed.parallel import ParallelGroups
from megatron_tropd.objectives import Requirements
from megatron_tropd.training.batch import RolloutBatch
from megatron_tropd.training.roles import Teacher
from megatron_tropd.training.schedule import crop_positions, run_schedule
from megatron_tropd.training.scoring import ScoreOptions, TeacherTokens, tp_group

_IDS_EXACT = 1 << 24  # float32 holds every integer below 2^24 exactly (token ids travel in the float32 record)


@dataclass
class TokenRows:
    """A teacher micro-batch: the token ids and where each row's response starts (the teacher needs nothing else)."""

    tokens: torch.Tensor  # [b, S] int64
    first_response: torch.Tensor | None = None  # [b] int64 first target index of each row's response (None: 0)

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    @property
    def inputs(self) -> torch.Tensor:
        return self.tokens[:, :-1]

    @property
    def targets(self) -> torch.Tensor:
        return self.tokens[:, 1:]

    @property
    def response_mask(self) -> torch.Tensor:
        """[b, S-1] bool: positions from each row's first response target on (what `run_schedule(crop=True)` reads
        to cut prompt positions off the output layer)."""
        pos = torch.arange(self.tokens.shape[1] - 1, device=self.tokens.device)
        first = self.first_response if self.first_response is not None else torch.zeros(self.size, dtype=torch.long)
        return pos.unsqueeze(0) >= first.to(self.tokens.device).unsqueeze(1)


def first_response(response_mask: torch.Tensor) -> torch.Tensor:
    """[b, s] bool -> [b] int64 index of each row's first True (s when a row has none)."""
    s = response_mask.shape[1]
    idx = torch.arange(s, device=response_mask.device).expand_as(response_mask)
    return torch.where(response_mask, idx, s).amin(-1).cpu()


def record_width(req: Requirements) -> int:
    """Floats per token in the exchanged record: lp_t, k top-k log-probs, k top-k ids, entropy when asked."""
    return 1 + 2 * req.teacher_topk + int(wants_entropy(req))


def wants_entropy(req: Requirements) -> bool:
    return bool(req.teacher_entropy or req.entropy_threshold == "teacher")


def pack(t: TeacherTokens, req: Requirements) -> torch.Tensor:
    """TeacherTokens of b rows -> [b, s, record_width] float32."""
    parts = [t.lp_t.float().unsqueeze(-1)]
    if req.teacher_topk:
        parts += [t.tk_lp.float(), t.tk_ids.float()]
    if wants_entropy(req):
        parts.append(t.ent_t.float().unsqueeze(-1))
    return torch.cat(parts, dim=-1)


def unpack(rec: torch.Tensor, req: Requirements) -> TeacherTokens:
    """[b, s, record_width] -> TeacherTokens (inverse of `pack`)."""
    k = req.teacher_topk
    out = TeacherTokens(lp_t=rec[..., 0].contiguous())
    if k:
        out.tk_lp = rec[..., 1:1 + k].contiguous()
        out.tk_ids = rec[..., 1 + k:1 + 2 * k].round().long()
    if wants_entropy(req):
        out.ent_t = rec[..., -1].contiguous()
    return out


@dataclass(frozen=True)
class RowPlan:
    """Where every row of one `score` call lives: canonical order (student DP rank, micro-batch, row)."""

    keys: list[tuple[int, int, int]]  # canonical row i -> (student dp rank, micro-batch index, row in it)
    share: int  # rows per teacher DP rank (after padding)
    micro_batch_size: int  # teacher micro-batch size
    seq_len: int  # per-token length s = S - 1 of every row

    def teacher_dp_of(self, i: int) -> int:
        return i // self.share


class OwnLayoutTeacherScorer:
    """A frozen megatron teacher on its own process groups (`parallel.build_groups`), over the student's ranks."""

    def __init__(self, teacher: Teacher, groups: ParallelGroups, student_groups: ParallelGroups, opts: ScoreOptions,
                 micro_batch_size: int = 0, offload: bool = False):
        if opts.vocab_size >= _IDS_EXACT:
            raise ValueError(f"vocabulary of {opts.vocab_size} ids: the own-layout exchange carries ids in float32 "
                             f"(exact below {_IDS_EXACT})")
        if groups.world_size != student_groups.world_size:
            raise ValueError("teacher and student layouts must cover the same ranks")
        self.teacher, self.groups, self.student_groups, self.opts = teacher, groups, student_groups, opts
        self.micro_batch_size = micro_batch_size  # 0 = the student's micro-batch size
        self.offload = offload and groups.device.type == "cuda"
        if self.offload:
            self._move(torch.device("cpu"))

    # ------------------------------------------------------------------------------------------------ the seam
    @torch.no_grad()
    def score(self, micro_batches: list[RolloutBatch], req: Requirements) -> list[TeacherTokens]:
        if req.full_vocab_kl is not None:
            raise ValueError("full-vocabulary objectives need the teacher's logits shard aligned with the student's: "
                             "use a same-layout teacher (teacher.scorer=same_layout)")
        sg = self.student_groups
        tokens, first, plan = self._gather_rows(micro_batches)
        if self.offload:
            self._move(self.groups.device)
        try:
            records = self._teacher_pass(tokens, first, plan, req)
        finally:
            if self.offload:
                self._move(torch.device("cpu"))
        mine = self._exchange(records, plan, req)
        if not sg.is_last_stage:
            return []
        return [unpack(rec[:, :mb.inputs.shape[1]], req) for rec, mb in zip(mine, micro_batches)]

    # ------------------------------------------------------------------------------------------------ 1. rows
    def _gather_rows(self, micro_batches: list[RolloutBatch]) -> tuple[torch.Tensor, torch.Tensor, RowPlan]:
        """Every student DP rank's token rows on every rank, in canonical order; and where each row goes."""
        sg = self.student_groups
        sender = sg.is_last_stage and sg.tp_rank == 0
        mine = (sg.dp_rank, [(mb.tokens.cpu(), first_response(mb.response_mask)) for mb in micro_batches]
                ) if sender else None
        everyone: list = [None] * sg.world_size
        dist.all_gather_object(everyone, mine)
        per_dp = {dp: mbs for dp, mbs in (e for e in everyone if e is not None)}
        if sorted(per_dp) != list(range(sg.dp_size)):
            raise RuntimeError(f"own-layout teacher: rows from student DP ranks {sorted(per_dp)}, expected all "
                               f"{sg.dp_size}")
        keys, rows, firsts = [], [], []
        for dp in range(sg.dp_size):
            for j, (t, first) in enumerate(per_dp[dp]):
                keys += [(dp, j, r) for r in range(t.shape[0])]
                rows.append(t)
                firsts.append(first)
        # micro-batches trimmed to their own length (StepOptions.trim_multiple) are right-padded to the longest:
        # positions past a row's end change nothing before them (causal attention) and are cropped off on return
        width = max((t.shape[1] for t in rows), default=1)
        rows = [torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in rows]
        mbs = self.micro_batch_size or max((t.shape[0] for t in rows), default=1)
        t_dp = self.groups.dp_size
        per_step = t_dp * mbs
        n = len(keys)
        padded = -(-n // per_step) * per_step if n else 0
        tokens = torch.cat(rows) if rows else torch.zeros(0, 1, dtype=torch.int64)
        first = torch.cat(firsts) if firsts else torch.zeros(0, dtype=torch.int64)
        if padded > n:
            tokens = torch.cat([tokens, tokens[-1:].expand(padded - n, -1)])
            first = torch.cat([first, first[-1:].expand(padded - n)])
        return tokens, first, RowPlan(keys, padded // t_dp if padded else 0, mbs, tokens.shape[1] - 1 if n else 0)

    # ------------------------------------------------------------------------------------------------ 2. teacher
    def _teacher_pass(self, tokens: torch.Tensor, first: torch.Tensor, plan: RowPlan, req: Requirements
                      ) -> torch.Tensor | None:
        """[share, s, width] records of this teacher DP rank's rows (on its last stage), else None. `first`: each
        row's first response target; the output layer runs from the micro-batch's earliest one on (0 before)."""
        g = self.groups
        if plan.share == 0:
            return None
        rows = slice(g.dp_rank * plan.share, (g.dp_rank + 1) * plan.share)
        mine, mine_first = tokens[rows].to(g.device), first[rows]
        micro = [TokenRows(mine[i:i + plan.micro_batch_size], mine_first[i:i + plan.micro_batch_size])
                 for i in range(0, plan.share, plan.micro_batch_size)]
        tp, kw = tp_group(g), dict(temperature=self.opts.temperature, vocab_size=self.opts.vocab_size)

        def on_logits(logits, i):
            # logits: this teacher rank's shard [b, s - start, V_padded / tp_teacher] (positions >= start)
            start = micro[i].targets.shape[1] - logits.shape[1]
            out = TeacherTokens(lp_t=ops.token_logprobs(logits, crop_positions(micro[i].targets, start), tp, **kw))
            if req.teacher_topk:
                out.tk_lp, out.tk_ids = ops.topk_logprobs(logits, req.teacher_topk, tp, **kw)
            if wants_entropy(req):
                out.ent_t = ops.entropy(logits, tp, **kw)
            return logits.new_zeros(()), pack(out.uncrop(start), req)

        outs = run_schedule(self.teacher.model, micro, g, on_logits, forward_only=True, crop=self.opts.crop_logits)
        return torch.cat(outs) if g.is_last_stage else None

    # ------------------------------------------------------------------------------------------------ 3. exchange
    def _exchange(self, records: torch.Tensor | None, plan: RowPlan, req: Requirements) -> list[torch.Tensor]:
        """Send each row's record from its teacher source rank to the student last-stage ranks that train it.
        Returns this rank's records per student micro-batch ([] off the student's last stage)."""
        g, sg = self.groups, self.student_groups
        world, me = sg.world_size, sg.rank
        width = record_width(req)

        def source(i: int) -> int:  # teacher rank (tp 0, its dp, last stage) holding row i's record
            return g.tp_size * (plan.teacher_dp_of(i) + g.dp_size * (g.pp_size - 1))

        def dests(dp: int) -> list[int]:  # the student's last-stage ranks of DP rank dp (every TP rank)
            return [t + sg.tp_size * (dp + sg.dp_size * (sg.pp_size - 1)) for t in range(sg.tp_size)]

        send: list[list[int]] = [[] for _ in range(world)]  # rows (canonical index) I send to each rank
        recv: list[list[int]] = [[] for _ in range(world)]  # rows I receive from each rank
        for i, (dp, _, _) in enumerate(plan.keys):
            src, targets = source(i), dests(dp)
            if src == me:
                for d in targets:
                    send[d].append(i)
            if me in targets:
                recv[src].append(i)
        device, seq_len = sg.device, plan.seq_len
        first = g.dp_rank * plan.share
        out_rows = [r for rows in recv for r in rows]
        send_buf = (torch.cat([records[torch.tensor([i - first for i in rows], device=records.device)] for rows in send
                               if rows]).to(device)
                    if records is not None and any(send) else torch.zeros(0, seq_len, width, device=device))
        recv_buf = torch.empty(len(out_rows), seq_len, width, device=device)
        dist.all_to_all_single(recv_buf, send_buf.contiguous(), output_split_sizes=[len(r) for r in recv],
                               input_split_sizes=[len(s) for s in send])  # splits count rows (dim 0)
        if not sg.is_last_stage:
            return []
        by_key = {plan.keys[i]: recv_buf[n] for n, i in enumerate(out_rows)}
        counts: dict[int, int] = {}
        for dp, j, r in plan.keys:
            if dp == sg.dp_rank:
                counts[j] = max(counts.get(j, 0), r + 1)
        return [torch.stack([by_key[(sg.dp_rank, j, r)] for r in range(counts[j])]) for j in range(len(counts))]

    # ------------------------------------------------------------------------------------------------ offload
    def _move(self, device: torch.device) -> None:
        """Teacher weights (and buffers) to `device`; host copies are pinned so the next upload is fast."""
        for t in list(self.teacher.model.parameters()) + list(self.teacher.model.buffers()):
            if t.device == device:
                continue
            if device.type == "cpu":
                t.data = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True).copy_(t.data)
            else:
                t.data = t.data.to(device, non_blocking=True)
        torch.cuda.synchronize()
        if device.type == "cpu":
            torch.cuda.empty_cache()
