"""The :class:`Prox24` optimizer on its own (no Lightning): schedule, phases, cost, state, errors."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from prox24_lightning.ops import (
    apply_mask,
    frac_groups_2of4,
    group_view,
    is_2of4,
    lipschitz,
    normalize,
    prox_2of4,
)
from prox24_lightning.optim import LocalProblem, Prox24

pytestmark = pytest.mark.usefixtures("one_thread")


def make_problem(
    seed: int = 0, d_in: int = 64, d_out: int = 16
) -> tuple[torch.Tensor, LocalProblem]:
    """A correlated, heavy-tailed layer in normalised coordinates: ``(Ŵ̃, problem)``."""
    g = torch.Generator().manual_seed(seed)
    n, k = 4 * d_in, d_in // 4
    x = torch.randn(n, k, generator=g) @ (torch.randn(k, d_in, generator=g) / math.sqrt(k))
    x = (x + 0.3 * torch.randn(n, d_in, generator=g)) * torch.exp(torch.randn(d_in, generator=g))
    x[:, :2] *= 20.0  # a couple of outlier features
    w = torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in)
    norm = normalize(x.T @ x)
    target = norm.to_normalized(w)
    return target, LocalProblem(gram=norm.gram, target=target, lipschitz=lipschitz(norm.gram))


def run_to_end(opt: Prox24, p: torch.Tensor, problem: LocalProblem, max_steps: int = 10000) -> int:
    steps = 0
    while opt.phase(p) != "done":
        opt.step(problems=problem)
        steps += 1
        assert steps < max_steps
    return steps


# --------------------------------------------------------------------------------------------
# closure, autocast, state_dict
# --------------------------------------------------------------------------------------------


def test_step_calls_closure_once_and_returns_its_value():
    target, problem = make_problem()
    p = target.clone()
    opt = Prox24([p], refine_steps=3)
    calls = []
    sentinel = object()

    def closure():
        calls.append(torch.is_grad_enabled())
        return sentinel

    for i in range(5):
        assert opt.step(closure, problems=problem) is sentinel
        assert len(calls) == i + 1
    assert all(calls), "the closure runs with gradients enabled (Lightning backward inside)"
    assert opt.step(problems=problem) is None
    # The closure is still called once per step after the solve is finished.
    opt2 = Prox24([target.clone()], refine_steps=0)
    p2 = opt2.param_groups[0]["params"][0]
    run_to_end(opt2, p2, problem)
    n = len(calls)
    assert opt2.step(closure, problems=problem) is sentinel and len(calls) == n + 1


@pytest.mark.parametrize(
    "kwargs",
    [dict(refine="gd"), dict(refine="cg"), dict(refine="cg", momentum=0.9)],
    ids=["gd", "cg", "cg-momentum"],
)
def test_step_under_bf16_autocast_is_identical_to_fp32(kwargs):
    target, problem = make_problem(1)
    results = []
    for autocast in (False, True):
        p = target.clone()
        prob = LocalProblem(gram=problem.gram, target=problem.target, lipschitz=problem.lipschitz)
        opt = Prox24([p], refine_steps=30, **kwargs)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            run_to_end(opt, p, prob)
        assert p.dtype == torch.float32
        results.append((p.clone(), prob.mask.clone(), dict(opt.state[p])))
    (pa, ma, sa), (pb, mb, sb) = results
    assert torch.equal(pa, pb) and torch.equal(ma, mb)
    assert sa == sb


def test_local_problem_is_fp32_under_autocast():
    """Built and evaluated under bf16 autocast, the problem still does fp32 GEMMs."""
    target, ref = make_problem(2)
    w = apply_mask(
        target, group_view(target).abs().argsort(-1).argsort(-1).reshape(target.shape) >= 2
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        prob = LocalProblem(gram=ref.gram, target=ref.target, lipschitz=ref.lipschitz)
        grad = prob.gradient(w)
        loss = prob.loss(w)
    assert prob.target_gram.dtype == torch.float32 and grad.dtype == torch.float32
    assert torch.equal(prob.target_gram, ref.target_gram)
    assert torch.equal(grad, ref.gradient(w))
    assert loss == ref.loss(w)


def test_state_dict_holds_only_small_scalars():
    target, problem = make_problem(3, d_in=128, d_out=32)
    p = target.clone()
    opt = Prox24([{"params": [p], "name": "layer"}], refine_steps=20, momentum=0.9, refine="cg")
    run_to_end(opt, p, problem)
    sd = opt.state_dict()

    def check(value):
        if isinstance(value, torch.Tensor):
            assert value.numel() <= 4
        elif isinstance(value, dict):
            for v in value.values():
                check(v)
        elif isinstance(value, list | tuple):
            for v in value:
                check(v)
        else:
            assert value is None or isinstance(value, bool | int | float | str)

    check(sd)
    state = sd["state"][0]
    assert state["phase"] == "done" and state["refine_done"] == 20 and state["prox_steps"] > 0
    buf = io.BytesIO()
    torch.save(sd, buf)
    assert buf.tell() < 4096 < target.numel() * 4  # far smaller than one weight matrix
    # The state round-trips into a fresh optimizer (through torch.save / weights-only load).
    buf.seek(0)
    q = target.clone()
    opt2 = Prox24([{"params": [q], "name": "layer"}], refine_steps=20, momentum=0.9, refine="cg")
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.phase(q) == "done" and opt2.state[q] == opt.state[p]


@pytest.mark.parametrize("stop_after", [10, 10**6])
def test_resume_from_state_dict_continues_identically(stop_after):
    """A solve interrupted (prox phase or refine phase) and resumed from ``state_dict`` gives the
    same weights as an uninterrupted one (plain prox: no hidden state besides the mask)."""
    target, problem = make_problem(13)
    ref = target.clone()
    run_to_end(Prox24([ref], refine_steps=10), ref, problem)

    prob = LocalProblem(gram=problem.gram, target=problem.target, lipschitz=problem.lipschitz)
    p = target.clone()
    opt = Prox24([p], refine_steps=10)
    steps = 0
    while opt.phase(p) == "prox" and steps < stop_after:
        opt.step(problems=prob)
        steps += 1
    sd = opt.state_dict()
    q = p.clone()
    resumed = Prox24([q], refine_steps=10)
    resumed.load_state_dict(sd)
    assert resumed.state[q] == opt.state[p]
    assert resumed.phase(q) in ("prox", "refine")
    run_to_end(resumed, q, prob)  # the mask lives in the problem, which the caller keeps
    assert torch.equal(q, ref)


# --------------------------------------------------------------------------------------------
# cost: one GEMM per iteration
# --------------------------------------------------------------------------------------------

_GEMMS = {"matmul", "__matmul__", "__rmatmul__", "mm", "addmm", "addmm_", "bmm", "linear", "einsum"}


class CountGemms(TorchFunctionMode):
    """Counts the matrix products called through the torch API (nested calls are not seen)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in _GEMMS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _gemms_of_step(opt: Prox24, problem: LocalProblem) -> int:
    with CountGemms() as counter:
        opt.step(problems=problem)
    return counter.count


def test_counter_sees_matmul_operator():
    a = torch.randn(3, 3)
    with CountGemms() as c:
        _ = a @ a
        _ = torch.mm(a, a)
        _ = a + a
    assert c.count == 2


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("refine", ["gd", "cg"])
def test_one_gemm_per_iteration(refine, momentum):
    target, problem = make_problem(4)
    p = target.clone()
    opt = Prox24([p], refine_steps=15, refine=refine, momentum=momentum)
    prox_counts, refine_counts = [], []
    while opt.phase(p) != "done":
        phase = opt.phase(p)
        (prox_counts if phase == "prox" else refine_counts).append(_gemms_of_step(opt, problem))
    assert len(prox_counts) == opt.state[p]["prox_steps"] > 10
    assert prox_counts == [1] * len(prox_counts)
    assert len(refine_counts) == 15
    if refine == "gd":
        assert refine_counts == [1] * 15
    else:
        # CG's initial residual needs W H̃ once more on its first step; every later step is one.
        assert refine_counts == [2] + [1] * 14
    # A finished optimizer does no work.
    assert _gemms_of_step(opt, problem) == 0


# --------------------------------------------------------------------------------------------
# schedule and phases
# --------------------------------------------------------------------------------------------


def test_lambda_schedule_and_iterates_follow_algorithm_2():
    lambda0, beta = 0.02, 1.05
    target, problem = make_problem(5)
    p = target.clone()
    opt = Prox24([p], lambda0=lambda0, beta=beta, refine_steps=0)
    w = target.clone()
    inv_l = 1.0 / problem.lipschitz
    for k in range(12):
        assert opt.phase(p) == "prox"
        opt.step(problems=problem)
        st = opt.state[p]
        assert st["prox_steps"] == k + 1
        # The k-th iteration (from 0) uses lambda_k = lambda0 * beta^k.
        assert st["lam"] == pytest.approx(lambda0 * beta**k, rel=1e-12)
        # Independent replay of W <- prox_{(lambda_k / L) r}(W - (W - Ŵ̃) H̃ / L).
        w = prox_2of4(w - inv_l * ((w - target) @ problem.gram), lambda0 * beta**k * inv_l)
        if opt.phase(p) == "prox":
            # (the replay's gradient rounds differently: compare to fp32 precision of max |W|)
            assert torch.allclose(p, w, rtol=1e-5, atol=1e-6 * float(w.abs().max()))
            assert torch.equal(p != 0, w != 0)
            assert st["frac_2of4"] == pytest.approx(frac_groups_2of4(p))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_phase_switches_to_refine_exactly_when_every_group_is_2of4(momentum):
    target, problem = make_problem(6)
    p = target.clone()
    opt = Prox24([p], refine_steps=5, momentum=momentum)
    while True:
        opt.step(problems=problem)
        if opt.phase(p) != "prox":
            break
        assert not is_2of4(p), "still in the prox phase although the iterate is 2:4"
        assert opt.state[p]["frac_2of4"] < 1.0
    st = opt.state[p]
    assert opt.phase(p) == "refine" and st["forced"] == 0 and st["frac_2of4"] == 1.0
    assert st["refine_done"] == 0
    mask = problem.mask
    assert mask is not None and mask.dtype == torch.bool
    assert bool((group_view(mask).sum(-1) == 2).all())
    # The switching iterate was 2:4 by itself; the mask is its support, filled in groups with
    # fewer than two non-zeros by the largest |Ŵ̃| among the zero entries.
    assert is_2of4(p)
    support = p != 0
    assert bool(mask[support].all())
    g_support, g_mask, g_target = group_view(support), group_view(mask), group_view(target.abs())
    filled = g_mask & ~g_support
    for row, grp in filled.any(-1).nonzero().tolist():
        free = ~g_support[row, grp]
        n_fill = int(filled[row, grp].sum())
        best = torch.topk(torch.where(free, g_target[row, grp], -1.0), n_fill).indices
        assert bool(filled[row, grp, best].all())
    run_to_end(opt, p, problem)
    assert opt.state[p]["refine_done"] == 5
    assert torch.equal(p, apply_mask(p, mask))


def test_max_prox_steps_forces_2of4_by_magnitude():
    target, problem = make_problem(7)
    p = target.clone()
    opt = Prox24([p], refine_steps=0, max_prox_steps=3)
    for _ in range(3):
        opt.step(problems=problem)
    st = opt.state[p]
    assert opt.phase(p) == "done" and st["forced"] == 1 and st["prox_steps"] == 3
    assert bool((group_view(problem.mask).sum(-1) == 2).all())
    assert is_2of4(p) and bool(problem.mask[p != 0].all())


def test_start_refinement_skips_the_prox_phase():
    target, problem = make_problem(8)
    mask = group_view(target.abs()).argsort(-1).argsort(-1).reshape(target.shape) >= 2
    p = target.clone()
    opt = Prox24([p], refine_steps=50, refine="gd")
    opt.start_refinement(p, problem, mask)
    assert opt.phase(p) == "refine" and torch.equal(p, apply_mask(target, mask))
    start = problem.loss(p)
    losses = []
    while opt.phase(p) != "done":
        opt.step(problems=problem)
        losses.append(problem.loss(p))
    assert opt.state[p]["prox_steps"] == 0 and opt.state[p]["refine_done"] == 50
    # Masked gradient descent with step 1/L is monotone on a quadratic.
    assert all(b <= a * (1 + 1e-6) for a, b in zip([start, *losses], losses, strict=False))
    assert losses[-1] < 0.5 * start
    assert torch.equal(p != 0, mask & (p != 0)) and is_2of4(p)
    q = target.clone()
    opt0 = Prox24([q], refine_steps=0)
    opt0.start_refinement(q, problem, mask)
    assert opt0.phase(q) == "done"


def test_param_groups_by_name():
    ta, pa_problem = make_problem(9, d_in=32, d_out=8)
    tb, pb_problem = make_problem(10, d_in=64, d_out=4)
    a, b = ta.clone(), tb.clone()
    opt = Prox24(
        [{"params": [a], "name": "a"}, {"params": [b], "name": "b", "lambda0": 0.5}],
        refine_steps=4,
    )
    opt.step(problems={"a": pa_problem, "b": pb_problem})
    assert not torch.equal(a, ta) and not torch.equal(b, tb)
    assert opt.state[a]["lam"] == pytest.approx(0.01) and opt.state[b]["lam"] == pytest.approx(0.5)
    # A name missing from the mapping is left untouched: weights and state.
    b_before, b_state = b.clone(), dict(opt.state[b])
    for _ in range(3):
        opt.step(problems={"a": pa_problem})
    assert torch.equal(b, b_before) and dict(opt.state[b]) == b_state
    assert opt.state[a]["prox_steps"] == 4 and opt.state[b]["prox_steps"] == 1
    # Unknown names are ignored.
    a_before = a.clone()
    opt.step(problems={"c": pa_problem})
    assert torch.equal(a, a_before) and opt.state[a]["prox_steps"] == 4
    # Both finish independently.
    for _ in range(10000):
        if opt.finished():
            break
        opt.step(problems={"a": pa_problem, "b": pb_problem})
    assert opt.finished() and is_2of4(a) and is_2of4(b)
    assert opt.state[a]["refine_done"] == 4 and opt.state[b]["refine_done"] == 4


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(beta=0.99), "beta"),
        (dict(lambda0=0.0), "lambda0"),
        (dict(lambda0=-1e-3), "lambda0"),
        (dict(momentum=-0.1), "momentum"),
        (dict(momentum=1.0), "momentum"),
        (dict(momentum=1.5), "momentum"),
        (dict(refine="adam"), "refine"),
    ],
)
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Prox24([torch.zeros(4, 8)], **kwargs)


def test_beta_one_is_allowed_and_constant():
    target, problem = make_problem(11, d_in=32, d_out=4)
    p = target.clone()
    opt = Prox24([p], beta=1.0, lambda0=0.3)
    for _ in range(3):
        opt.step(problems=problem)
    assert opt.state[p]["lam"] == 0.3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_are_rejected(dtype):
    target, problem = make_problem(12, d_in=32, d_out=4)
    p = target.to(dtype)
    opt = Prox24([p])
    with pytest.raises(TypeError, match="fp32"):
        opt.step(problems=problem)
