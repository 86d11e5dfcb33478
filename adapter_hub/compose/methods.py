"""Combine methods for LoRA deltas (the maths), as pure tensor functions working on one layer at a time.

These combine several adapters' deltas into one new delta (``compose.combine`` calls them to build a new
adapter); they never touch a backbone. Folding deltas into the backbone weights is *merging*
(``AdapterModel.merge``/``unmerge``, ``MergeError``), which is not done here. The names a user may pass as
``method=`` are listed, without torch, in ``adapter_hub.combine_methods``.

Two families:

* **Factored** (`linear`/`cat`, `svd`): each adapter's delta at the layer is given as factors
  ``(B_i, A_i)`` with ``B_i`` of shape ``(out, r_i)`` and ``A_i`` of shape ``(r_i, n)``, the adapter's
  LoRA scaling already folded into ``B_i``, so that ``ΔW_i = B_i @ A_i``. These never build ``ΔW``.
* **Dense** (`ties`, `dare_linear`, `dare_ties`, `magnitude_prune`): each adapter's dense delta
  ``ΔW_i`` (any shape, all equal) is treated as a flat vector of entries. The result is a dense delta of
  the same shape, which `factorize` turns back into rank-k factors.

Every method combines the products ``ΔW_i``, never ``A`` and ``B`` separately: averaging the A's and
the B's would add cross terms ``B_i A_j`` and is not a combination of the deltas.

Dense methods and the SVD work in float64 and return the promoted dtype of their inputs, so that
float32 adapters do not lose the small singular values (and the error report stays meaningful).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from adapter_hub.errors import ConfigError

__all__ = [
    "TruncationReport",
    "cat",
    "dare_linear",
    "dare_ties",
    "factorize",
    "linear",
    "magnitude_prune",
    "overall_rel_error",
    "svd",
    "ties",
]

SignMethod = Literal["total", "frequency"]


@dataclass(frozen=True)
class TruncationReport:
    """What a rank-k truncation of one layer's delta kept and lost.

    ``singular_values`` are all singular values of the (untruncated) delta, descending; ``kept`` the
    first ``min(rank, len(singular_values))`` of them. ``rel_error`` is
    ``‖ΔW − B'A'‖_F / ‖ΔW‖_F = sqrt(Σ_{i>k} σ_i²) / sqrt(Σ_i σ_i²)``, defined as 0 for a zero delta.
    ``rank`` is the number of columns of the returned ``B'`` (rows of ``A'``).
    """

    rank: int
    singular_values: tuple[float, ...]
    kept: tuple[float, ...]
    rel_error: float

    @property
    def norm(self) -> float:
        """‖ΔW‖_F = sqrt(Σ σ_i²) of the untruncated delta."""
        return math.sqrt(math.fsum(s * s for s in self.singular_values))

    @property
    def error(self) -> float:
        """Absolute error ‖ΔW − B'A'‖_F = sqrt(Σ_{i>k} σ_i²)."""
        return math.sqrt(math.fsum(s * s for s in self.singular_values[len(self.kept) :]))


def overall_rel_error(reports: Sequence[TruncationReport]) -> float:
    """Relative Frobenius error over layers: sqrt(Σ_l error_l²) / sqrt(Σ_l norm_l²) (0 if all are zero)."""
    num = math.fsum(r.error**2 for r in reports)
    den = math.fsum(r.norm**2 for r in reports)
    return math.sqrt(num / den) if den > 0 else 0.0


# --------------------------------------------------------------------------------------------- checks


def _check_weights(weights: Sequence[float], count: int) -> list[float]:
    if count == 0:
        raise ConfigError("no adapters to combine")
    ws = [float(w) for w in weights]
    if len(ws) != count:
        raise ConfigError(f"got {len(ws)} weights for {count} adapters")
    if not all(math.isfinite(w) for w in ws):
        raise ConfigError(f"weights must be finite, got {ws}")
    return ws


def _check_density(density: float) -> float:
    d = float(density)
    if not 0.0 < d <= 1.0:  # also rejects NaN
        raise ConfigError(f"density must be in (0, 1], got {density}")
    return d


def _check_rank(rank: int) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"rank must be an integer >= 1, got {rank!r}")
    return rank


def _check_factors(factors: Sequence[tuple[Tensor, Tensor]]) -> tuple[int, int, torch.dtype]:
    """Validate shapes; return (out, n, promoted dtype)."""
    if len(factors) == 0:
        raise ConfigError("no adapters to combine")
    out = n = -1
    dtype: torch.dtype | None = None
    for i, (b, a) in enumerate(factors):
        if b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0] or b.shape[1] < 1:
            raise ConfigError(
                f"adapter {i}: factors must be B (out, r) and A (r, n) with r >= 1, "
                f"got {tuple(b.shape)} and {tuple(a.shape)}"
            )
        if out < 0:
            out, n = b.shape[0], a.shape[1]
        elif (b.shape[0], a.shape[1]) != (out, n):
            raise ConfigError(f"adapter {i}: delta shape {(b.shape[0], a.shape[1])} differs from {(out, n)}")
        for t in (b, a):
            if not t.is_floating_point():
                raise ConfigError(f"adapter {i}: factors must be floating point, got {t.dtype}")
            dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    assert dtype is not None
    return out, n, dtype


def _stack_deltas(deltas: Sequence[Tensor]) -> tuple[Tensor, torch.Size, torch.dtype]:
    """Validate and stack the deltas as float64 rows of a (T, numel) matrix."""
    if len(deltas) == 0:
        raise ConfigError("no adapters to combine")
    shape = deltas[0].shape
    dtype = deltas[0].dtype
    for i, d in enumerate(deltas):
        if d.shape != shape:
            raise ConfigError(f"adapter {i}: delta shape {tuple(d.shape)} differs from {tuple(shape)}")
        if not d.is_floating_point():
            raise ConfigError(f"adapter {i}: delta must be floating point, got {d.dtype}")
        dtype = torch.promote_types(dtype, d.dtype)
    if deltas[0].numel() == 0:
        raise ConfigError("deltas are empty")
    stacked = torch.stack([d.reshape(-1).to(torch.float64) for d in deltas])
    return stacked, shape, dtype


def _weight_column(ws: list[float], like: Tensor) -> Tensor:
    return torch.tensor(ws, dtype=like.dtype, device=like.device).unsqueeze(1)


# ------------------------------------------------------------------------------------------- factored


def linear(factors: Sequence[tuple[Tensor, Tensor]], weights: Sequence[float]) -> tuple[Tensor, Tensor]:
    """Exact weighted sum of the deltas (task arithmetic), as factors of rank Σ r_i.

    ``B = [w_1·B_1 … w_n·B_n]`` and ``A = [A_1; …; A_n]``, hence
    ``B @ A = Σ_i w_i · B_i @ A_i = Σ_i w_i · ΔW_i`` exactly, for any (also negative) weights.
    Returned in the promoted dtype of the factors.
    """
    _, _, dtype = _check_factors(factors)
    ws = _check_weights(weights, len(factors))
    b = torch.cat([w * bi.to(dtype) for w, (bi, _) in zip(ws, factors)], dim=1)
    a = torch.cat([ai.to(dtype) for _, ai in factors], dim=0)
    return b, a


cat = linear
"""PEFT's name for the exact concatenation; the same function as `linear`."""


def _truncate(
    u: Tensor, s: Tensor, vh: Tensor, rank: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor, TruncationReport]:
    """Keep the top ``rank`` triplets of ``u·diag(s)·vh`` (float64), split ``sqrt(s)`` to both sides.

    ``B' = U_k·diag(sqrt(S_k))``, ``A' = diag(sqrt(S_k))·V_kᵀ``: both factors carry the same scale, so
    neither is tiny or huge when the adapter is trained further or stored in low precision. When the delta
    has fewer than ``rank`` singular values, B' and A' are padded with zero columns/rows so that every
    layer of a combined adapter has the same rank (the product is unchanged).
    """
    m = s.shape[0]
    k = min(rank, m)
    root = s[:k].clamp_min(0).sqrt()
    b = u[:, :k] * root
    a = root.unsqueeze(1) * vh[:k]
    if k < rank:
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])], dim=0)
    # Tail energy from the discarded singular values directly (no ‖ΔW‖² − Σkept² cancellation).
    total = torch.linalg.vector_norm(s).item()
    tail = torch.linalg.vector_norm(s[k:]).item() if k < m else 0.0
    sv = tuple(float(x) for x in s.tolist())
    report = TruncationReport(rank=rank, singular_values=sv, kept=sv[:k], rel_error=tail / total if total > 0 else 0.0)
    return b.to(dtype), a.to(dtype), report


def svd(
    factors: Sequence[tuple[Tensor, Tensor]], weights: Sequence[float], rank: int
) -> tuple[Tensor, Tensor, TruncationReport]:
    """Best rank-``rank`` approximation (Frobenius and spectral, Eckart–Young) of ``ΔW = Σ w_i B_i A_i``.

    Computed from the factors without forming or decomposing the dense ``ΔW``:
    ``[B_1 … B_n] = Q_B R_B`` and ``[A_1; …; A_n]ᵀ = Q_A R_A`` (reduced QR), so
    ``ΔW = Q_B · (R_B · diag(w) · R_Aᵀ) · Q_Aᵀ``; with the SVD of the small core
    ``R_B diag(w) R_Aᵀ = U S Vᵀ`` (at most Σr × Σr), ``ΔW = (Q_B U) S (Q_A V)ᵀ`` is an SVD of ``ΔW``.
    Here ``diag(w)`` repeats ``w_i`` over the ``r_i`` columns of adapter ``i``. Truncating to the top
    ``k`` singular values gives ``B' = Q_B U_k sqrt(S_k)``, ``A' = sqrt(S_k) (Q_A V_k)ᵀ``.
    Cost O((out + n)·(Σr)²) instead of O(out·n·min(out, n)). Exact when ``rank`` ≥ rank of ΔW.
    The report holds the singular values and ``rel_error = sqrt(Σ_{i>k} σ_i²) / sqrt(Σ σ_i²)``.
    """
    _, _, dtype = _check_factors(factors)
    ws = _check_weights(weights, len(factors))
    rank = _check_rank(rank)
    bs = torch.cat([b.to(torch.float64) for b, _ in factors], dim=1)
    ats = torch.cat([a.to(torch.float64).T for _, a in factors], dim=1)
    # diag(w) with w_i repeated over adapter i's r_i columns.
    w = torch.tensor(
        [wi for wi, (b, _) in zip(ws, factors) for _ in range(b.shape[1])],
        dtype=torch.float64,
        device=bs.device,
    )
    q_b, r_b = torch.linalg.qr(bs)
    q_a, r_a = torch.linalg.qr(ats)
    core = (r_b * w) @ r_a.T
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    # Only the kept columns are lifted back to full size: O((out + n)·Σr·k).
    k = min(rank, s.shape[0])
    return _truncate(q_b @ u[:, :k], s, (q_a @ vh[:k].T).T, rank, dtype)


def factorize(delta: Tensor, rank: int) -> tuple[Tensor, Tensor, TruncationReport]:
    """Rank-``rank`` factors of a dense delta by truncated SVD: ``ΔW ≈ B' @ A'``.

    ``delta`` is viewed as the 2-D matrix ``(out, n) = (shape[0], prod(shape[1:]))`` (a conv kernel
    ``(out, in/groups, kh, kw)`` becomes ``(out, in/groups·kh·kw)``, matching a LoRA ``A`` of that width).
    With ``ΔW = U S Vᵀ``: ``B' = U_k sqrt(S_k)``, ``A' = sqrt(S_k) V_kᵀ``; same report as `svd`.
    """
    rank = _check_rank(rank)
    if delta.dim() < 2 or delta.numel() == 0:
        raise ConfigError(f"delta must be a non-empty tensor with >= 2 dims, got shape {tuple(delta.shape)}")
    if not delta.is_floating_point():
        raise ConfigError(f"delta must be floating point, got {delta.dtype}")
    mat = delta.reshape(delta.shape[0], -1).to(torch.float64)
    # QR first, then the SVD of the small square triangle: equally backward stable, and for the wide
    # matrices of conv layers far faster than a direct CPU SVD (512 × 4608 float64: 0.3 s instead of 12 s).
    k = min(rank, min(mat.shape))
    if mat.shape[0] >= mat.shape[1]:
        q, r = torch.linalg.qr(mat)  # ΔW = Q R,  R = U S Vᵀ  =>  ΔW = (Q U) S Vᵀ
        u, s, vh = torch.linalg.svd(r)
        return _truncate(q @ u[:, :k], s, vh[:k], rank, delta.dtype)
    q, r = torch.linalg.qr(mat.T)  # ΔWᵀ = Q R,  Rᵀ = U S Vᵀ  =>  ΔW = U S (Q V)ᵀ
    u, s, vh = torch.linalg.svd(r.T)
    return _truncate(u[:, :k], s, vh[:k] @ q.T, rank, delta.dtype)


# ---------------------------------------------------------------------------------------------- dense


def _magnitude_mask(x: Tensor, density: float) -> Tensor:
    """Per row of ``x`` (T, N): True where ``|x|`` is at least the ``k``-th largest magnitude of the row.

    ``k = max(1, floor(density·N + 1/2))`` (density·N rounded half up, at least one entry). Entries tied
    with the k-th magnitude are all kept, so the mask does not depend on an arbitrary tie-break (ties have
    probability zero for trained weights; then exactly k entries are kept).
    """
    n = x.shape[1]
    k = max(1, math.floor(density * n + 0.5))
    if k >= n:
        return torch.ones_like(x, dtype=torch.bool)
    mag = x.abs()
    threshold = torch.topk(mag, k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    return mag >= threshold


def _dare_mask(stacked: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """Keep masks, one row per task, drawn in task order as ``torch.rand(numel) < density``.

    Each row is ``torch.rand(N, generator=generator, dtype=torch.float64, device=generator.device)``;
    drawing on the generator's device and then moving makes the masks independent of where the deltas
    live, so a seed gives the same combination on CPU and GPU.
    """
    n = stacked.shape[1]
    rows = [torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device) for _ in stacked]
    return (torch.stack(rows) < density).to(stacked.device)


def _elect_and_mean(tau: Tensor, sign: SignMethod) -> Tensor:
    """TIES sign election and disjoint mean over the rows of ``tau`` (already trimmed and weighted).

    ``"total"``: ``γ = sgn(Σ_i τ_i)``; ``"frequency"``: ``γ = sgn(#{i: τ_i > 0} − #{i: τ_i < 0})``;
    a tie (0) elects +1. Result ``Σ_{i∈S} τ_i / max(1, |S|)`` with ``S = {i : τ_i ≠ 0, sgn τ_i = γ}``.
    """
    if sign == "total":
        score = tau.sum(dim=0)
    else:
        score = (tau > 0).sum(dim=0) - (tau < 0).sum(dim=0)
    elected = torch.where(score >= 0, 1.0, -1.0).to(tau.dtype)
    agree = tau * elected > 0  # non-zero and of the elected sign
    kept = torch.where(agree, tau, 0.0).sum(dim=0)
    return kept / agree.sum(dim=0).clamp_min(1).to(tau.dtype)


def _check_sign(sign: str) -> SignMethod:
    if sign not in ("total", "frequency"):
        raise ConfigError(f"sign must be 'total' or 'frequency', got {sign!r}")
    return sign  # type: ignore[return-value]


def ties(deltas: Sequence[Tensor], weights: Sequence[float], density: float, sign: SignMethod = "total") -> Tensor:
    """TIES merging (Yadav et al. 2023) of one layer's deltas, entrywise on the flattened tensors.

    1. Trim: ``t_i = ΔW_i ⊙ m_i``, ``m_i`` keeping the top-``density`` fraction of entries of ``ΔW_i`` by
       magnitude (``k = max(1, round_half_up(density·numel))``, per layer: the caller passes one layer).
    2. Weight: ``τ_i = w_i · t_i``. The weights enter here, **before** the sign election, so a negative
       weight turns a task vector into its negation (task removal) and it then votes with its flipped
       sign. (PEFT's ``ties`` instead elects on the unweighted ``t_i`` and applies ``w_i`` only inside the
       mean, so a negated task is averaged in against the sign it voted for.)
    3. Elect, per entry: ``"total"``: ``γ = sgn(Σ_i τ_i)``; ``"frequency"``: the sign held by more
       tasks, ``γ = sgn(#{i: τ_i > 0} − #{i: τ_i < 0})``; a tie elects +1.
    4. Disjoint mean: ``Σ_{i∈S} τ_i / |S|`` over ``S = {i : τ_i ≠ 0, sgn τ_i = γ}`` (0 where S is empty).

    As in PEFT, the weights are not normalised and there is no extra λ: with all ``w_i = 1`` and identical
    deltas the result is the (trimmed) delta itself. Returns the shape and promoted dtype of the inputs.
    """
    stacked, shape, dtype = _stack_deltas(deltas)
    ws = _check_weights(weights, len(deltas))
    density = _check_density(density)
    sign = _check_sign(sign)
    # In place: `stacked` is a fresh float64 copy, and these tensors are large (T × numel).
    tau = stacked.mul_(_magnitude_mask(stacked, density)).mul_(_weight_column(ws, stacked))
    return _elect_and_mean(tau, sign).reshape(shape).to(dtype)


def magnitude_prune(deltas: Sequence[Tensor], weights: Sequence[float], density: float) -> Tensor:
    """Weighted sum of magnitude-trimmed deltas: ``Σ_i w_i · (ΔW_i ⊙ m_i)``.

    ``m_i`` keeps the top-``density`` fraction of the entries of ``ΔW_i`` by magnitude, as in `ties`.
    """
    stacked, shape, dtype = _stack_deltas(deltas)
    ws = _check_weights(weights, len(deltas))
    density = _check_density(density)
    trimmed = stacked.mul_(_magnitude_mask(stacked, density))
    return (trimmed * _weight_column(ws, stacked)).sum(dim=0).reshape(shape).to(dtype)


def dare_linear(
    deltas: Sequence[Tensor], weights: Sequence[float], density: float, generator: torch.Generator
) -> Tensor:
    """DARE (Yu et al. 2023) then task arithmetic: ``Σ_i w_i · (ΔW_i ⊙ M_i) / density``.

    ``M_i`` keeps each entry independently with probability ``density`` (drop rate ``p = 1 − density``),
    drawn from ``generator`` in task order as ``torch.rand(numel, dtype=float64) < density``; the
    rescaling by ``1/density`` makes the expectation equal ``Σ_i w_i ΔW_i``. Seed the generator for a
    reproducible combination.
    """
    stacked, shape, dtype = _stack_deltas(deltas)
    ws = _check_weights(weights, len(deltas))
    density = _check_density(density)
    dropped = stacked * _dare_mask(stacked, density, generator) / density
    return (dropped * _weight_column(ws, stacked)).sum(dim=0).reshape(shape).to(dtype)


def dare_ties(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    density: float,
    generator: torch.Generator,
    sign: SignMethod = "total",
) -> Tensor:
    """DARE then TIES' election and disjoint mean.

    ``τ_i = w_i · (ΔW_i ⊙ M_i) / density`` with the random masks of `dare_linear` (the random drop
    replaces TIES' magnitude trim, as in the DARE paper and PEFT), then the sign election and disjoint
    mean of `ties` (steps 3–4) on the ``τ_i``; weights enter before the election, as in `ties`.
    """
    stacked, shape, dtype = _stack_deltas(deltas)
    ws = _check_weights(weights, len(deltas))
    density = _check_density(density)
    sign = _check_sign(sign)
    tau = stacked * _dare_mask(stacked, density, generator) / density * _weight_column(ws, stacked)
    return _elect_and_mean(tau, sign).reshape(shape).to(dtype)
