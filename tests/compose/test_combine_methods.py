"""The combine methods (``adapter_hub.compose.methods``) against independent references written here from the
papers' definitions.

The references deliberately use different code paths from the module: dense products and a dense SVD
for the factored methods, plain Python loops over entries for TIES / DARE / magnitude pruning, and the
earlier float64 implementation (whole-layer float64 stacks, ``torch.topk``, QR + SVD) for the float32
paths, which must keep its choices exactly and its values within float32 rounding.
"""

from __future__ import annotations

import math

import pytest
import torch

from adapter_hub.compose import methods
from adapter_hub.errors import ConfigError

F64 = torch.float64


def _factors(seed: int, out: int, n: int, ranks: list[int], dtype: torch.dtype = F64):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(out, r, generator=g, dtype=dtype), torch.randn(r, n, generator=g, dtype=dtype)) for r in ranks]


def _dense(factors, weights) -> torch.Tensor:
    return sum(w * (b.to(F64) @ a.to(F64)) for w, (b, a) in zip(weights, factors))


# --------------------------------------------------------------------------------- linear / cat


@pytest.mark.parametrize("weights", [[1.0, 0.5, 2.0], [1.0, -1.0, 0.25], [-0.7, 0.0, 3.0]])
def test_linear_equals_weighted_sum_of_deltas(weights):
    factors = _factors(0, 7, 11, [2, 3, 4])
    b, a = methods.linear(factors, weights)
    assert b.shape == (7, 9) and a.shape == (9, 11)
    torch.testing.assert_close(b @ a, _dense(factors, weights), rtol=1e-12, atol=1e-12)


def test_cat_is_linear_and_keeps_dtype():
    factors = _factors(1, 5, 6, [1, 2], dtype=torch.float32)
    b, a = methods.cat(factors, [1.0, -2.0])
    assert methods.cat is methods.linear
    assert b.dtype == a.dtype == torch.float32
    torch.testing.assert_close((b @ a).double(), _dense(factors, [1.0, -2.0]), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- svd


def _tail(s: torch.Tensor, k: int) -> float:
    return (s[k:].square().sum().sqrt() / s.square().sum().sqrt()).item()


# (out, n, ranks): tall, wide, and both dimensions smaller than Σr (reduced QR is not square there)
SHAPES = [(40, 30, [3, 4, 5]), (6, 50, [4, 4]), (5, 4, [3, 3, 2])]


@pytest.mark.parametrize("out,n,ranks", SHAPES)
@pytest.mark.parametrize("weights_sign", [1.0, -1.0])
def test_svd_singular_values_and_error_match_dense(out, n, ranks, weights_sign):
    factors = _factors(2, out, n, ranks)
    weights = [weights_sign * 0.8, 1.3, -0.4][: len(ranks)]
    dense = _dense(factors, weights)
    s_ref = torch.linalg.svdvals(dense)
    for k in (1, 2, 3):
        b, a, rep = methods.svd(factors, weights, rank=k)
        m = min(out, n, sum(ranks))
        assert len(rep.singular_values) == m and rep.rank == k and b.shape == (out, k) and a.shape == (k, n)
        torch.testing.assert_close(torch.tensor(rep.singular_values, dtype=F64), s_ref[:m], rtol=1e-10, atol=1e-10)
        # Values beyond Σr are exactly zero in theory and numerically negligible in the dense SVD.
        assert (s_ref[m:] < 1e-10 * s_ref[0]).all()
        assert rep.kept == rep.singular_values[:k]
        assert rep.rel_error == pytest.approx(_tail(s_ref, k), rel=1e-9, abs=1e-12)
        # The reported error is the true error of the returned factors...
        true_err = torch.linalg.matrix_norm(dense - b @ a) / torch.linalg.matrix_norm(dense)
        assert rep.rel_error == pytest.approx(true_err.item(), rel=1e-8, abs=1e-12)
        # ...and equals the optimum (Eckart-Young): the dense truncated SVD does no better.
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        best = (u[:, :k] * s[:k]) @ vh[:k]
        best_err = torch.linalg.matrix_norm(dense - best) / torch.linalg.matrix_norm(dense)
        assert true_err.item() == pytest.approx(best_err.item(), rel=1e-8, abs=1e-12)
        torch.testing.assert_close(b @ a, best, rtol=1e-9, atol=1e-9)


def test_svd_exact_at_full_rank_and_pads_beyond_it():
    factors = _factors(3, 20, 16, [2, 3])
    weights = [1.5, -0.5]
    dense = _dense(factors, weights)
    for k in (5, 9):  # 5 = Σr (true rank), 9 > Σr: zero-padded to 9 columns, still exact
        b, a, rep = methods.svd(factors, weights, rank=k)
        assert b.shape == (20, k) and a.shape == (k, 16) and rep.rank == k
        assert len(rep.kept) == 5 and rep.rel_error == 0.0
        torch.testing.assert_close(b @ a, dense, rtol=1e-10, atol=1e-10)


def test_svd_splits_singular_values_symmetrically():
    factors = _factors(4, 30, 25, [4, 4])
    b, a, rep = methods.svd(factors, [1.0, 2.0], rank=4)
    root = torch.tensor(rep.kept, dtype=F64).sqrt()
    torch.testing.assert_close(torch.linalg.vector_norm(b, dim=0), root, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.linalg.vector_norm(a, dim=1), root, rtol=1e-10, atol=1e-12)


def test_svd_zero_delta_and_float32():
    factors = _factors(5, 8, 9, [2, 2])
    b, a, rep = methods.svd(factors, [0.0, 0.0], rank=2)
    assert rep.rel_error == 0.0 and rep.norm == 0.0 and (b @ a).abs().max() == 0
    f32 = [(x.float(), y.float()) for x, y in factors]
    b, a, rep = methods.svd(f32, [1.0, -1.0], rank=2)
    assert b.dtype == a.dtype == torch.float32
    dense = _dense(f32, [1.0, -1.0])
    s_ref = torch.linalg.svdvals(dense)
    assert rep.rel_error == pytest.approx(_tail(s_ref, 2), rel=1e-9)
    true_err = torch.linalg.matrix_norm(dense - (b @ a).double()) / torch.linalg.matrix_norm(dense)
    assert true_err.item() == pytest.approx(rep.rel_error, rel=1e-4)


# ------------------------------------------------------------------------------------- factorize


@pytest.mark.parametrize("shape", [(8, 3, 3, 3), (30, 7)])  # wide conv kernel viewed as (8, 27); tall
def test_factorize_matches_dense_svd(shape):
    g = torch.Generator().manual_seed(6)
    delta = torch.randn(*shape, generator=g, dtype=F64)
    mat = delta.reshape(shape[0], -1)
    s_ref = torch.linalg.svdvals(mat)
    b, a, rep = methods.factorize(delta, rank=3)
    assert b.shape == (shape[0], 3) and a.shape == (3, mat.shape[1])
    torch.testing.assert_close(torch.tensor(rep.singular_values, dtype=F64), s_ref, rtol=1e-12, atol=1e-12)
    assert rep.rel_error == pytest.approx(_tail(s_ref, 3), rel=1e-10)
    err = torch.linalg.matrix_norm(mat - b @ a) / torch.linalg.matrix_norm(mat)
    assert err.item() == pytest.approx(rep.rel_error, rel=1e-9)
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    torch.testing.assert_close(b @ a, (u[:, :3] * s[:3]) @ vh[:3], rtol=1e-10, atol=1e-10)
    b, a, rep = methods.factorize(delta, rank=12)  # beyond min(out, n): padded, exact
    assert b.shape == (shape[0], 12) and rep.rel_error == 0.0
    torch.testing.assert_close(b @ a, mat, rtol=1e-10, atol=1e-10)
    b32, _, _ = methods.factorize(delta.float(), rank=2)
    assert b32.dtype == torch.float32


def test_factorize_agrees_with_svd_of_factors_and_overall_error():
    f1 = _factors(7, 12, 10, [3, 2])
    f2 = _factors(8, 6, 9, [2, 2])
    reports = []
    num = den = 0.0
    for factors, w in ((f1, [1.0, 0.5]), (f2, [-1.0, 2.0])):
        dense = _dense(factors, w)
        b1, a1, r1 = methods.svd(factors, w, rank=2)
        b2, a2, r2 = methods.factorize(dense, rank=2)
        torch.testing.assert_close(b1 @ a1, b2 @ a2, rtol=1e-9, atol=1e-9)
        assert r1.rel_error == pytest.approx(r2.rel_error, rel=1e-9)
        reports.append(r1)
        num += torch.linalg.matrix_norm(dense - b1 @ a1).item() ** 2
        den += torch.linalg.matrix_norm(dense).item() ** 2
    assert methods.overall_rel_error(reports) == pytest.approx(math.sqrt(num / den), rel=1e-8)
    assert methods.overall_rel_error([]) == 0.0


# ------------------------------------------------------------- dense references (paper definitions)


def ref_keep_count(density: float, numel: int) -> int:
    """The module's documented top-k count: density·numel rounded half up, at least one entry."""
    return max(1, math.floor(density * numel + 0.5))


def ref_trim(values: list[float], density: float) -> list[float]:
    """Keep the k largest-magnitude entries (inputs are continuous random: no ties)."""
    k = ref_keep_count(density, len(values))
    order = sorted(range(len(values)), key=lambda j: -abs(values[j]))
    keep = set(order[:k])
    return [v if j in keep else 0.0 for j, v in enumerate(values)]


def ref_elect_mean(tasks: list[list[float]], sign: str) -> list[float]:
    """TIES steps 3-4, one entry at a time."""
    out = []
    for j in range(len(tasks[0])):
        col = [t[j] for t in tasks]
        if sign == "total":
            score = sum(col)
        else:
            score = sum(1 for v in col if v > 0) - sum(1 for v in col if v < 0)
        gamma = 1.0 if score >= 0 else -1.0
        agree = [v for v in col if v != 0 and math.copysign(1.0, v) == gamma]
        out.append(sum(agree) / len(agree) if agree else 0.0)
    return out


def ref_ties(deltas, weights, density, sign):
    tasks = [[w * v for v in ref_trim(d.flatten().tolist(), density)] for d, w in zip(deltas, weights)]
    return torch.tensor(ref_elect_mean(tasks, sign), dtype=F64).reshape(deltas[0].shape)


def ref_magnitude_prune(deltas, weights, density):
    tasks = [[w * v for v in ref_trim(d.flatten().tolist(), density)] for d, w in zip(deltas, weights)]
    return torch.tensor([sum(col) for col in zip(*tasks)], dtype=F64).reshape(deltas[0].shape)


def ref_dare_tasks(deltas, weights, density, seed):
    """DARE: entry kept iff its uniform draw < density (same draws as documented), survivors / density."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for d, w in zip(deltas, weights):
        u = torch.rand(d.numel(), generator=g, dtype=F64).tolist()
        tasks.append([w * v / density if uj < density else 0.0 for v, uj in zip(d.flatten().tolist(), u)])
    return tasks


def _deltas(seed: int, count: int, shape=(6, 4, 3)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=F64) for _ in range(count)]


@pytest.mark.parametrize("sign", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0, 1.0], [0.3, 1.0, -0.8, 2.0]])
def test_ties_matches_dense_reference(sign, density, weights):
    deltas = _deltas(10, 4)
    got = methods.ties(deltas, weights, density, sign=sign)
    assert got.shape == deltas[0].shape and got.dtype == F64
    torch.testing.assert_close(got, ref_ties(deltas, weights, density, sign), rtol=1e-12, atol=1e-12)


def test_ties_sign_modes_differ_where_they_should():
    # One big positive value against two small negatives: "total" elects +, "frequency" elects -.
    deltas = [
        torch.tensor([[5.0]], dtype=F64),
        torch.tensor([[-1.0]], dtype=F64),
        torch.tensor([[-2.0]], dtype=F64),
    ]
    w = [1.0, 1.0, 1.0]
    assert methods.ties(deltas, w, 1.0, sign="total").item() == 5.0
    assert methods.ties(deltas, w, 1.0, sign="frequency").item() == -1.5
    # Weights enter before the election: negating the big task flips it to the majority.
    assert methods.ties(deltas, [-1.0, 1.0, 1.0], 1.0, sign="total").item() == pytest.approx(-8.0 / 3.0)
    # Ties in the vote elect +.
    pair = [torch.tensor([2.0], dtype=F64), torch.tensor([-2.0], dtype=F64)]
    assert methods.ties(pair, [1.0, 1.0], 1.0, sign="total").item() == 2.0
    assert methods.ties(pair, [1.0, 1.0], 1.0, sign="frequency").item() == 2.0


def test_ties_negative_weight_is_the_combination_of_negated_task_and_keeps_dtype():
    deltas = _deltas(11, 3)
    a = methods.ties(deltas, [1.0, -0.5, 2.0], 0.4)
    b = methods.ties([deltas[0], -deltas[1], deltas[2]], [1.0, 0.5, 2.0], 0.4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    one = methods.ties([deltas[0]], [1.0], 1.0)
    torch.testing.assert_close(one, deltas[0], rtol=0, atol=0)
    f32 = methods.ties([d.float() for d in deltas], [1.0, 1.0, 1.0], 0.3, sign="frequency")
    assert f32.dtype == torch.float32


@pytest.mark.parametrize("density", [0.1, 0.35, 1.0])
def test_magnitude_prune_matches_dense_reference(density):
    deltas = _deltas(12, 3, shape=(5, 7))
    weights = [0.5, -1.2, 1.0]
    got = methods.magnitude_prune(deltas, weights, density)
    torch.testing.assert_close(got, ref_magnitude_prune(deltas, weights, density), rtol=1e-12, atol=1e-12)
    # Per task vector: exactly k entries survive (random data has no ties in magnitude).
    single = methods.magnitude_prune(deltas[:1], [1.0], density)
    assert int((single != 0).sum()) == ref_keep_count(density, 35)


def test_magnitude_ties_at_threshold_are_all_kept():
    delta = torch.tensor([3.0, -3.0, 1.0, 2.0], dtype=F64)  # k = 1, but |3| = |-3|
    got = methods.magnitude_prune([delta], [2.0], 0.25)
    torch.testing.assert_close(got, torch.tensor([6.0, -6.0, 0.0, 0.0], dtype=F64), rtol=0, atol=0)
    # TIES keeps both as well; each entry is the disjoint mean of two agreeing copies.
    assert methods.ties([delta, delta], [1.0, 1.0], 0.25).tolist() == [3.0, -3.0, 0.0, 0.0]


# -------------------------------------------------------------------------------------------- DARE


def test_dare_linear_reproducible_and_matches_reference_draws():
    deltas = _deltas(13, 3, shape=(4, 9))
    weights = [1.0, -0.5, 0.75]
    got = methods.dare_linear(deltas, weights, 0.4, torch.Generator().manual_seed(123))
    again = methods.dare_linear(deltas, weights, 0.4, torch.Generator().manual_seed(123))
    other = methods.dare_linear(deltas, weights, 0.4, torch.Generator().manual_seed(124))
    torch.testing.assert_close(got, again, rtol=0, atol=0)
    assert not torch.equal(got, other)
    tasks = ref_dare_tasks(deltas, weights, 0.4, 123)
    ref = torch.tensor([sum(col) for col in zip(*tasks)], dtype=F64).reshape(4, 9)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    # density 1 keeps everything: plain task arithmetic.
    full = methods.dare_linear(deltas, weights, 1.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(full, sum(w * d for w, d in zip(weights, deltas)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_dare_ties_matches_reference_draws(sign):
    deltas = _deltas(14, 4, shape=(3, 10))
    weights = [1.0, 0.5, -1.0, 2.0]
    got = methods.dare_ties(deltas, weights, 0.5, torch.Generator().manual_seed(7), sign=sign)
    ref = ref_elect_mean(ref_dare_tasks(deltas, weights, 0.5, 7), sign)
    torch.testing.assert_close(got, torch.tensor(ref, dtype=F64).reshape(3, 10), rtol=1e-12, atol=1e-12)


def test_dare_keep_rate_and_rescale():
    n, d = 20_000, 0.3
    delta = torch.linspace(1.0, 2.0, n, dtype=F64)  # no zeros: a zero output means dropped
    out = methods.dare_linear([delta], [1.0], d, torch.Generator().manual_seed(2024))
    kept = out != 0
    rate = kept.double().mean().item()
    assert abs(rate - d) < 4 * math.sqrt(d * (1 - d) / n)
    torch.testing.assert_close(out[kept], delta[kept] / d, rtol=1e-14, atol=0)


def test_dare_preserves_expectation():
    deltas = _deltas(15, 2, shape=(50,))
    weights = [1.0, -2.0]
    d, runs = 0.5, 400
    g = torch.Generator().manual_seed(99)
    mean = sum(methods.dare_linear(deltas, weights, d, g) for _ in range(runs)) / runs
    expected = weights[0] * deltas[0] + weights[1] * deltas[1]
    # Per-entry std of the mean of `runs` independent draws: sqrt(Σ w² Δ² (1-d)/d / runs).
    std = (sum(w * w * x * x for w, x in zip(weights, deltas)) * (1 - d) / d / runs).sqrt()
    assert ((mean - expected).abs() <= 5 * std + 1e-12).all()


# ------------------------------------------------------------------------------------ bad arguments


def test_bad_arguments_raise_config_error():
    deltas = _deltas(16, 2)
    factors = _factors(16, 4, 5, [2, 2])
    g = torch.Generator().manual_seed(0)
    bad_calls = [
        lambda: methods.ties(deltas, [1.0, 1.0], 0.0),
        lambda: methods.ties(deltas, [1.0, 1.0], 1.5),
        lambda: methods.magnitude_prune(deltas, [1.0, 1.0], float("nan")),
        lambda: methods.dare_linear(deltas, [1.0, 1.0], -0.1, g),
        lambda: methods.ties(deltas, [1.0], 0.5),
        lambda: methods.dare_ties(deltas, [1.0, 1.0, 1.0], 0.5, g),
        lambda: methods.ties(deltas, [1.0, 1.0], 0.5, sign="median"),
        lambda: methods.ties([deltas[0], deltas[1][:3]], [1.0, 1.0], 0.5),
        lambda: methods.ties([], [], 0.5),
        lambda: methods.linear(factors, [1.0]),
        lambda: methods.linear([], []),
        lambda: methods.linear([factors[0], (factors[1][0][:3], factors[1][1])], [1.0, 1.0]),
        lambda: methods.linear([(factors[0][0], factors[1][1][:1])], [1.0]),
        lambda: methods.linear(factors, [1.0, float("inf")]),
        lambda: methods.svd(factors, [1.0, 1.0], rank=0),
        lambda: methods.svd(factors, [1.0, 1.0], rank=1.5),
        lambda: methods.svd(factors, [1.0, 1.0], rank=True),
        lambda: methods.factorize(deltas[0], rank=-1),
        lambda: methods.factorize(torch.ones(4, dtype=F64), rank=1),
    ]
    for call in bad_calls:
        with pytest.raises(ConfigError) as info:
            call()
        assert "\n" not in str(info.value) and str(info.value)


def _two_adapters_on_a_grouped_conv(a_groups: int):
    from torch import nn

    from adapter_hub import AdapterModel, LoRAConfig

    torch.manual_seed(0)
    model = AdapterModel(nn.Sequential(nn.Conv2d(4, 8, 3, groups=2)))
    spec = {"0": {"r": 4, "alpha": 4.0, "rank": 4, "a_groups": a_groups}}
    for name in ("a", "b"):
        model.add_adapter(name, LoRAConfig(r=4, targets=["0"], norm_layers="frozen"), layer_specs=spec)
    return model


def test_a_target_rank_beyond_any_layer_is_refused_before_any_work():
    model = _two_adapters_on_a_grouped_conv(a_groups=2)  # each group block: ΔW of 4 × 18, rank at most 4
    with pytest.raises(ConfigError, match=r"rank 5 is more than any combined layer's ΔW can have \(at most 4 here\)"):
        model.combine("c", ["a", "b"], method="svd", rank=5)
    model.combine("c", ["a", "b"], method="svd", rank=4)
    assert "c" in model.adapters


@pytest.mark.parametrize("method", ["linear", "svd", "ties"])
def test_a_layer_that_cannot_merge_is_refused_with_its_reason_whatever_the_rank(method: str):
    from adapter_hub.errors import CombineError

    model = _two_adapters_on_a_grouped_conv(a_groups=1)  # PEFT's layout: A crosses the groups
    params = {} if method == "linear" else {"rank": 2, **({"density": 0.5} if method == "ties" else {})}
    with pytest.raises(CombineError, match="cannot combine 0"):
        model.combine("c", ["a", "b"], method=method, **params)
    assert "c" not in model.adapters


# ------------------------------------------------- float32 against the float64 algorithm it replaces
#
# The module works in the adapters' dtype; these references are the earlier implementation, which stacked
# the deltas in float64, trimmed with torch.topk and factorised by QR + SVD in float64.

U32 = 2.0**-24  # unit roundoff of float32


def f64_magnitude_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    n = x.shape[1]
    k = max(1, math.floor(density * n + 0.5))
    if k >= n:
        return torch.ones_like(x, dtype=torch.bool)
    mag = x.abs()
    return mag >= torch.topk(mag, k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)


def f64_elect_and_mean(tau: torch.Tensor, sign: str) -> torch.Tensor:
    score = tau.sum(0) if sign == "total" else (tau > 0).sum(0) - (tau < 0).sum(0)
    elected = torch.where(score >= 0, 1.0, -1.0).to(tau.dtype)
    agree = tau * elected > 0
    return torch.where(agree, tau, 0.0).sum(0) / agree.sum(0).clamp_min(1).to(tau.dtype)


def f64_method(method: str, deltas, weights, density: float, seed: int = 0, sign: str = "total"):
    """The float64 result of ``method`` and, per entry, Σ|τ_i| (the scale of a sum's rounding)."""
    x = torch.stack([d.reshape(-1).to(F64) for d in deltas])
    w = torch.tensor(weights, dtype=F64).unsqueeze(1)
    if method in ("ties", "magnitude_prune"):
        tau = x * f64_magnitude_mask(x, density) * w
    else:
        g = torch.Generator().manual_seed(seed)
        drawn = torch.stack([torch.rand(x.shape[1], generator=g, dtype=F64) for _ in deltas]) < density
        tau = x * drawn / density * w
    out = f64_elect_and_mean(tau, sign) if method in ("ties", "dare_ties") else tau.sum(0)
    shape = deltas[0].shape
    return out.reshape(shape), tau.abs().sum(0).reshape(shape)


def run_method(method: str, deltas, weights, density: float, seed: int = 0, sign: str = "total"):
    generator = torch.Generator().manual_seed(seed)
    if method == "ties":
        return methods.ties(deltas, weights, density, sign=sign)
    if method == "dare_ties":
        return methods.dare_ties(deltas, weights, density, generator, sign=sign)
    if method == "dare_linear":
        return methods.dare_linear(deltas, weights, density, generator)
    return methods.magnitude_prune(deltas, weights, density)


DENSE_CASES = [
    ("ties", "total"),
    ("ties", "frequency"),
    ("dare_ties", "total"),
    ("dare_ties", "frequency"),
    ("dare_linear", "total"),
    ("magnitude_prune", "total"),
]


def check_against_float64(method: str, sign: str, deltas, weights, densities) -> None:
    for density in densities:
        got = run_method(method, deltas, weights, density, seed=11, sign=sign)
        ref, scale = f64_method(method, deltas, weights, density, seed=11, sign=sign)
        assert got.dtype == torch.float32 and got.shape == deltas[0].shape
        # The same choices: the same top-k or DARE masks and the same elected signs leave the same zeros
        # (the deltas have none), and an entry whose sign election differed would be off by its own size.
        assert torch.equal(got != 0, ref != 0)
        err = (got.double() - ref).abs()
        if method in ("ties", "dare_ties"):  # a mean of same-signed terms: relative error
            assert (err <= 8 * U32 * ref.abs()).all(), (err / ref.abs().clamp_min(1e-30)).max().item() / U32
        else:  # a signed sum: error relative to the sum of the magnitudes added
            assert (err <= 8 * U32 * scale).all(), (err / scale.clamp_min(1e-30)).max().item() / U32


def _f32_deltas(seed: int, count: int, shape) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(count)]  # float32, non-zero everywhere


WEIGHTS = [0.7, -1.3, 0.0, 1.0, -0.4]  # negative and zero weights: a zero must not shift DARE's draws


@pytest.mark.parametrize("blocks", ["one", "many"])
@pytest.mark.parametrize("method,sign", DENSE_CASES)
def test_float32_dense_methods_match_the_float64_algorithm(method, sign, blocks, monkeypatch):
    if blocks == "one":  # 540 entries a task: top-k by torch.kthvalue, one block
        deltas = _f32_deltas(20, 5, (12, 5, 3, 3))
    else:  # 5820 entries a task through the sampled top-k, in blocks with ragged ends
        monkeypatch.setattr(methods, "_EXACT_SELECT", 256)
        monkeypatch.setattr(methods, "_BLOCK", 500)
        monkeypatch.setattr(methods, "_ROW_BLOCK", 333)
        deltas = _f32_deltas(20, 5, (60, 97))
    check_against_float64(method, sign, deltas, WEIGHTS, (0.2, 0.55))


@pytest.mark.parametrize("method,sign", DENSE_CASES)
def test_float32_dense_methods_match_the_float64_algorithm_in_whole_blocks(method, sign, monkeypatch):
    monkeypatch.setattr(methods, "_EXACT_SELECT", 4096)  # the sampled top-k, at the module's block sizes
    check_against_float64(method, sign, _f32_deltas(21, 5, (96, 400)), WEIGHTS, (0.2,))


@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_signs_near_a_tie_are_elected_as_in_float64(sign, monkeypatch):
    """Task 2 cancels task 1 to within a few float32 ulps (exactly on some entries): the float32 sum cannot
    tell the sign there, so those entries must be settled in float64, with the float64 algorithm's result."""
    g = torch.Generator().manual_seed(21)
    n = 6000
    x1 = torch.randn(n, generator=g)
    wiggle = torch.randint(-3, 4, (n,), generator=g).double() * 2.0**-24
    weights = [0.1, 0.3, 0.05]
    x2 = (-(weights[0] / weights[1]) * x1.double() * (1 + wiggle)).float()
    x2[:50] = -x1[:50] / 3  # float64 sums of exactly opposite terms where 3·x is exact in float32 (most)
    x3 = torch.where(torch.rand(n, generator=g) < 0.5, 0.0, torch.randn(n, generator=g) * 1e-3)
    deltas = [x1, x2, x3]
    settled = []

    def spy(tau, sign):
        settled.append(tau.shape[1])
        return elect(tau, sign)

    elect = methods._elect_and_mean
    monkeypatch.setattr(methods, "_elect_and_mean", spy)
    for density in (1.0, 0.6):
        got = methods.ties(deltas, weights, density, sign=sign)
        ref, _ = f64_method("ties", deltas, weights, density, sign=sign)
        assert torch.equal(got != 0, ref != 0)
        assert ((got.double() - ref).abs() <= 8 * U32 * ref.abs()).all()
    assert (sum(settled) > 0) == (sign == "total")  # "frequency" counts exactly: nothing to settle


def kth_magnitude(row: torch.Tensor, density: float) -> torch.Tensor:
    n = row.numel()
    return row.abs().kthvalue(n - max(1, math.floor(density * n + 0.5)) + 1).values


def test_thresholds_are_the_exact_kth_magnitude_with_ties_and_a_misleading_sample(monkeypatch):
    monkeypatch.setattr(methods, "_EXACT_SELECT", 4096)  # the sampled path
    n = 50_000
    g = torch.Generator().manual_seed(22)
    rows = [torch.randn(n, generator=g) for _ in range(3)]
    rows[1] = (rows[1] * 4).round() / 4  # a dozen distinct magnitudes: thousands tied at the threshold
    rows[2][methods._sample_index(n, methods._sample_size(n), rows[2].device)] = 1e3  # the sample sees 1e3 only
    for density in (0.001, 0.2, 0.5, 0.97, 0.995):  # from no upper bracket to no lower one
        k = max(1, math.floor(density * n + 0.5))
        got = methods._magnitude_thresholds(rows, density)
        ref = torch.stack(rows).abs().kthvalue(n - k + 1, dim=1, keepdim=True).values
        assert torch.equal(got, ref)
    assert methods._magnitude_thresholds(rows, 1.0) is None  # k = n: everything is kept
    # ties at the threshold are all kept, so more than k entries survive in the tied row
    kept = methods.magnitude_prune([rows[1]], [1.0], 0.2)
    assert int((kept != 0).sum()) > max(1, math.floor(0.2 * n + 0.5))
    torch.testing.assert_close(kept, rows[1] * (rows[1].abs() >= kth_magnitude(rows[1], 0.2)), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_deltas_are_combined_in_float32(dtype):
    g = torch.Generator().manual_seed(23)
    deltas = [torch.randn(40, 30, generator=g).to(dtype) for _ in range(3)]
    got = methods.ties(deltas, [1.0, 0.5, -1.0], 0.3)
    assert got.dtype == dtype
    wide = methods.ties([d.float() for d in deltas], [1.0, 0.5, -1.0], 0.3)  # the widening is exact
    torch.testing.assert_close(got, wide.to(dtype), rtol=0, atol=0)


def test_dense_methods_take_deltas_that_require_grad():
    deltas = [d.float().requires_grad_() for d in _deltas(24, 3)]
    got = methods.dare_ties(deltas, [1.0, 1.0, 1.0], 0.5, torch.Generator().manual_seed(1))
    assert not got.requires_grad
    ref, _ = f64_method("dare_ties", [d.detach() for d in deltas], [1.0, 1.0, 1.0], 0.5, seed=1)
    assert ((got.double() - ref).abs() <= 8 * U32 * ref.abs()).all()


def f64_factorize(mat: torch.Tensor, rank: int):
    """The earlier factorize: QR + SVD of the triangle in float64; (B'A', singular values, rel_error)."""
    mat = mat.reshape(mat.shape[0], -1).to(F64)
    k = min(rank, *mat.shape)
    if mat.shape[0] >= mat.shape[1]:
        q, r = torch.linalg.qr(mat)
        u, s, vh = torch.linalg.svd(r)
        u = q @ u
    else:
        q, r = torch.linalg.qr(mat.T)
        u, s, vh = torch.linalg.svd(r.T)
        vh = vh @ q.T
    tail = torch.linalg.vector_norm(s[k:]).item() if k < s.numel() else 0.0
    return (u[:, :k] * s[:k]) @ vh[:k], s, tail / torch.linalg.vector_norm(s).item()


def _float32_matrix(seed: int, out: int, n: int, low_rank: int | None = None, noise: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(out, n, generator=g) * noise
    if low_rank:
        m += torch.randn(out, low_rank, generator=g) @ torch.randn(low_rank, n, generator=g)
    return m


@pytest.mark.parametrize("shape", [(48, 7, 3, 3), (200, 30), (30, 200)])  # wide conv kernel, tall, wide
def test_float32_factorize_reproduces_the_float64_truncation(shape):
    delta = _float32_matrix(25, shape[0], math.prod(shape[1:])).reshape(shape)
    for rank in (1, 5):
        b, a, rep = methods.factorize(delta, rank)
        ref, s_ref, rel_ref = f64_factorize(delta, rank)
        assert b.dtype == a.dtype == torch.float32 and b.shape == (shape[0], rank) and rep.rank == rank
        prod = b.double() @ a.double()
        # within the float32 rounding of the factors themselves
        assert torch.linalg.matrix_norm(prod - ref) <= 4 * U32 * torch.linalg.matrix_norm(ref)
        assert len(rep.singular_values) == s_ref.numel() and rep.kept == rep.singular_values[:rank]
        s_got = torch.tensor(rep.singular_values, dtype=F64)
        torch.testing.assert_close(s_got, s_ref, rtol=1e-10, atol=1e-7 * s_ref[0].item())
        assert rep.rel_error == pytest.approx(rel_ref, rel=1e-10)
        # the report is the true error of what is returned
        mat = delta.reshape(shape[0], -1).double()
        true = (torch.linalg.matrix_norm(mat - prod) / torch.linalg.matrix_norm(mat)).item()
        assert rep.rel_error == pytest.approx(true, rel=1e-5)


def test_float32_factorize_small_tail_padding_and_zero():
    # Nearly rank 6: the tail holds about 1e-9 of the energy, where ‖ΔW‖² − Σ kept σ² in float32 would be
    # all rounding; the reported error still matches the float64 SVD's to 1e-6 of itself.
    delta = _float32_matrix(26, 60, 90, low_rank=6, noise=1e-4)
    b, a, rep = methods.factorize(delta, 6)
    ref, s_ref, rel_ref = f64_factorize(delta, 6)
    assert 1e-6 < rel_ref < 1e-3
    assert rep.rel_error == pytest.approx(rel_ref, rel=1e-6)
    assert torch.linalg.matrix_norm(b.double() @ a.double() - ref) <= 4 * U32 * torch.linalg.matrix_norm(ref)
    # rank beyond min(out, n): exact, padded with zero columns / rows
    small = _float32_matrix(27, 7, 5)
    b, a, rep = methods.factorize(small, 9)
    assert b.shape == (7, 9) and a.shape == (9, 5) and rep.rel_error == 0.0 and len(rep.kept) == 5
    torch.testing.assert_close(b @ a, small, rtol=0, atol=1e-5)
    # a rank-deficient delta: the zero directions get zero factors, not a division by zero
    b, a, rep = methods.factorize(torch.ones(6, 4), 3)
    assert torch.isfinite(b).all() and torch.isfinite(a).all() and rep.rel_error == 0.0
    torch.testing.assert_close(b @ a, torch.ones(6, 4), rtol=0, atol=1e-6)
    b, a, rep = methods.factorize(torch.zeros(5, 8), 2)
    assert (b == 0).all() and (a == 0).all() and rep.rel_error == 0.0 and rep.norm == 0.0
    b, _, _ = methods.factorize(delta.to(torch.bfloat16), 2)
    assert b.dtype == torch.bfloat16
