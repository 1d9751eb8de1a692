"""Exact local search over 2:4 masks, with the per-row least-squares refit kept up to date.

For one layer in normalised coordinates (``Ŵ̃ = T``, ``H̃ = H`` with unit diagonal) and a 2:4
mask, every output row ``i`` is an independent problem: with support ``S`` (two kept inputs per
group of four) and ``b = T H``, the refit ``w_S = P b_S``, ``P = (H_SS + δI)^{-1}``, minimises

.. math:: L_i(S) = \\min_{w:\\, w_{S^c} = 0} (w - t_i) H (w - t_i)^T + δ \\|w\\|^2
          = t_i H t_i^T - b_S^T P b_S

(``δ``: 1e-4 of the unit diagonal, raised tenfold until ``λ_max(H) · max_i J_ii``, a lower
bound of the condition number of ``H + δI``, is at most ``0.025 / eps``, so that the fp32
inverses stay accurate; :func:`search_dampening`). This module changes the mask group by group
while the loss drops, and every change is scored *exactly*, including the refit of all other
kept weights of the row.

**One move.** In a group with kept ``K = {a1, a2}`` and pruned ``Q = {q1, q2}`` the five other
2:4 masks remove ``R ⊆ K`` and add ``A ⊆ Q`` (``|R| = |A| = 1``: four single swaps; ``2``: the
double swap). With the half gradient ``g = w (H + δI) - b`` (zero on ``S``), ``C = P H_{S,Q}``
and the Schur complement ``Σ = H_QQ + δI - H_{Q,S} C``, the exact loss change is

.. math:: Δ = w_R^T P_{RR}^{-1} w_R - g'^T Σ'^{-1} g', \\quad
          g' = g_A - C_{RA}^T P_{RR}^{-1} w_R, \\quad Σ' = Σ_{AA} + C_{RA}^T P_{RR}^{-1} C_{RA}

(removing ``R`` with the refit costs ``w_R^T P_RR^{-1} w_R``, the OBS formula; adding ``A`` to
the reduced support then gains ``g'^T Σ'^{-1} g'``). The same formula scores any set of moves in
different groups at once (``R``, ``A`` their unions); it equals ``v^T K^{-1} v`` for the
quasi-definite ``K = [[P_RR, C_RA], [C_RA^T, -Σ_AA]]`` and ``v = [w_R; g_A]``, so one unpivoted
``LDL^T`` of ``K`` with the moves in order gives the exact change of every prefix of them.

**One round, for all rows at once** (no loop over groups or rows):

1. *screen* every group with the formula above, exact in ``w``, ``g`` and ``P_KK``, with the
   two terms that need a row-specific ``k x k`` product replaced from the shared
   ``J = (H + δI)^{-1}``: ``Σ ≈ (J_QQ)^{-1}`` (the Schur complement given *all* other inputs,
   a lower bound) and ``C_KQ ≈ -J_KQ (J_QQ)^{-1}`` (both from the group's own 4 x 4 block of
   ``J``, so screening costs ``O(d)`` per row);
2. score the ``candidates`` best groups exactly: ``P H_{S,A}`` for their pruned inputs is one
   batched product (``k x 2·candidates`` per row);
3. order their best moves by exact ``Δ``, take up to ``swaps`` of them and keep the prefix with
   the lowest exact combined ``Δ`` (the ``LDL^T`` above; nothing if no prefix lowers the loss by
   more than ``tol`` of the row's explained ``b_S^T w_S``);
4. apply it: ``P`` gets the exact rank-``2|R|`` block update (remove ``R``:
   ``P - P_{:R} P_RR^{-1} P_{R:}``; add ``A`` in the freed slots with ``V = P_minus H_{S,A}``,
   ``Z = V - E_R``: ``+ Z Σ'^{-1} Z^T``), kept as two ``k x 4·swaps`` factors that are folded
   into ``P`` once they are ``k/2`` wide (a round never rewrites all of ``P``), and ``w_S``
   follows in ``O(k·swaps)``.

After the last round the ridge refit ``w_S = P b_S`` is checked by its residual: the rank
updates' rounding accumulates in ``P``, and on an ill-conditioned ``H̃`` a refit from the updated
``P`` can be far off, so rows whose residual ``|(H_SS + δI) w_S - b_S|`` exceeds ``refit_tol``
of ``|b_S|`` are factored afresh and solved exactly (on well-conditioned layers the residual
stays below ``refit_tol`` and no row is refit). Two steps ``w_S <- w_S - P g_S`` (``g`` on
the unridged ``H``; the error shrinks by ``δ (H_SS + δI)^{-1}``) then move it towards the
unridged refit. A final check compares every row's local loss with that of the start's weights
(one GEMM) and keeps the start where the search did not lower it, so no row is returned worse
than it came.
Rows are processed in chunks that bound the ``[rows, k, k]`` inverses (``max_chunk_bytes``); the
initial ``P`` of a chunk costs one batched Cholesky factorisation and inverse (``O(k^3)`` per
row, the bulk of the time), each round costs ``O(k^2 · candidates)`` per row.

The screen only ranks groups: every move taken is scored exactly, so a group the screen misses
costs quality, never correctness (``tools/bench_solver.py --recipes best`` measures the screen's
recall and the losses reached; docs/results.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops.gram import lipschitz
from ..ops.masks import apply_mask

__all__ = ["MaskSearchResult", "mask_search", "move_deltas", "search_dampening", "support_slots"]

#: The five other masks of a group, as (removed kept slots, added pruned slots) of the group's
#: two kept (``0, 1``) and two pruned (``0, 1``) inputs. A single swap lists its unused slots
#: second (inactive), so the slots of every move are distinct.
_REMOVE = ((0, 1), (0, 1), (1, 0), (1, 0), (0, 1))
_ADD = ((0, 1), (1, 0), (0, 1), (1, 0), (0, 1))
_DOUBLE = (False, False, False, False, True)


def support_slots(mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(S, Q)``, ``[rows, d/2]`` each: the kept and the pruned inputs of every row, two per group
    (group ``j`` owns slots ``2j, 2j+1`` of both), in increasing order within the group."""
    n, d = mask.shape
    g = mask.reshape(n, d // 4, 4)
    pos = torch.arange(4, device=mask.device).expand_as(g)
    order = torch.sort(torch.where(g, pos, pos + 4), dim=-1).indices
    idx = order + 4 * torch.arange(d // 4, device=mask.device)[None, :, None]
    return idx[..., :2].reshape(n, -1).contiguous(), idx[..., 2:].reshape(n, -1).contiguous()


def move_deltas(w: Tensor, g: Tensor, p: Tensor, c: Tensor, s: Tensor) -> Tensor:
    """Exact loss change of the five other masks of groups, ``[..., 5]`` (module docstring).

    Args:
        w: ``[..., 2]`` the refit kept weights ``w_K``.
        g: ``[..., 2]`` the half gradient at the pruned inputs ``g_Q``.
        p: ``[..., 2, 2]`` ``P_KK``.
        c: ``[..., 2, 2]`` ``C_KQ = (P H_{S,Q})_{K,Q}``.
        s: ``[..., 2, 2]`` ``Σ_QQ``.

    Moves ``0..3`` swap kept ``a = m // 2`` for pruned ``b = m % 2``; move 4 swaps both. The
    2 x 2 algebra is written out (no batched tiny matrix products).
    """
    tiny = torch.finfo(w.dtype).tiny
    p00, p01, p11 = p[..., 0, 0], p[..., 0, 1], p[..., 1, 1]
    s00, s01, s11 = s[..., 0, 0], s[..., 0, 1], s[..., 1, 1]
    c00, c01, c10, c11 = c[..., 0, 0], c[..., 0, 1], c[..., 1, 0], c[..., 1, 1]
    w0, w1, g0, g1 = w[..., 0], w[..., 1], g[..., 0], g[..., 1]
    out = []
    for wa, paa, ca0, ca1 in ((w0, p00, c00, c01), (w1, p11, c10, c11)):
        paa = paa.clamp_min(tiny)
        r = wa / paa
        for gb, sbb, cab in ((g0, s00, ca0), (g1, s11, ca1)):
            gp = gb - cab * r
            out.append(wa * r - gp * gp / (sbb + cab * cab / paa).clamp_min(tiny))
    det = (p00 * p11 - p01 * p01).clamp_min(tiny)
    u0, u1 = (p11 * w0 - p01 * w1) / det, (p00 * w1 - p01 * w0) / det  # P_KK^{-1} w
    gp0, gp1 = g0 - (c00 * u0 + c10 * u1), g1 - (c01 * u0 + c11 * u1)
    y00, y01 = (p11 * c00 - p01 * c10) / det, (p11 * c01 - p01 * c11) / det  # P_KK^{-1} C
    y10, y11 = (p00 * c10 - p01 * c00) / det, (p00 * c11 - p01 * c01) / det
    t00 = s00 + c00 * y00 + c10 * y10
    t01 = s01 + c00 * y01 + c10 * y11
    t11 = s11 + c01 * y01 + c11 * y11
    det2 = (t00 * t11 - t01 * t01).clamp_min(tiny)
    gain = (t11 * gp0 * gp0 - 2.0 * t01 * gp0 * gp1 + t00 * gp1 * gp1) / det2
    out.append(w0 * u0 + w1 * u1 - gain)
    return torch.stack(out, -1)


def _pair_blocks(m: Tensor) -> Tensor:
    """The diagonal 2 x 2 blocks of ``[n, 2c, 2c]``: ``[n, c, 2, 2]``."""
    n, c2, _ = m.shape
    return torch.diagonal(m.reshape(n, c2 // 2, 2, c2 // 2, 2), dim1=1, dim2=3).permute(0, 3, 1, 2)


def _take(m: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``m[i][rows[i]][:, cols[i]]`` for every batch entry ``i``: ``[n, |rows|, |cols|]``."""
    n, a, b = m.shape
    flat = (torch.arange(n, device=m.device) * (a * b))[:, None, None]
    return torch.take(m, flat + rows[:, :, None] * b + cols[:, None, :])


def _prefix_quadratic(k: Tensor, v: Tensor, blocks: int) -> Tensor:
    """``v_p^T K_p^{-1} v_p`` for the leading ``p`` blocks of ``K``, ``p = 1..blocks``: ``[n, blocks]``.

    Unpivoted ``LDL^T`` of the symmetric quasi-definite ``K`` ``[n, s, s]`` (exists for any order;
    padding rows are unit rows with ``v = 0``): ``v^T K^{-1} v = sum_j y_j^2 / d_j`` with ``y``
    the forward-eliminated ``v``, and the first terms only see the leading block.
    """
    k, v = k.clone(), v.clone()
    size = k.shape[-1]
    per = size // blocks
    acc = torch.zeros_like(v[:, 0])
    out = []
    for j in range(size):
        dj = k[:, j, j]
        dj = torch.where(dj.abs() > torch.finfo(dj.dtype).tiny, dj, torch.ones_like(dj))
        yj = v[:, j]
        acc = acc + yj * yj / dj
        if j + 1 < size:
            col = k[:, j + 1 :, j] / dj[:, None]
            k[:, j + 1 :, j + 1 :] -= col[:, :, None] * k[:, j, None, j + 1 :]
            v[:, j + 1 :] -= col * yj[:, None]
        if (j + 1) % per == 0:
            out.append(acc)
    return torch.stack(out, -1)


@torch.no_grad()
def _search_rows(
    b: Tensor,
    h: Tensor,
    j4: Tensor,
    mask: Tensor,
    *,
    rounds: int,
    swaps: int,
    candidates: int,
    dampening: float,
    tol: float,
    polish: int,
    refit_tol: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The search for one chunk of rows: ``(weight, mask, accepted moves, objective)``: the
    weight after ``polish`` steps from the final support's ridge refit towards the unridged
    one, and its per-row :func:`_row_objective` (``inf`` where that support did not factor)."""
    n, d = b.shape
    groups, k = d // 4, d // 2
    dev, dt = b.device, b.dtype
    s_idx, q_idx = support_slots(mask)
    chol, info = _factor_supports(h, s_idx, dampening)
    # P = (H_SS + δI)^{-1} = p0 + fl @ fr: the rank updates of the moves are kept as factors
    # (a few GEMVs wide) and folded into p0 only once they are as wide as p0 is half (so a
    # round never rewrites all of P: that pass would cost as much as the round).
    p0 = torch.cholesky_inverse(chol)
    del chol
    width = 4 * swaps
    fold_at = max(width, k // 2)
    fl_buf = torch.empty(n, k, fold_at, dtype=dt, device=dev)  # only [..., :used] is read
    frt_buf = torch.empty(n, k, fold_at, dtype=dt, device=dev)  # fr transposed
    used = 0  # P = p0 + fl_buf[..., :used] @ frt_buf[..., :used]^T

    def p_times(x: Tensor) -> Tensor:  # P x, x: [n, k, c]
        fl, frt = fl_buf[:, :, :used], frt_buf[:, :, :used]
        return torch.baddbmm(torch.bmm(p0, x), fl, torch.bmm(frt.transpose(1, 2), x))

    def p_rows(rows: Tensor) -> Tensor:  # P[rows, :]: [n, c, k]
        fl, frt = fl_buf[:, :, :used], frt_buf[:, :, :used]
        out = torch.gather(p0, 1, rows[:, :, None].expand(-1, -1, k))
        fl_r = torch.gather(fl, 1, rows[:, :, None].expand(-1, -1, used))
        return out.baddbmm_(fl_r, frt.transpose(1, 2))

    def p_take(rows: Tensor, cols: Tensor) -> Tensor:  # P[rows][:, cols]
        fl, frt = fl_buf[:, :, :used], frt_buf[:, :, :used]
        fl_r = torch.gather(fl, 1, rows[:, :, None].expand(-1, -1, used))
        frt_c = torch.gather(frt, 1, cols[:, :, None].expand(-1, -1, used))
        return _take(p0, rows, cols).baddbmm_(fl_r, frt_c.transpose(1, 2))

    # The 2 x 2 diagonal blocks of P (the screen reads them every round), kept up to date.
    p_kk = torch.diagonal(p0.view(n, groups, 2, groups, 2), dim1=1, dim2=3)
    p_kk = p_kk.permute(0, 3, 1, 2).contiguous()

    b_s = torch.gather(b, 1, s_idx)
    w_s = p_times(b_s[..., None])[..., 0]
    scale = tol * (torch.gather(b, 1, s_idx) * w_s).sum(-1).abs().clamp_min(torch.finfo(dt).tiny)
    remove = torch.tensor(_REMOVE, device=dev)
    add = torch.tensor(_ADD, device=dev)
    double = torch.tensor(_DOUBLE, device=dev)
    pair = torch.arange(2, device=dev)
    offsets = (16 * torch.arange(groups, device=dev))[None, :]
    rank = torch.arange(swaps, device=dev).repeat_interleave(2)[None, :]
    order4 = torch.stack(
        [
            torch.arange(2 * swaps, device=dev).view(swaps, 2),
            2 * swaps + torch.arange(2 * swaps, device=dev).view(swaps, 2),
        ],
        1,
    ).reshape(-1)  # interleave the moves: [R_1, A_1, R_2, A_2, ...]
    live_rows = info == 0  # a row whose H_SS did not factor keeps its mask
    moves = torch.zeros((), dtype=torch.int64, device=dev)
    for _ in range(rounds):
        w = torch.zeros(n, d, dtype=dt, device=dev).scatter_(1, s_idx, w_s)
        g_q = torch.gather(w @ h - b, 1, q_idx)  # the ridge term is zero off the support
        # 1. screen every group (J's own 4 x 4 blocks stand in for the k x k products).
        lq0, lq1 = q_idx[:, 0::2] % 4, q_idx[:, 1::2] % 4
        ls0, ls1 = s_idx[:, 0::2] % 4, s_idx[:, 1::2] % 4

        def jt(r: Tensor, c: Tensor) -> Tensor:
            return torch.take(j4, offsets + 4 * r + c)

        a00, a01, a11 = jt(lq0, lq0), jt(lq0, lq1), jt(lq1, lq1)
        det = a00 * a11 - a01 * a01
        sig = torch.stack([torch.stack([a11, -a01], -1), torch.stack([-a01, a00], -1)], -2)
        sig = sig / det[..., None, None]
        jkq = torch.stack(
            [
                torch.stack([jt(ls0, lq0), jt(ls0, lq1)], -1),
                torch.stack([jt(ls1, lq0), jt(ls1, lq1)], -1),
            ],
            -2,
        )
        c_approx = -(jkq[..., :, :, None] * sig[..., None, :, :]).sum(-2)
        screen = move_deltas(w_s.view(n, groups, 2), g_q.view(n, groups, 2), p_kk, c_approx, sig)
        cand = torch.topk(-screen.min(-1).values, candidates, dim=-1).indices
        # 2. exact scores of the candidates' moves.
        cs = (2 * cand[..., None] + pair).reshape(n, 2 * candidates)
        qc = torch.gather(q_idx, 1, cs)
        hq = h.index_select(0, qc.reshape(-1)).view(n, 2 * candidates, d)
        h_as = torch.gather(hq, 2, s_idx[:, None, :].expand(n, 2 * candidates, k))
        c_sa = p_times(h_as.transpose(1, 2))  # P H_{S,A}: [n, k, 2c]
        c_ka = torch.gather(c_sa, 1, cs[:, :, None].expand(-1, -1, 2 * candidates))
        s_aa = torch.gather(hq, 2, qc[:, None, :].expand(n, 2 * candidates, 2 * candidates))
        s_aa = s_aa - torch.bmm(h_as, c_sa)
        s_aa.diagonal(dim1=1, dim2=2).add_(dampening)
        p_cc = p_take(cs, cs)
        w_c = torch.gather(w_s, 1, cs)
        g_c = torch.gather(g_q, 1, cs)
        exact = move_deltas(
            w_c.view(n, candidates, 2),
            g_c.view(n, candidates, 2),
            _pair_blocks(p_cc),
            _pair_blocks(c_ka),
            _pair_blocks(s_aa),
        )
        best, move = exact.min(-1)
        gain, pick = torch.topk(-best, swaps, dim=-1)
        move = torch.gather(move, 1, pick)
        live = (gain > scale[:, None]) & live_rows[:, None]
        r_loc = (2 * pick[..., None] + remove[move]).reshape(n, 2 * swaps)
        a_loc = (2 * pick[..., None] + add[move]).reshape(n, 2 * swaps)
        act = torch.stack([live, live & double[move]], -1).reshape(n, 2 * swaps)
        # 3. the best prefix, exactly (quasi-definite LDL^T, moves interleaved).
        both = act[:, :, None] & act[:, None, :]
        pad = torch.diag_embed((~act).to(dt))
        p_rr = torch.where(both, _take(p_cc, r_loc, r_loc), 0.0) + pad
        c_ra = torch.where(both, _take(c_ka, r_loc, a_loc), 0.0)
        s_sel = torch.where(both, _take(s_aa, a_loc, a_loc), 0.0) + pad
        w_r = torch.where(act, torch.gather(w_c, 1, r_loc), 0.0)
        g_a = torch.where(act, torch.gather(g_c, 1, a_loc), 0.0)
        kkt = torch.cat(
            [torch.cat([p_rr, c_ra], 2), torch.cat([c_ra.transpose(1, 2), -s_sel], 2)], 1
        )
        kkt = kkt[:, order4][:, :, order4]
        prefix = _prefix_quadratic(kkt, torch.cat([w_r, g_a], 1)[:, order4], swaps)
        lowest, upto = prefix.min(-1)
        take = act & (rank <= upto[:, None]) & (lowest < -scale)[:, None]
        # 4. exact update of P and w_S for the accepted moves (padding: identity blocks). The
        # small factors first: a row whose P_RR or Σ' does not factor (rounding) moves nothing.
        both = take[:, :, None] & take[:, None, :]
        pad = torch.diag_embed((~take).to(dt))
        eye = torch.eye(2 * swaps, dtype=dt, device=dev)
        l_rr, bad_r = torch.linalg.cholesky_ex(torch.where(both, p_rr, 0.0) + pad)
        p_rr_inv = torch.cholesky_inverse(l_rr)  # small: [n, 2 swaps, 2 swaps]
        c_ra = torch.where(both, c_ra, 0.0)
        y = torch.bmm(p_rr_inv, c_ra)  # P_RR^{-1} C_RA
        schur = torch.where(both, s_sel, 0.0) + pad + torch.bmm(c_ra.transpose(1, 2), y)
        l_s, bad_s = torch.linalg.cholesky_ex(schur)
        s_inv = torch.cholesky_inverse(l_s)
        ok = (bad_r == 0) & (bad_s == 0) & torch.isfinite(p_rr_inv).all((1, 2))
        ok = ok & torch.isfinite(s_inv).all((1, 2))
        take = take & ok[:, None]
        p_rr_inv = torch.where(ok[:, None, None], p_rr_inv, eye)
        s_inv = torch.where(ok[:, None, None], s_inv, eye)
        y = torch.where(ok[:, None, None], y, 0.0)
        tm = take.to(dt)
        r_slot = torch.gather(cs, 1, r_loc)
        a_slot = torch.gather(cs, 1, a_loc)
        p_rs = p_rows(r_slot) * tm[:, :, None]
        x = torch.bmm(p_rr_inv, p_rs)  # P_RR^{-1} P_{R,:}
        v = torch.gather(c_sa, 2, a_loc[:, None, :].expand(-1, k, -1))
        v = (v - torch.bmm(p_rs.transpose(1, 2), y)) * tm[:, None, :]  # P_minus H_{S,A}
        z = v.scatter_add(1, r_slot[:, None, :], -tm[:, None, :])
        zs = torch.bmm(z, s_inv)  # Z Σ'^{-1}
        left = torch.cat([p_rs.transpose(1, 2), zs], 2)
        right = torch.cat([-x, z.transpose(1, 2)], 1)
        kept = torch.gather(s_idx, 1, r_slot)
        added = torch.gather(q_idx, 1, a_slot)
        s_new = s_idx.scatter(1, r_slot, torch.where(take, added, kept))
        q_idx = q_idx.scatter(1, a_slot, torch.where(take, kept, added))
        b_new = torch.gather(b, 1, s_new)
        # w' = P' b' = P b + P (b' - b) + left (right b'), with P (b' - b) = P_{:,R} Δb_R.
        db = torch.gather(b_new - b_s, 1, r_slot) * tm
        w_s = (
            w_s
            + (
                torch.bmm(p_rs.transpose(1, 2), db[..., None])
                + torch.bmm(left, torch.bmm(right, b_new[..., None]))
            )[..., 0]
        )
        right_t = right.transpose(1, 2)
        for a_ in range(2):
            for b_ in range(2):
                p_kk[..., a_, b_] += (left[:, a_::2] * right_t[:, b_::2]).sum(-1)
        if used + width > fold_at:
            p0.baddbmm_(fl_buf[:, :, :used], frt_buf[:, :, :used].transpose(1, 2))
            used = 0
        fl_buf[:, :, used : used + width] = left
        frt_buf[:, :, used : used + width] = right_t
        used += width
        moves = moves + (take[:, 0::2]).sum()
        s_idx, b_s = s_new, b_new
        if dev.type == "cpu" and not bool(take.any()):
            break  # later rounds would change nothing (on CPU this read is free)
    # The ridge refit of the final support. The rank updates steer the moves well, but their
    # rounding accumulates in P: on an ill-conditioned H̃ the refit from the updated P, and
    # steps preconditioned by it, can be far off the exact refit's loss. Rows whose ridge
    # residual shows it are factored afresh (once per chunk, not per round).
    w_s = p_times(b_s[..., None])[..., 0]
    weight = torch.zeros(n, d, dtype=dt, device=dev).scatter_(1, s_idx, w_s)
    resid = torch.gather(weight @ h - b, 1, s_idx) + dampening * w_s
    drift = resid.norm(dim=-1) > refit_tol * b_s.norm(dim=-1)
    redo = torch.nonzero(drift).flatten()  # one host read per chunk
    factored = torch.ones(n, dtype=torch.bool, device=dev)
    chol = None
    if redo.numel() > 0:
        chol, info = _factor_supports(h, s_idx[redo], dampening)
        w_s[redo] = torch.cholesky_solve(b_s[redo][..., None], chol)[..., 0]
        factored[redo] = info == 0
        weight = torch.zeros_like(weight).scatter_(1, s_idx, w_s)
    # Towards the unridged refit: w_S <- w_S - P g_S, g = w H - b. The error is multiplied by
    # δ (H_SS + δI)^{-1} (eigenvalue-wise δ / (λ + δ) < 1), so the loss on H̃ only drops.
    for _ in range(polish):
        g_s = torch.gather(weight @ h - b, 1, s_idx)
        step = p_times(g_s[..., None])[..., 0]
        if chol is not None:
            step[redo] = torch.cholesky_solve(g_s[redo][..., None], chol)[..., 0]
        w_s = w_s - step
        weight = torch.zeros_like(weight).scatter_(1, s_idx, w_s)
    objective = _row_objective(weight, h, b)
    objective = torch.where(factored, objective, torch.inf)  # not factored: keep the start
    new_mask = torch.zeros(n, d, dtype=torch.bool, device=dev).scatter_(1, s_idx, True)
    return weight, new_mask, moves, objective


def _factor_supports(h: Tensor, s_idx: Tensor, dampening: float) -> tuple[Tensor, Tensor]:
    """Batched Cholesky of every row's ``H_SS + δI`` (``[n, k, k]``) and its ``info``."""
    hss = h[s_idx[:, :, None], s_idx[:, None, :]]
    hss.diagonal(dim1=1, dim2=2).add_(dampening)
    return torch.linalg.cholesky_ex(hss)


def _row_objective(w: Tensor, h: Tensor, b: Tensor) -> Tensor:
    """``w H w^T - 2 w b^T`` for every row: the row's local loss minus the constant ``t H t^T``."""
    return ((w @ h) * w).sum(-1) - 2.0 * (w * b).sum(-1)


@dataclass
class MaskSearchResult:
    """What :func:`mask_search` returns.

    Attributes:
        weight: ``[d_out, d_in]`` 2:4 weight, pruned entries ``+0.0`` (dtype of the target).
        mask: its exactly 2:4 mask.
        dampening: the ridge ``δ`` used (``dampening``, raised tenfold until the conditioning
            test passed).
        moves: group moves accepted over all rows and rounds (0-dim tensor).
        rows_kept: rows returned as given because the search did not lower their loss (0-dim).
    """

    weight: Tensor
    mask: Tensor
    dampening: float
    moves: Tensor
    rows_kept: Tensor


def search_dampening(h: Tensor, dampening: float, max_condition: float) -> tuple[float, Tensor]:
    """``(δ, J)``: the first ``δ = dampening · 10^j`` with ``λ_max(H) · max_i J_ii <= max_condition``
    for ``J = (H + δI)^{-1}`` (fp64), and that ``J`` (in the dtype of ``h``).

    ``λ_max · max_i J_ii`` is a lower bound of the condition number of ``H + δI`` within a small
    factor on real Grams (``J_ii <= 1/λ_min``); fp32 inverses of ``H_SS`` stay accurate to about
    ``max_condition · eps``. ``λ_max`` by power iteration.
    """
    d = h.shape[0]
    h64 = h.to(torch.float64)
    lam_max = lipschitz(h64, safety=1.0)
    eye = torch.eye(d, dtype=torch.float64, device=h.device)
    delta = float(dampening)
    for _ in range(8):
        j = torch.cholesky_inverse(torch.linalg.cholesky(h64 + delta * eye))
        if lam_max * float(j.diagonal().max()) <= max_condition:
            break
        delta *= 10.0
    return delta, j.to(h.dtype)


@torch.no_grad()
def mask_search(
    target: Tensor,
    gram: Tensor,
    weight: Tensor,
    mask: Tensor,
    *,
    rounds: int,
    swaps: int = 16,
    candidates: int = 16,
    dampening: float = 1e-4,
    max_condition: float | None = None,
    tol: float = 1e-7,
    polish: int = 2,
    refit_tol: float = 1e-4,
    max_chunk_bytes: int = 1 << 27,
) -> MaskSearchResult:
    """Improve a 2:4 mask by exact local moves (module docstring).

    Args:
        target: ``[d_out, d_in]`` dense normalised weight ``Ŵ̃`` (fp32 or fp64: the dtype of the
            search).
        gram: ``[d_in, d_in]`` normalised Gram ``H̃`` (unit diagonal).
        weight: the start's 2:4 weight on ``mask`` (kept for rows the search cannot improve).
        mask: the start's exactly 2:4 mask (bool, ``True`` = kept).
        rounds: rounds of moves (0 returns the start unchanged).
        swaps: at most this many moves per row and round.
        candidates: groups per row scored exactly each round (``>= swaps``; the other groups
            only by the screen).
        dampening: the smallest ridge ``δ`` on the unit diagonal (:func:`search_dampening`).
        max_condition: conditioning limit of ``H + δI`` (``None``: ``0.025 / eps``, 2.1e5 in
            fp32, where the fp32 search still agrees with an fp64 one on the real Grams).
        tol: a move set must lower the row's loss by more than ``tol · b_S^T w_S``.
        polish: steps ``w_S <- w_S - P g_S`` from the ridge refit towards the unridged one
            (each multiplies the error by ``δ (H_SS + δI)^{-1}``).
        refit_tol: a row whose ridge residual after the rounds exceeds this fraction of
            ``|b_S|`` (the updated inverse has drifted) is refit from a fresh factorisation.
        max_chunk_bytes: rows are searched in chunks whose ``[rows, k, k]`` inverse and
            workspace fit this.

    Returns:
        :class:`MaskSearchResult`: per row the start, or the searched mask with its refit
        (``w_S = (H_SS + δI)^{-1} b_S``, then ``polish`` steps)
        where that refit's local loss is below the start's: no row is returned worse than its
        start, whatever fp32 rounding did during the search.
    """
    n, d = target.shape
    dt = target.dtype
    zero = torch.zeros((), dtype=torch.int64, device=target.device)
    if rounds <= 0 or n == 0:
        return MaskSearchResult(apply_mask(weight.to(dt), mask), mask, 0.0, zero, zero)
    groups, k = d // 4, d // 2
    candidates = max(1, min(int(candidates), groups))
    swaps = max(1, min(int(swaps), candidates))
    if max_condition is None:
        max_condition = 0.025 / torch.finfo(dt).eps
    h = gram.to(dt)
    delta, j = search_dampening(h, dampening, max_condition)
    blocks = torch.arange(d, device=h.device).view(groups, 4)
    j4 = j[blocks[:, :, None], blocks[:, None, :]].contiguous()  # J's own 4 x 4 group blocks
    del j
    b = target @ h
    per_row = (2 * k * k + 2 * k * max(4 * swaps, k // 2)) * target.element_size()
    rows = max(1, min(n, max_chunk_bytes // per_row))
    out_w, out_m, objective, moves = [], [], [], zero
    for i in range(0, n, rows):
        w_i, m_i, moved, obj_i = _search_rows(
            b[i : i + rows].contiguous(),
            h,
            j4,
            mask[i : i + rows],
            rounds=rounds,
            swaps=swaps,
            candidates=candidates,
            dampening=delta,
            tol=tol,
            polish=polish,
            refit_tol=refit_tol,
        )
        objective.append(obj_i)
        out_w.append(w_i)
        out_m.append(m_i)
        moves = moves + moved
    new_w, new_m = torch.cat(out_w), torch.cat(out_m)
    start = apply_mask(weight.to(dt), mask)
    better = torch.cat(objective) < _row_objective(start, h, b)
    new_w = torch.where(better[:, None], new_w, start)
    new_m = torch.where(better[:, None], new_m, mask)
    return MaskSearchResult(
        weight=apply_mask(new_w, new_m),
        mask=new_m,
        dampening=delta,
        moves=moves,
        rows_kept=(~better).sum(),
    )
