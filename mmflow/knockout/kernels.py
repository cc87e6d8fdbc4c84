"""Attention kernels of the fast engine: exact pieces merged by their log-sum-exp.

Each row's queries attend to its own suffix keys (causal, with blocked pairs at -inf before the
softmax) and, folded into the query dimension, to the clean prefix shared by every row; `merge`
combines the two softmaxes exactly. Scores and log-sum-exps are float32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mmflow.knockout.rows import LayerBlocks


def cat(tensors: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def attend_suffix(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: torch.Tensor,
    blocked: LayerBlocks,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's queries q [R, H, Sq, d] (the last Sq suffix positions) over its own suffix keys.

    k, v [R, Hkv, S, d]; causal [S, S] additive. Returns (out [R, H, Sq, d], lse [R, H, Sq]). With
    blocked pairs, chunked over rows so each materialised [r, 1, Sq, S] mask stays within MASK_BUDGET.
    """
    n_rows, heads, n_q, _ = q.shape
    length = k.shape[2]
    k, v = repeat_heads(k, heads), repeat_heads(v, heads)
    causal = causal[-n_q:]
    if not blocked.blocks_suffix:
        mask = None if n_q == 1 else causal.expand(n_rows, 1, n_q, length)  # the last query sees all
        return attention_lse(q, k, v, mask, scale)
    step = max(1, MASK_BUDGET // (n_q * length))
    pieces = []
    for i in range(0, n_rows, step):
        rows = slice(i, i + step)
        cut = blocked.suffix(rows, n_q)  # [r, Hm, Sq, S]
        mask = causal.masked_fill(cut, float("-inf"))  # [r, Hm, Sq, S]
        empty = (cut | (causal != 0)).all(-1)  # [r, Hm, Sq]: a target blocked from every key it could see
        pieces.append(attention_lse(q[rows], k[rows], v[rows], mask, scale, empty))
    return cat([out for out, _ in pieces]), cat([lse for _, lse in pieces])


def attend_prefix(
    q: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    restricted: list[tuple[torch.Tensor, torch.Tensor]],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All rows' queries q [R, H, Sq, d] over the shared clean prefix k, v [Hkv, P, d], not copied per row.

    Rows are folded into the query dimension (per KV head R*G*Sq queries, so no GQA repeat either).
    Queries in `restricted` (bool [R, Sq], additive mask [P] or None: all blocked) are redone with
    their edge set's mask. Returns (out [R, H, Sq, d], lse [R, H, Sq]).
    """
    n_rows, heads, n_q, d = q.shape
    kv_heads = k_prefix.shape[0]
    groups = heads // kv_heads
    folded = q.view(n_rows, kv_heads, groups, n_q, d).transpose(0, 1)  # [Hkv, R, G, Sq, d]
    out, lse = attention_lse(folded.reshape(1, kv_heads, -1, d), k_prefix[None], v_prefix[None], None, scale)
    out, lse = out.view(folded.shape), lse.view(folded.shape[:-1])
    for chosen, prefix_mask in restricted:
        if chosen.dim() == 3:  # per-head jobs: each KV head's queries over its own keys
            per_kv = chosen.view(n_rows, kv_heads, groups, n_q).transpose(0, 1)  # [Hkv, R, G, Sq]
            for h in (h for h in range(kv_heads) if per_kv[h].any()):
                _restrict(out[h], lse[h], folded[h], per_kv[h], k_prefix[h], v_prefix[h], prefix_mask, scale)
            continue
        chosen = chosen[:, None].expand(n_rows, groups, n_q)
        if prefix_mask is None:  # every prefix key is a source
            out[:, chosen], lse[:, chosen] = 0.0, float("-inf")
            continue
        queries = folded[:, chosen][None]  # [1, Hkv, N, d]
        mask = prefix_mask.expand(1, 1, queries.shape[2], -1)
        o, s = attention_lse(queries, k_prefix[None], v_prefix[None], mask, scale)
        out[:, chosen], lse[:, chosen] = o[0], s[0]
    return out.transpose(0, 1).reshape(n_rows, heads, n_q, d), lse.transpose(0, 1).reshape(n_rows, heads, n_q)


def _restrict(out, lse, queries, chosen, k_prefix, v_prefix, prefix_mask, scale) -> None:
    """Redo the `chosen` [R, G, Sq] queries [R, G, Sq, d] of one KV head over its prefix keys [P, d]
    under `prefix_mask` [P] (None: every prefix key blocked), in place in out / lse of that head."""
    if prefix_mask is None:
        out[chosen], lse[chosen] = 0.0, float("-inf")
        return
    picked = queries[chosen][None, None]  # [1, 1, N, d]
    mask = prefix_mask.expand(1, 1, picked.shape[2], -1)
    o, s = attention_lse(picked, k_prefix[None, None], v_prefix[None, None], mask, scale)
    out[chosen], lse[chosen] = o[0, 0], s[0, 0]


# Elements of one materialised [rows, 1, Sq, S] suffix mask: bounds memory when the suffix is long.
MASK_BUDGET = 1 << 22
# Elements of one float32 score chunk when no fused attention kernel applies (non-CPU devices).
SCORE_BUDGET = 1 << 26
FLASH_DTYPES = frozenset({torch.float32, torch.float64, torch.bfloat16, torch.float16})


def attention_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    empty: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale + mask) v and its log-sum-exp (float32).

    q [B, H, N, d], k, v [B, H, M, d] with M > 0, mask [B, 1, N, M] additive or None. Queries flagged
    in `empty` [B, 1 or H, N] (every key masked) get out 0 and lse -inf. Uses torch's fused CPU flash kernel
    where it applies.
    """
    if q.device.type == "cpu" and q.dtype in FLASH_DTYPES:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, attn_mask=mask, scale=scale
        )
    else:
        out, lse = _attention_explicit(q, k, v, mask, scale)
    if empty is not None and empty.any():
        lse = lse.masked_fill(empty, float("-inf"))
        out = out.masked_fill(empty[..., None], 0.0)
    return out, lse.float()


def _attention_explicit(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_lse` with materialised float32 scores, chunked over queries to stay within SCORE_BUDGET."""
    batch, heads, n_queries, _ = q.shape
    step = max(1, SCORE_BUDGET // (batch * heads * k.shape[2]))
    outs, lses = [], []
    for i in range(0, n_queries, step):
        scores = (q[:, :, i : i + step] @ k.transpose(-1, -2)).float() * scale  # [B, H, n, M]
        if mask is not None:
            scores = scores + mask[:, :, i : i + step]
        lse = scores.logsumexp(-1)
        outs.append((scores - lse[..., None]).exp().nan_to_num_(0.0).to(v.dtype) @ v)
        lses.append(lse)
    return cat(outs, dim=2), cat(lses, dim=2)


def merge(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Attention output over the union of two disjoint key sets, from each one's (out [..., d], lse [...]).

    The share of set `a` is exp(lse_a) / (exp(lse_a) + exp(lse_b)) = sigmoid(lse_a - lse_b).
    """
    (out_a, lse_a), (out_b, lse_b) = a, b
    share = torch.sigmoid(lse_a - lse_b)[..., None]
    return torch.lerp(out_b.float(), out_a.float(), share).to(out_a.dtype)


def repeat_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[R, Hkv, S, d] -> [R, H, S, d], each KV head repeated for its query group (Llama's repeat_kv)."""
    n_rows, kv_heads, length, d = x.shape
    if kv_heads == heads:
        return x
    return (
        x[:, :, None].expand(n_rows, kv_heads, heads // kv_heads, length, d).reshape(n_rows, heads, length, d)
    )
