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


def fresh(problem: LocalProblem) -> LocalProblem:
    """The same local problem without its solve state (mask, CG vectors, previous iterate)."""
    return LocalProblem(gram=problem.gram, target=problem.target, lipschitz=problem.lipschitz)


def run_to_end(opt: Prox24, name: str = "w", max_steps: int = 10000) -> int:
    steps = 0
    while opt.phase(name) != "done":
        opt.step()
        steps += 1
        assert steps < max_steps
    return steps


# --------------------------------------------------------------------------------------------
# closure, autocast, state_dict
# --------------------------------------------------------------------------------------------


def test_step_calls_closure_once_and_returns_its_value():
    _, problem = make_problem()
    opt = Prox24(refine_steps=3)
    opt.add_layer("w", problem)
    calls = []
    sentinel = object()

    def closure():
        calls.append(torch.is_grad_enabled())
        return sentinel

    for i in range(5):
        assert opt.step(closure) is sentinel
        assert len(calls) == i + 1
    assert all(calls), "the closure runs with gradients enabled (Lightning backward inside)"
    assert opt.step() is None
    # The closure is still called once per step after the solve is finished.
    opt2 = Prox24(refine_steps=0)
    opt2.add_layer("w", fresh(problem))
    run_to_end(opt2)
    n = len(calls)
    assert opt2.step(closure) is sentinel and len(calls) == n + 1


@pytest.mark.parametrize(
    "kwargs",
    [dict(refine="gd"), dict(refine="cg"), dict(refine="cg", momentum=0.9)],
    ids=["gd", "cg", "cg-momentum"],
)
def test_step_under_bf16_autocast_is_identical_to_fp32(kwargs):
    _, problem = make_problem(1)
    results = []
    for autocast in (False, True):
        prob = fresh(problem)
        opt = Prox24(refine_steps=30, **kwargs)
        p = opt.add_layer("w", prob)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            run_to_end(opt)
        assert p.dtype == torch.float32
        results.append((p.clone(), prob.mask.clone(), dict(opt.layer_state("w"))))
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
    assert grad.dtype == torch.float32
    assert torch.equal(grad, ref.gradient(w))
    assert loss == ref.loss(w)


def test_state_dict_holds_only_small_scalars():
    target, problem = make_problem(3, d_in=128, d_out=32)
    opt = Prox24(refine_steps=20, momentum=0.9, refine="cg")
    opt.add_layer("layer", problem)
    run_to_end(opt, "layer")
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
    # Index 0 is the idle placeholder (no state); the layer is index 1.
    assert list(sd["state"]) == [1]
    state = sd["state"][1]
    assert state["phase"] == "done" and state["refine_done"] == 20 and state["prox_steps"] > 0
    buf = io.BytesIO()
    torch.save(sd, buf)
    assert buf.tell() < 4096 < target.numel() * 4  # far smaller than one weight matrix
    # The state round-trips into a fresh optimizer (through torch.save / weights-only load).
    buf.seek(0)
    opt2 = Prox24(refine_steps=20, momentum=0.9, refine="cg")
    opt2.add_layer("layer", fresh(problem))
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.phase("layer") == "done" and opt2.layer_state("layer") == opt.layer_state("layer")


@pytest.mark.parametrize("stop_after", [10, 10**6])
def test_resume_from_state_dict_continues_identically(stop_after):
    """A solve interrupted (prox phase or refine phase) and resumed from ``state_dict`` gives the
    same weights as an uninterrupted one (plain prox: no hidden state besides the mask)."""
    _, problem = make_problem(13)
    solo = Prox24(refine_steps=10)
    ref = solo.add_layer("w", problem)
    run_to_end(solo)

    prob = fresh(problem)
    opt = Prox24(refine_steps=10)
    p = opt.add_layer("w", prob)
    steps = 0
    while opt.phase("w") == "prox" and steps < stop_after:
        opt.step()
        steps += 1
    sd = opt.state_dict()
    resumed = Prox24(refine_steps=10)
    q = resumed.add_layer("w", prob, weight=p)
    resumed.load_state_dict(sd)
    assert resumed.layer_state("w") == opt.layer_state("w")
    assert resumed.phase("w") in ("prox", "refine")
    run_to_end(resumed)  # the mask lives in the problem, which the caller keeps
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


def _gemms_of_step(opt: Prox24) -> int:
    with CountGemms() as counter:
        opt.step()
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
    _, problem = make_problem(4)
    opt = Prox24(refine_steps=15, refine=refine, momentum=momentum)
    opt.add_layer("w", problem)
    prox_counts, refine_counts = [], []
    while opt.phase("w") != "done":
        phase = opt.phase("w")
        (prox_counts if phase == "prox" else refine_counts).append(_gemms_of_step(opt))
    assert len(prox_counts) == opt.layer_state("w")["prox_steps"] > 10
    assert prox_counts == [1] * len(prox_counts)
    assert len(refine_counts) == 15
    if refine == "gd":
        assert refine_counts == [1] * 15
    else:
        # CG's initial residual needs W H̃ once more on its first step; every later step is one.
        assert refine_counts == [2] + [1] * 14
    # A finished optimizer does no work.
    assert _gemms_of_step(opt) == 0


# --------------------------------------------------------------------------------------------
# schedule and phases
# --------------------------------------------------------------------------------------------


def test_lambda_schedule_and_iterates_follow_algorithm_2():
    lambda0, beta = 0.02, 1.05
    target, problem = make_problem(5)
    opt = Prox24(lambda0=lambda0, beta=beta, refine_steps=0)
    p = opt.add_layer("w", problem)
    w = target.clone()
    inv_l = 1.0 / problem.lipschitz
    for k in range(12):
        assert opt.phase("w") == "prox"
        opt.step()
        st = opt.layer_state("w")
        assert st["prox_steps"] == k + 1
        # The k-th iteration (from 0) uses lambda_k = lambda0 * beta^k.
        assert st["lam"] == pytest.approx(lambda0 * beta**k, rel=1e-12)
        # Independent replay of W <- prox_{(lambda_k / L) r}(W - (W - Ŵ̃) H̃ / L).
        w = prox_2of4(w - inv_l * ((w - target) @ problem.gram), lambda0 * beta**k * inv_l)
        if opt.phase("w") == "prox":
            # (the replay's gradient rounds differently: compare to fp32 precision of max |W|)
            assert torch.allclose(p, w, rtol=1e-5, atol=1e-6 * float(w.abs().max()))
            assert torch.equal(p != 0, w != 0)
            assert st["frac_2of4"] == pytest.approx(frac_groups_2of4(p))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_phase_switches_to_refine_exactly_when_every_group_is_2of4(momentum):
    target, problem = make_problem(6)
    opt = Prox24(refine_steps=5, momentum=momentum)
    p = opt.add_layer("w", problem)
    while True:
        opt.step()
        if opt.phase("w") != "prox":
            break
        assert not is_2of4(p), "still in the prox phase although the iterate is 2:4"
        assert opt.layer_state("w")["frac_2of4"] < 1.0
    st = opt.layer_state("w")
    assert opt.phase("w") == "refine" and st["forced"] == 0 and st["frac_2of4"] == 1.0
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
    run_to_end(opt)
    assert opt.layer_state("w")["refine_done"] == 5
    assert torch.equal(p, apply_mask(p, mask))


def test_max_prox_steps_forces_2of4_by_magnitude():
    _, problem = make_problem(7)
    opt = Prox24(refine_steps=0, max_prox_steps=3)
    p = opt.add_layer("w", problem)
    for _ in range(3):
        opt.step()
    st = opt.layer_state("w")
    assert opt.phase("w") == "done" and st["forced"] == 1 and st["prox_steps"] == 3
    assert bool((group_view(problem.mask).sum(-1) == 2).all())
    assert is_2of4(p) and bool(problem.mask[p != 0].all())


def test_add_layer_with_mask_skips_the_prox_phase():
    target, problem = make_problem(8)
    mask = group_view(target.abs()).argsort(-1).argsort(-1).reshape(target.shape) >= 2
    opt = Prox24(refine_steps=50, refine="gd")
    p = opt.add_layer("w", problem, mask=mask)
    assert opt.phase("w") == "refine" and torch.equal(p, apply_mask(target, mask))
    assert problem.mask is mask and torch.equal(problem.target, target)  # the target is not touched
    start = problem.loss(p)
    losses = []
    while opt.phase("w") != "done":
        opt.step()
        losses.append(problem.loss(p))
    st = opt.layer_state("w")
    assert st["prox_steps"] == 0 and st["refine_done"] == 50
    # Masked gradient descent with step 1/L is monotone on a quadratic.
    assert all(b <= a * (1 + 1e-6) for a, b in zip([start, *losses], losses, strict=False))
    assert losses[-1] < 0.5 * start
    assert torch.equal(p != 0, mask & (p != 0)) and is_2of4(p)
    opt0 = Prox24(refine_steps=0)
    opt0.add_layer("w", fresh(problem), mask=mask)
    assert opt0.phase("w") == "done"


def test_layers_advance_independently_and_removed_layers_stop():
    ta, pa_problem = make_problem(9, d_in=32, d_out=8)
    tb, pb_problem = make_problem(10, d_in=64, d_out=4)
    # Each layer solved alone: the reference for the two-layer optimizer.
    refs = {}
    for name, problem, hp in (("a", pa_problem, {}), ("b", pb_problem, {"lambda0": 0.5})):
        solo = Prox24(refine_steps=4, **hp)
        refs[name] = solo.add_layer(name, fresh(problem))
        run_to_end(solo, name)

    def two_layers() -> tuple[Prox24, torch.Tensor, torch.Tensor]:
        opt = Prox24(refine_steps=4)
        a = opt.add_layer("a", fresh(pa_problem))
        b = opt.add_layer("b", fresh(pb_problem), lambda0=0.5)  # a per-layer override
        assert opt.layers == ["a", "b"] and opt.weight("a") is a and opt.weight("b") is b
        assert opt.param_groups[0]["name"] == Prox24.IDLE
        return opt, a, b

    opt, a, b = two_layers()
    opt.step()
    assert not torch.equal(a, ta) and not torch.equal(b, tb)
    assert opt.layer_state("a")["lam"] == pytest.approx(0.01)
    assert opt.layer_state("b")["lam"] == pytest.approx(0.5)
    # Both finish independently, each exactly as when solved alone.
    for _ in range(10000):
        if opt.finished():
            break
        opt.step()
    assert opt.finished() and is_2of4(a) and is_2of4(b)
    assert opt.layer_state("a")["refine_done"] == 4 and opt.layer_state("b")["refine_done"] == 4
    assert torch.equal(a, refs["a"]) and torch.equal(b, refs["b"])

    # A layer removed mid-solve stops changing; its state and problem are gone.
    opt, a, b = two_layers()
    opt.step()
    assert opt.phase("b") != "done"
    b_before = b.clone()
    opt.remove_layer("b")
    assert opt.layers == ["a"] and "b" not in opt.problems and b not in opt.state
    assert all(b is not q for g in opt.param_groups for q in g["params"])
    with pytest.raises(KeyError, match="b"):
        opt.phase("b")
    with pytest.raises(KeyError, match="b"):
        opt.remove_layer("b")
    for _ in range(3):
        opt.step()
    assert torch.equal(b, b_before)
    assert opt.layer_state("a")["prox_steps"] == 4
    # The remaining layer finishes as when solved alone.
    run_to_end(opt, "a")
    assert opt.finished() and torch.equal(a, refs["a"])


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
        Prox24(**kwargs)


def test_add_layer_refuses_duplicates_and_unknown_settings():
    target, problem = make_problem(14, d_in=32, d_out=4)
    opt = Prox24(refine_steps=2)
    assert opt.layers == [] and opt.finished()  # only the idle placeholder
    w = opt.add_layer("w", problem)
    # The working weight is a copy: the problem's target never moves.
    assert w is not problem.target and torch.equal(w, target)
    opt.step()
    assert not torch.equal(w, target) and torch.equal(problem.target, target)
    state = dict(opt.layer_state("w"))
    with pytest.raises(ValueError, match="already"):
        opt.add_layer("w", problem)
    with pytest.raises(ValueError, match="already"):
        opt.add_layer(Prox24.IDLE, problem)
    with pytest.raises(TypeError, match="unknown.*lr"):
        opt.add_layer("x", problem, lr=0.1)
    with pytest.raises(ValueError, match="momentum"):
        opt.add_layer("y", problem, momentum=1.0)  # per-layer overrides are checked too
    # Nothing was added by the refused calls, and the existing layer is untouched.
    assert opt.layers == ["w"] and list(opt.problems) == ["w"] and len(opt.param_groups) == 2
    assert dict(opt.layer_state("w")) == state


def test_beta_must_grow_lambda_as_in_the_config():
    """One rule for the optimizer and the config (ProxPhaseSettings): beta = 1 never grows
    lambda, so every layer would run to max_prox_steps and be forced."""
    _, problem = make_problem(11, d_in=32, d_out=4)
    with pytest.raises(ValueError, match=r"beta must be > 1 \(lambda must grow\), got 1.0"):
        Prox24(beta=1.0, lambda0=0.3)
    opt = Prox24(lambda0=0.3)
    with pytest.raises(ValueError, match="beta must be > 1"):
        opt.add_layer("w", problem, beta=1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_are_rejected(dtype):
    target, problem = make_problem(12, d_in=32, d_out=4)
    opt = Prox24()
    p = opt.add_layer("w", problem, weight=target.to(dtype))
    assert p.dtype == dtype
    with pytest.raises(TypeError, match="fp32"):
        opt.step()
