"""Smoke tests of the scripts in ``tools/`` (toy experiment and benchmarks) on tiny sizes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# The tools are scripts, not a package: they import their helpers as ``_common`` from their own
# folder, so that folder goes on the path exactly as when they run as ``python tools/x.py``.
TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

import bench_ops  # noqa: E402
import toy_experiment as toy  # noqa: E402
from _common import markdown_table, recipe, round_to_multiple  # noqa: E402

from prox24_lightning.ops import local_loss  # noqa: E402
from prox24_lightning.solvers import make_config, prune_weight  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_all_masks_enumerates_every_2of4_mask_once():
    masks = toy.all_masks()
    assert masks.shape == (6**4, 16)
    assert bool((masks.view(-1, 4, 4).sum(-1) == 2).all())
    assert len({tuple(m.tolist()) for m in masks}) == 6**4
    # mask_index is the inverse of the enumeration order.
    assert torch.equal(toy.mask_index(masks), torch.arange(6**4))


def test_refit_losses_match_explicit_refit():
    """The batched Schur-complement losses equal the loss of explicitly refitted weights, and the
    refit is the minimum over weights on that mask (its masked gradient vanishes)."""
    w, h = toy.make_problem(rows=3, samples=64, seed=1)
    masks = toy.all_masks()
    table = toy.refit_losses(w, h, masks)
    pick = torch.tensor([0, 517, 1295])
    refit = toy.refit_weights(w, h, masks[pick])
    for r in range(3):
        d = refit[r] - w[r]
        assert table[r, pick[r]].item() == pytest.approx(float(d @ h @ d), rel=1e-9)
        # The library's fp32 loss agrees to single precision.
        expected = local_loss(refit[r : r + 1], w[r : r + 1], h)
        assert table[r, pick[r]].item() == pytest.approx(expected, rel=1e-5)
        grad = (refit[r] - w[r]) @ h
        assert float(grad[masks[pick[r]]].abs().max()) < 1e-8 * float(grad.abs().max() + 1)


def test_run_toy_table_and_oracle():
    res = toy.run_toy(rows=4, samples=64, seed=0)
    opt = torch.tensor(res["optimal_loss"])
    assert set(res["methods"]) == set(toy.METHOD_SPECS)
    for name, m in res["methods"].items():
        assert m["rows"] == 4 and 0 <= m["hits"] <= 4
        for key in ("mean_excess_refit_pct", "mean_excess_raw_pct", "mean_excess_refined_pct"):
            assert isinstance(m[key], float)
        # Oracle: the enumerated optimum is <= the refit on any mask, which is <= any weights
        # on that mask (small slack for the fp32 solver runs).
        refit = torch.tensor(m["refit_loss"])
        assert bool((opt <= refit * (1 + 1e-9)).all()), name
        for key in ("raw_loss", "refined_loss"):
            assert bool((refit <= torch.tensor(m[key]) * (1 + 1e-4) + 1e-6).all()), (name, key)
        assert m["hits"] == sum(m["hit"])
    table = toy.format_table(res)
    assert table.count("\n") == len(toy.METHOD_SPECS) + 1
    assert "prox (paper)" in table


def test_toy_cli_writes_plot(tmp_path, capsys):
    out = tmp_path / "sub" / "toy.png"
    toy.main(
        ["--rows", "2", "--samples", "48", "--seed", "0", "1", "--out", str(out)]
        + ["--methods", "wanda", "prox (fast recipe)"]
    )
    assert out.exists() and out.stat().st_size > 1000
    text = capsys.readouterr().out
    assert "all seeds pooled" in text and "| wanda" in text


def test_common_helpers():
    assert round_to_multiple(4096 / 8) == 512
    assert round_to_multiple(11008 / 8) == 1376
    assert round_to_multiple(1.0) == 4
    paper = recipe("paper")
    assert paper["lambda0"] == 0.01 and paper["beta"] == 1.01 and paper["momentum"] == 0.0
    assert recipe("paper", momentum=0.9)["momentum"] == 0.9
    assert recipe("paper")["momentum"] == 0.0  # overrides never leak into the shared recipe
    table = markdown_table(["a", "b"], [[1, "xy"]])
    assert table.splitlines()[0] == "| a | b  |"


def test_tau_for_fraction_hits_target():
    z = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))
    tau, frac = bench_ops.tau_for_fraction(z, 0.5, iters=14)
    assert tau > 0 and abs(frac - 0.5) < 0.1


def test_capture_alg2_inputs_reaches_targets():
    caps = bench_ops.capture_alg2_inputs(8, 32, seed=0, targets=(0.5, 0.9))
    assert [c["target"] for c in caps] == [0.5, 0.9]
    assert caps[0]["iteration"] <= caps[1]["iteration"]
    for c in caps:
        assert c["z"].shape == (8, 32) and c["fraction"] >= c["target"] and c["tau"] > 0


def test_bench_prox_tiny():
    rows = bench_ops.bench_prox(
        64, repeats=1, capture_shape=(8, 32), gaussian_targets=(0.5,), alg2_targets=(0.5,)
    )
    assert len(rows) == 2
    for r in rows:
        assert r["groups"] == 64 * 64 // 4
        assert r["prox_s"] > 0 and r["sort_s"] > 0 and r["ratio"] == r["prox_s"] / r["sort_s"]
        assert r["passed"] == (r["ratio"] <= bench_ops.RATIO_BAR)
    assert "PASS" in bench_ops.format_prox_table(rows) or "FAIL" in bench_ops.format_prox_table(
        rows
    )


def test_bench_solver_tiny():
    assert bench_ops.layer_shapes(1 / 8)[1] == ("gate/up_proj", 1376, 512)
    rows = bench_ops.bench_solver(1 / 256, recipes=("fast",), references=("wanda",))
    assert [r["layer"] for r in rows] == ["q/k/v/o_proj"] * 2 + ["gate/up_proj"] * 2 + [
        "down_proj"
    ] * 2
    for r in rows:
        assert r["loss_final"] > 0 and r["gemms"] > 0
    prox = [r for r in rows if r["run"].startswith("prox")]
    assert all(r["iterations_to_2of4"] > 0 for r in prox)
    assert "loss / Wanda+refit" in bench_ops.format_solver_table(rows)


def test_bench_cli_json(tmp_path):
    path = tmp_path / "bench.json"
    res = bench_ops.main(
        ["--quick", "--size", "32", "--scale", str(1 / 256), "--repeats", "1", "--skip-prox"]
        + ["--json", str(path), "--threads", "1"]
    )
    assert path.exists() and "solver" in res and "prox" not in res


def test_paired_ppl_bootstraps_every_export_against_the_first(tmp_path, text_files, capsys):
    import paired_ppl

    from prox24_lightning.testing import save_tiny_model

    a = save_tiny_model(tmp_path / "a", "llama", num_layers=1, seed=0)
    b = save_tiny_model(tmp_path / "b", "llama", num_layers=1, seed=1)
    config = tmp_path / "eval.yaml"
    config.write_text(
        f"data:\n  validation:\n    held: {{name: text, path: {text_files[1]}}}\n"
        "  eval_seqlen: 64\n  max_eval_windows: 12\n  bos: never\n"
    )
    rows = paired_ppl.main([a, a, b, "--config", str(config), "--resamples", "500"])
    same, other = rows
    assert (same["ratio"], same["low"], same["high"]) == (1.0, 1.0, 1.0)
    assert same["windows_lower"] == 0 and same["n"] == 12
    assert other["low"] <= other["ratio"] <= other["high"] and other["ratio"] != 1.0
    # --eval-seqlen / --max-windows replace the config's values
    rows = paired_ppl.main([a, b, "--config", str(config), "--max-windows", "5"])
    assert rows[0]["n"] == 5
    assert "95% paired bootstrap" in capsys.readouterr().out


def test_bench_solver_scores_every_variant_on_held_out_grams():
    """``tools/bench_solver.py --heldout``: each row's held-out loss is its weights' local loss
    on the held-out Gram (in the calibration's token units), and the summary table ranks it."""
    import bench_solver

    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=g)
    x_cal, x_val = torch.randn(40, 16, generator=g), torch.randn(80, 16, generator=g)
    layers = {"block.0.fc": (w, x_cal.T @ x_cal)}
    variants = {
        "sparsegpt+cg": ("sparsegpt", make_config("sparsegpt", {"refine": "cg"})),
        "prox search ridge 0.01": (
            "prox",
            make_config("prox", {"recipe": "search", "mask_search_ridge": 0.01}),
        ),
        "prox default": ("prox", make_config("prox", {})),
    }
    rows = bench_solver.run(layers, variants, {"block.0.fc": x_val.T @ x_val}, 40 / 80, 40)
    for r in rows:
        method, config = variants[r["variant"]]
        pruned = prune_weight(w, x_cal.T @ x_cal, method, config=config, n_tokens=40).weight
        assert r["heldout"] == pytest.approx(local_loss(pruned, w, x_val.T @ x_val) / 2, rel=1e-6)
    table = bench_solver.relative_losses(rows, list(variants))
    assert "held-out loss / sparsegpt+cg" in table and "| sparsegpt+cg | 1.0000 |" in table


def test_bench_solver_llm_like_layer_hands_the_solver_its_spread():
    """``--llm-like``: the synthetic layer's Gram comes with its sequences' spread, as the
    pipeline's do, so the default solves with the shrinkage ridge; fresh tokens give the
    held-out Gram of the same layer."""
    import bench_solver

    layers, spreads = bench_solver.llm_like_layer(8, 32, 4096)
    held, _ = bench_solver.llm_like_layer(8, 32, 4096, token_seed=1)
    (w, gram), (w_held, gram_held) = layers["llm_like"], held["llm_like"]
    assert torch.equal(w, w_held) and not torch.equal(gram, gram_held)
    assert spreads["llm_like"] is not None and spreads["llm_like"].sequences == 2
    variants = {"prox default": ("prox", make_config("prox", {}))}
    rows = bench_solver.run(layers, variants, {"llm_like": gram_held}, 1.0, 4096, spreads)
    ref = prune_weight(w, gram, "prox", n_tokens=4096, spread=spreads["llm_like"])
    assert ref.stats.extra["ridge_rule"] == "shrinkage"
    assert rows[0]["loss"] == pytest.approx(ref.stats.loss_final, rel=1e-6)
