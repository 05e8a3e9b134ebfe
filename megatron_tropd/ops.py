"""Vocabulary-parallel per-token ops: log-probs, entropy, top-k, full-vocabulary KL / JSD.

`logits` is the local shard `[..., v/tp]` of TP rank r (it owns global ids `[r*v/tp, (r+1)*v/tp)`, as
`GPTModel(parallel_output=True)` produces `[s, b, v/tp]`). `tp_group=None` means unsharded (no collectives).
`vocab_size` is the real vocabulary: ids >= vocab_size are padding, excluded from every softmax, entropy, top-k
and KL (they are a contiguous tail, so each shard simply works on its first `n_real` columns; their gradient is 0).
`temperature` divides the logits first: z = logits / T.

Communication is O(tokens) (max, sum-exp, per-token sums) or O(tokens * k) (top-k candidates, values at ids);
the vocabulary is never gathered. Work is done in chunks of tokens so float32 temporaries stay bounded
(`CHUNK_ELEMENTS` per temporary); backward recomputes softmax chunks from saved per-token statistics
(max / log-sum-exp), never from a saved softmax. The caller's logits are never modified in place.

Gradient convention (megatron-core's `vocab_parallel_cross_entropy`): every TP rank returns the same per-token
result; the gradient that reaches a rank's shard is d(result)/d(shard). The upstream gradient is identical on all
ranks, so backward needs no collective. Results are float32 for bf16/fp16/fp32 logits (float64 stays float64).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

# Elements of one float32 temporary per chunk (8 MiB). A chunk holds a few such temporaries at a time.
CHUNK_ELEMENTS = 1 << 21
MIN_CHUNK_ELEMENTS = 1 << 16

KL_KINDS = ("forward", "reverse", "jsd")


# ----------------------------------------------------------------------------------------------------------------
# Shared per-shard helpers
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Shard:
    """Where this rank's shard sits in the (padded) vocabulary."""

    group: dist.ProcessGroup | None
    world: int
    rank: int
    v_local: int  # columns of the local shard (padded)
    start: int  # global id of local column 0
    n_real: int  # local columns that are real vocabulary (a prefix of the shard)
    vocab_size: int
    cdtype: torch.dtype  # compute dtype: float64 for float64 inputs, else float32


def _shard_info(logits: torch.Tensor, tp_group, vocab_size: int | None, temperature: float, name="logits") -> _Shard:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() < 1:
        raise ValueError(f"{name} must be a floating-point tensor [..., v/tp]; got "
                         f"{type(logits).__name__} {getattr(logits, 'dtype', '')}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}")
    world = 1 if tp_group is None else dist.get_world_size(tp_group)
    rank = 0 if tp_group is None else dist.get_rank(tp_group)
    v_local = logits.shape[-1]
    padded = v_local * world
    if vocab_size is None:
        vocab_size = padded
    if not (1 <= vocab_size <= padded):
        raise ValueError(f"vocab_size={vocab_size} must be in [1, {padded}] (= {name}.shape[-1] {v_local} x TP size "
                         f"{world}); pass the real, unpadded vocabulary size")
    start = rank * v_local
    n_real = max(0, min(v_local, vocab_size - start))
    cdtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return _Shard(tp_group if world > 1 else None, world, rank, v_local, start, n_real, vocab_size, cdtype)


def _all_reduce(t: torch.Tensor, shard: _Shard, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if shard.group is not None:
        dist.all_reduce(t, op=op, group=shard.group)
    return t


def _chunks(n_rows: int, n_cols: int) -> Iterator[slice]:
    """Row slices whose [rows, n_cols] temporaries hold at most CHUNK_ELEMENTS elements each, and at most 1/32 of
    the whole [n_rows, n_cols] (above a 64k-element floor), so the few live temporaries stay well under 25% of
    the shard's float32 size at any size."""
    budget = min(CHUNK_ELEMENTS, max((n_rows * n_cols) // 32, MIN_CHUNK_ELEMENTS))
    step = max(1, budget // max(n_cols, 1))
    for i in range(0, n_rows, step):
        yield slice(i, min(i + step, n_rows))


def _logp(x2d: torch.Tensor, rows: slice, shard: _Shard, temperature: float, m: torch.Tensor,
          log_a: torch.Tensor) -> torch.Tensor:
    """log p = (x - m) / T - log A on the real columns of a row chunk, in the compute dtype (a new tensor).

    Centering the raw logits before dividing by T keeps log-probs accurate when logits are large (1e4 + noise).
    """
    z = x2d[rows, : shard.n_real].to(shard.cdtype) - m[rows].unsqueeze(-1)
    if temperature != 1.0:
        z.div_(temperature)
    return z.sub_(log_a[rows].unsqueeze(-1))


def _zero_nan(t: torch.Tensor) -> torch.Tensor:
    """0 * (-inf) -> 0: terms p * log p where the logit is -inf (p = 0)."""
    return torch.nan_to_num_(t, nan=0.0, posinf=math.inf, neginf=-math.inf)


def _finite_or_zero(t: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(t), t, 0.0)


def _local_stats(x2d: torch.Tensor, shard: _Shard, temperature: float, with_entropy: bool):
    """Per-token local raw max m_l, a_l = sum exp(z_c), b_l = sum exp(z_c) z_c with z_c = (x - m_l) / T."""
    n = x2d.shape[0]
    m = torch.full((n,), -math.inf, dtype=shard.cdtype, device=x2d.device)
    a = torch.zeros(n, dtype=shard.cdtype, device=x2d.device)
    b = torch.zeros(n, dtype=shard.cdtype, device=x2d.device) if with_entropy else None
    if shard.n_real == 0:
        return m, a, b
    for rows in _chunks(n, shard.n_real):
        xc = x2d[rows, : shard.n_real].to(shard.cdtype)
        m_c = xc.amax(dim=-1)
        zc = xc - _finite_or_zero(m_c).unsqueeze(-1)
        if temperature != 1.0:
            zc.div_(temperature)
        e = zc.exp()
        m[rows], a[rows] = m_c, e.sum(dim=-1)
        if with_entropy:
            b[rows] = _zero_nan(e.mul_(zc)).sum(dim=-1)
    return m, a, b


def _softmax_stats(xs: list[torch.Tensor], shard: _Shard, temperature: float, with_entropy: bool = False):
    """Global per-token (m, log A, entropy or None) for each [n, v/tp] input; 2 all-reduces of [len(xs), n].

    m is the global raw max, log p = (x - m) / T - log A. Local statistics are rescaled to m with
    c_l = exp((m_l - m) / T):  A = sum_l c_l a_l,  B = sum_l c_l (b_l + a_l (m_l - m) / T),  H = log A - B / A.
    """
    stats = [_local_stats(x, shard, temperature, with_entropy) for x in xs]
    m_loc = _finite_or_zero(torch.stack([s[0] for s in stats]))
    m = _finite_or_zero(_all_reduce(torch.stack([s[0] for s in stats]), shard, dist.ReduceOp.MAX))
    shift = (m_loc - m) / temperature
    c = shift.exp()
    a_loc = torch.stack([s[1] for s in stats])
    a = a_loc * c
    k = len(xs)
    if with_entropy:
        b = c * (torch.stack([s[2] for s in stats]) + a_loc * shift)
        ab = _all_reduce(torch.cat([a, b]), shard)
        a, b = ab[:k], ab[k:]
    else:
        a = _all_reduce(a, shard)
    log_a = a.log()
    ent = (log_a - b / a) if with_entropy else None
    return [(m[i], log_a[i], None if ent is None else ent[i]) for i in range(k)]


def _rows(t: torch.Tensor, v: int) -> torch.Tensor:
    return t.reshape(-1, v)


# ----------------------------------------------------------------------------------------------------------------
# Log-probs at given ids (token_logprobs is the k = 1 case)
# ----------------------------------------------------------------------------------------------------------------
class _LogprobsAt(torch.autograd.Function):
    """lp[n, j] = (x[n, ids[n, j]] - m[n]) / T - log A[n];  d lp[n, j] / d z[n, i] = 1[i = ids[n, j]] - p[n, i]."""

    @staticmethod
    def forward(ctx, logits, ids, shard: _Shard, temperature: float):
        x = _rows(logits, shard.v_local)
        idx = ids.reshape(x.shape[0], -1)
        (m, log_a, _), = _softmax_stats([x], shard, temperature)
        local = idx - shard.start
        owned = (local >= 0) & (local < shard.n_real)
        local = torch.where(owned, local, 0)
        # raw logit at each id: exact, since the sum over ranks adds only zeros to it
        x_at = _all_reduce(torch.where(owned, x.gather(1, local).to(shard.cdtype), 0.0), shard)
        ctx.shard, ctx.temperature = shard, temperature
        ctx.save_for_backward(logits, local, owned, m, log_a)
        return ((x_at - m.unsqueeze(-1)) / temperature - log_a.unsqueeze(-1)).view(ids.shape)

    @staticmethod
    def backward(ctx, grad_out):
        logits, local, owned, m, log_a = ctx.saved_tensors
        shard, t = ctx.shard, ctx.temperature
        x = _rows(logits, shard.v_local)
        g = grad_out.reshape(local.shape).to(shard.cdtype)
        g_sum, g_own = g.sum(dim=-1, keepdim=True), torch.where(owned, g, 0.0)
        grad = torch.zeros_like(x)
        if shard.n_real > 0:
            for rows in _chunks(x.shape[0], shard.n_real):
                gz = _logp(x, rows, shard, t, m, log_a).exp_().mul_(-g_sum[rows])
                gz.scatter_add_(1, local[rows], g_own[rows])
                grad[rows, : shard.n_real] = gz.div_(t) if t != 1.0 else gz
        return grad.view(logits.shape), None, None, None


def _check_ids(ids: torch.Tensor, shard: _Shard, what: str) -> None:
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{what} must be an integer tensor of global vocabulary ids; got dtype {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= shard.vocab_size):
        raise ValueError(f"{what} has ids outside the real vocabulary [0, {shard.vocab_size}) "
                         f"(min {int(ids.min())}, max {int(ids.max())}); check vocab_size and the tokenizer")


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, tp_group=None, *, temperature: float = 1.0,
                   vocab_size: int | None = None) -> torch.Tensor:
    """log softmax(z)[tokens] over the real vocabulary, z = logits / T.  [..., v/tp], [...] -> [...] (differentiable)."""
    shard = _shard_info(logits, tp_group, vocab_size, temperature)
    if tuple(tokens.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"tokens shape {tuple(tokens.shape)} must equal logits.shape[:-1] "
                         f"{tuple(logits.shape[:-1])} (logits are [..., v/tp], tokens [...])")
    _check_ids(tokens, shard, "tokens")
    return _LogprobsAt.apply(logits, tokens.long().unsqueeze(-1), shard, float(temperature)).squeeze(-1)


def logprobs_at(logits: torch.Tensor, ids: torch.Tensor, tp_group=None, *, temperature: float = 1.0,
                vocab_size: int | None = None) -> torch.Tensor:
    """log softmax(z)[..., ids] at arbitrary global ids.  [..., v/tp], [..., k] -> [..., k] (differentiable)."""
    shard = _shard_info(logits, tp_group, vocab_size, temperature)
    if ids.dim() != logits.dim() or tuple(ids.shape[:-1]) != tuple(logits.shape[:-1]):
        raise ValueError(f"ids shape {tuple(ids.shape)} must be logits.shape[:-1] + (k,) = "
                         f"{tuple(logits.shape[:-1])} + (k,)")
    _check_ids(ids, shard, "ids")
    return _LogprobsAt.apply(logits, ids.long(), shard, float(temperature))


# ----------------------------------------------------------------------------------------------------------------
# Entropy
# ----------------------------------------------------------------------------------------------------------------
class _Entropy(torch.autograd.Function):
    """H = -sum_i p_i log p_i;  dH / dz_i = -p_i (log p_i + H)."""

    @staticmethod
    def forward(ctx, logits, shard: _Shard, temperature: float):
        x = _rows(logits, shard.v_local)
        (m, log_a, ent), = _softmax_stats([x], shard, temperature, with_entropy=True)
        ctx.shard, ctx.temperature = shard, temperature
        ctx.save_for_backward(logits, m, log_a, ent)
        return ent.view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out):
        logits, m, log_a, ent = ctx.saved_tensors
        shard, t = ctx.shard, ctx.temperature
        x = _rows(logits, shard.v_local)
        g = grad_out.reshape(-1, 1).to(shard.cdtype)
        grad = torch.zeros_like(x)
        if shard.n_real > 0:
            for rows in _chunks(x.shape[0], shard.n_real):
                logp = _logp(x, rows, shard, t, m, log_a)
                gz = _zero_nan(logp.exp() * (logp + ent[rows].unsqueeze(-1))).mul_(-g[rows])
                grad[rows, : shard.n_real] = gz.div_(t) if t != 1.0 else gz
        return grad.view(logits.shape), None, None


def entropy(logits: torch.Tensor, tp_group=None, *, temperature: float = 1.0,
            vocab_size: int | None = None) -> torch.Tensor:
    """H = -sum_v p_v log p_v over the real vocabulary, p = softmax(logits / T).  [..., v/tp] -> [...]."""
    shard = _shard_info(logits, tp_group, vocab_size, temperature)
    return _Entropy.apply(logits, shard, float(temperature))


# ----------------------------------------------------------------------------------------------------------------
# Top-k
# ----------------------------------------------------------------------------------------------------------------
def _topk_lowest_ids(xc: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k columns of each row of xc [c, n] where, among values tied with the k-th largest, the lowest columns
    are taken (torch.topk picks arbitrary ones). Returns (values [c, k], columns [c, k]); order within the k is
    fixed later by the lexicographic sort in `topk_logprobs`.

    Ties at the boundary are common in bf16 (few distinct values), so they are resolved with one extra compare
    pass, and only the rows that need it take a second top-k over the tied columns' reversed index.
    """
    vals, col = torch.topk(xc, k, dim=-1, sorted=True)
    kth = vals[:, -1:]
    n_gt = (vals > kth).sum(-1, keepdim=True)  # sorted: positions [0, n_gt) are strictly above the k-th value
    eq = xc == kth
    ambiguous = (eq.sum(-1, keepdim=True) > k - n_gt).squeeze(-1).nonzero().squeeze(-1)
    if ambiguous.numel():
        n = xc.shape[-1]
        rev = torch.arange(n, 0, -1, dtype=torch.float32, device=xc.device)  # larger for lower columns
        key = torch.where(eq[ambiguous], rev, 0.0)
        tie_cols = n - torch.topk(key, k, dim=-1, sorted=True).values.long()  # lowest tied columns first
        pos = torch.arange(k, device=xc.device)
        g = n_gt[ambiguous]
        fixed = tie_cols.gather(1, (pos - g).clamp_min(0))
        col[ambiguous] = torch.where(pos >= g, fixed, col[ambiguous])
    return vals, col


def _local_topk(x2d: torch.Tensor, k: int, shard: _Shard):
    """Per-token top-k candidates of this shard: (raw logits [n, k] in the compute dtype, global ids [n, k]).

    Shards with fewer than k real columns pad with (-inf, id >= vocab_size), which sort after any real id.
    """
    n = x2d.shape[0]
    vals = torch.full((n, k), -math.inf, dtype=shard.cdtype, device=x2d.device)
    ids = torch.full((n, k), shard.vocab_size, dtype=torch.long, device=x2d.device)
    k_loc = min(k, shard.n_real)
    if k_loc == 0:
        return vals, ids
    for rows in _chunks(n, shard.n_real):
        v, col = _topk_lowest_ids(x2d[rows, : shard.n_real], k_loc)
        vals[rows, :k_loc], ids[rows, :k_loc] = v.to(shard.cdtype), col + shard.start
    return vals, ids


def topk_logprobs(logits: torch.Tensor, k: int, tp_group=None, *, temperature: float = 1.0,
                  vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Global top-k of log softmax(logits / T) over the real vocabulary: (values [..., k], global ids [..., k]).

    Sorted descending; ties (equal logits) are broken by the lowest global id first. Ordering uses the raw
    logits (exact, and monotone in the log-probs), so it never depends on rounding in the log-softmax. No grad.
    Communication: 2 all-reduces of [n] and one all-gather of [2, n, k] per rank.
    """
    shard = _shard_info(logits, tp_group, vocab_size, temperature)
    if not isinstance(k, int) or isinstance(k, bool) or not (1 <= k <= shard.vocab_size):
        raise ValueError(f"k={k!r} must be an int in [1, vocab_size={shard.vocab_size}]")
    with torch.no_grad():
        x = _rows(logits.detach(), shard.v_local)
        (m, log_a, _), = _softmax_stats([x], shard, float(temperature))
        vals, ids = _local_topk(x, k, shard)
        if shard.group is not None:
            # one all-gather of (value, id) pairs; float64 holds fp32 values and ids < 2**53 exactly
            pack = torch.stack([vals.double(), ids.double()])
            parts = [torch.empty_like(pack) for _ in range(shard.world)]
            dist.all_gather(parts, pack, group=shard.group)
            allp = torch.cat(parts, dim=-1)  # [2, n, world * k]
            vals, ids = allp[0].to(shard.cdtype), allp[1].long()
        # lexicographic (value desc, id asc): stable sort by id, then stable sort by value; keep k
        order = torch.sort(ids, dim=-1, stable=True).indices
        vals, ids = vals.gather(1, order), ids.gather(1, order)
        order = torch.sort(vals, dim=-1, descending=True, stable=True).indices[:, :k]
        vals, ids = vals.gather(1, order), ids.gather(1, order)
        out_shape = tuple(logits.shape[:-1]) + (k,)
        lp = (vals - m.unsqueeze(-1)) / temperature - log_a.unsqueeze(-1)
        return lp.view(out_shape), ids.view(out_shape)


# ----------------------------------------------------------------------------------------------------------------
# Full-vocabulary KL / JSD
# ----------------------------------------------------------------------------------------------------------------
def _kl_chunk(lps, lpt, kind: str, beta: float):
    """Per-token partial sums on one chunk. Returns (value, kl_s_m or None) and the log-probs used.

    forward: sum p_T (log p_T - log p_S);  reverse: sum p_S (log p_S - log p_T);
    jsd: beta * sum p_T (log p_T - log m) + (1 - beta) * sum p_S (log p_S - log m),  m = beta p_T + (1-beta) p_S.
    """
    if kind == "forward":
        return _zero_nan(lpt.exp() * (lpt - lps)).sum(-1), None
    if kind == "reverse":
        return _zero_nan(lps.exp() * (lps - lpt)).sum(-1), None
    lm = torch.logaddexp(lpt + math.log(beta), lps + math.log1p(-beta))
    kl_t = _zero_nan(lpt.exp() * (lpt - lm)).sum(-1)
    kl_s = _zero_nan(lps.exp() * (lps - lm)).sum(-1)
    return beta * kl_t + (1 - beta) * kl_s, kl_s


class _KL(torch.autograd.Function):
    """Gradients w.r.t. the student logits z (p = p_S, q = p_T, u_i = d value / d p_i up to a constant):
    forward: p - q;  reverse: p_i (log p_i - log q_i - KL);  jsd: (1 - beta) p_i (log p_i - log m_i - KL(p||m)).
    """

    @staticmethod
    def forward(ctx, s_logits, t_logits, shard: _Shard, temperature: float, kind: str, beta: float):
        xs, xt = _rows(s_logits, shard.v_local), _rows(t_logits, shard.v_local)
        n = xs.shape[0]
        (ms, la_s, _), (mt, la_t, _) = _softmax_stats([xs, xt], shard, temperature)
        sums = torch.zeros(2, n, dtype=shard.cdtype, device=xs.device)  # [value, KL(p_S || m)]
        if shard.n_real > 0:
            for rows in _chunks(n, shard.n_real):
                val, kl_s = _kl_chunk(_logp(xs, rows, shard, temperature, ms, la_s),
                                      _logp(xt, rows, shard, temperature, mt, la_t), kind, beta)
                sums[0, rows] = val
                if kl_s is not None:
                    sums[1, rows] = kl_s
        sums = _all_reduce(sums if kind == "jsd" else sums[:1].contiguous(), shard)
        ctx.shard, ctx.temperature, ctx.kind, ctx.beta = shard, temperature, kind, beta
        ctx.save_for_backward(s_logits, t_logits, ms, la_s, mt, la_t, sums[-1])
        return sums[0].view(s_logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out):
        s_logits, t_logits, ms, la_s, mt, la_t, kl = ctx.saved_tensors
        shard, t, kind, beta = ctx.shard, ctx.temperature, ctx.kind, ctx.beta
        xs, xt = _rows(s_logits, shard.v_local), _rows(t_logits, shard.v_local)
        g = grad_out.reshape(-1, 1).to(shard.cdtype)
        if kind == "jsd":
            g = g * (1 - beta)
        grad = torch.zeros_like(xs)
        if shard.n_real > 0:
            for rows in _chunks(xs.shape[0], shard.n_real):
                lps = _logp(xs, rows, shard, t, ms, la_s)
                lpt = _logp(xt, rows, shard, t, mt, la_t)
                if kind == "forward":
                    gz = lps.exp_().sub_(lpt.exp_())
                else:
                    ref = lpt if kind == "reverse" else torch.logaddexp(lpt + math.log(beta), lps + math.log1p(-beta))
                    gz = _zero_nan(lps.exp() * (lps - ref - kl[rows].unsqueeze(-1)))
                gz.mul_(g[rows])
                grad[rows, : shard.n_real] = gz.div_(t) if t != 1.0 else gz
        return grad.view(s_logits.shape), None, None, None, None, None


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tp_group=None, *,
                  kind: str = "forward", beta: float = 0.5, temperature: float = 1.0,
                  vocab_size: int | None = None) -> torch.Tensor:
    """Per-token full-vocabulary divergence between p_S = softmax(student/T) and p_T = softmax(teacher/T).

    kind="forward": KL(p_T || p_S);  "reverse": KL(p_S || p_T);  "jsd": beta KL(p_T || m) + (1-beta) KL(p_S || m),
    m = beta p_T + (1 - beta) p_S, 0 < beta < 1.  [..., v/tp] x2 -> [...]. Differentiable w.r.t. the student only
    (the teacher gets no gradient). Both must be sharded and padded alike.
    """
    shard = _shard_info(student_logits, tp_group, vocab_size, temperature, "student_logits")
    _shard_info(teacher_logits, tp_group, vocab_size, temperature, "teacher_logits")
    if tuple(student_logits.shape) != tuple(teacher_logits.shape):
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape (same tokens, same padded "
                         "vocabulary shard); re-pad the teacher's logits to the student's padded vocabulary")
    if kind not in KL_KINDS:
        raise ValueError(f"kind={kind!r} must be one of {KL_KINDS}")
    if kind == "jsd" and not (isinstance(beta, (int, float)) and 0.0 < beta < 1.0):
        raise ValueError(f"beta={beta!r} must be in (0, 1) for kind='jsd' (beta -> 0 or 1 makes JSD vanish; "
                         "use kind='forward' or 'reverse' instead)")
    return _KL.apply(student_logits, teacher_logits.detach(), shard, float(temperature), kind, float(beta))


__all__ = ["token_logprobs", "entropy", "topk_logprobs", "logprobs_at", "kl_divergence", "CHUNK_ELEMENTS"]
