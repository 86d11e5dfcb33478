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

Precision. The dense methods work layer by layer in the deltas' own dtype (at least float32), in blocked
passes, and return the promoted dtype of their inputs. Their discrete choices are exactly those of a
float64 computation: the same entries kept (the top k by magnitude, ties at the threshold all kept; DARE's
masks from the same float64 draws) and the same elected signs (the few entries whose float sum is within
its rounding bound of zero are settled in float64). Only the sums and means carry the working dtype's
rounding: a few units of ``u`` (2⁻²⁴ in float32) relative to the sum of the magnitudes added. `svd` works
in float64. `factorize` decomposes a float64 delta by QR and an SVD in float64, and a narrower one through
the eigendecomposition of its Gram matrix formed in float64, so that float32 adapters keep the exact rank-k
truncation and a meaningful error report.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
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
    With ``ΔW = U S Vᵀ``: ``B' = U_k sqrt(S_k)``, ``A' = sqrt(S_k) V_kᵀ``; same report as `svd`, the
    factors in the dtype of ``delta``. A float64 delta is decomposed by QR and an SVD of the triangle, in
    float64; narrower ones from the float64 Gram matrix of the shorter side (`_factorize_gram`).
    """
    rank = _check_rank(rank)
    if delta.dim() < 2 or delta.numel() == 0:
        raise ConfigError(f"delta must be a non-empty tensor with >= 2 dims, got shape {tuple(delta.shape)}")
    if not delta.is_floating_point():
        raise ConfigError(f"delta must be floating point, got {delta.dtype}")
    if delta.dtype != torch.float64:
        return _factorize_gram(delta.reshape(delta.shape[0], -1), rank)
    mat = delta.reshape(delta.shape[0], -1)
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


def _lower_gram(side: Tensor, blocks: int = 4) -> Tensor:
    """The lower triangle of ``side @ side.T`` (all that ``torch.linalg.eigh`` reads), block row by block
    row: ``(blocks + 1) / (2·blocks)`` of the product's cost; the upper triangle is left at zero."""
    m = side.shape[0]
    if m < 64 * blocks or side.requires_grad:  # (writing into `out=` cannot be differentiated)
        return side @ side.T
    gram = side.new_zeros(m, m)
    edges = [m * j // blocks for j in range(blocks + 1)]
    for lo, hi in zip(edges, edges[1:]):
        torch.matmul(side[lo:hi], side[:hi].T, out=gram[lo:hi, :hi])
    return gram


def _factorize_gram(mat: Tensor, rank: int) -> tuple[Tensor, Tensor, TruncationReport]:
    """`factorize` of a float32 (or narrower) ``mat`` through the float64 Gram matrix of its shorter side.

    For ``out ≤ n``: ``G = ΔW ΔWᵀ = U diag(σ²) Uᵀ`` (``out × out``), formed and decomposed in float64; the
    entries of ``ΔW`` are exact in float64, so ``G`` and its eigenvalues carry errors of about
    ``1e-16·σ₁²`` and the kept vectors errors of about ``1e-16·σ₁² / (σ_k² − σ_{k+1}²)``: far below the
    float32 rounding of ``ΔW`` itself, at the cost of a matrix product and an ``out × out`` eigensolver
    instead of a QR of the whole matrix. Then ``P = U_kᵀ ΔW`` (rows ``σ_i·v_iᵀ``), ``s_i = ‖P_i‖`` and
    ``B' = U_k diag(sqrt(s))``, ``A' = diag(1/sqrt(s)) P``, so that ``B'A' = U_k U_kᵀ ΔW`` exactly, however
    small a kept ``σ_i`` is, and both factors carry ``sqrt(σ_i)``. (``out > n``: the same on ``ΔWᵀ``.)

    The report's singular values are the ``s_i`` kept, then ``sqrt(max(λ_i, 0))`` of the remaining
    eigenvalues (absolute error about ``1e-8·σ₁``); ``rel_error = sqrt(Σ_{i>k} λ_i / Σ_i σ_i²)``, the tail
    energy summed from the discarded eigenvalues themselves (no ``‖ΔW‖² − Σ kept σ²`` cancellation).
    """
    dtype = mat.dtype
    wide = mat.shape[0] <= mat.shape[1]
    side = (mat if wide else mat.T).to(torch.float64)  # (m, l), m ≤ l
    m = side.shape[0]
    k = min(rank, m)
    evals, evecs = torch.linalg.eigh(_lower_gram(side))  # ascending
    basis = evecs[:, m - k :].flip(1)  # (m, k): top k, descending
    proj = basis.T @ side  # (k, l)
    s = torch.linalg.vector_norm(proj, dim=1)
    root = s.sqrt()
    near = basis * root
    far = proj / torch.where(root > 0, root, 1.0).unsqueeze(1)
    b, a = (near, far) if wide else (far.T, near.T)
    if k < rank:  # pad as `_truncate` does
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])], dim=0)
    kept = [float(x) for x in s.tolist()]
    tail_energy = [float(x) for x in evals[: m - k].flip(0).clamp_min(0).tolist()]
    total = math.fsum(x * x for x in kept) + math.fsum(tail_energy)
    report = TruncationReport(
        rank=rank,
        singular_values=(*kept, *(math.sqrt(e) for e in tail_energy)),
        kept=tuple(kept),
        rel_error=math.sqrt(math.fsum(tail_energy) / total) if total > 0 else 0.0,
    )
    return b.to(dtype), a.to(dtype), report


# ---------------------------------------------------------------------------------------------- dense
#
# The dense methods run per layer on T task vectors of N entries each, in the deltas' dtype (at least
# float32), in blocked passes: the T rows are stacked _BLOCK columns at a time into one reused buffer, and
# every step of a pass works on that block while it is in cache. Whole-layer (T, N) temporaries would go to
# memory and back at every step, and fresh ones cost first-touch page faults besides. Masks are 0/1 values
# of the working dtype and sums over the T tasks are pairwise adds of rows: on a CPU both are several times
# faster than boolean tensors and reductions over the outer dimension.

_BLOCK = 1 << 16
"""Entries per task in one block (T × 65536 float32 values: 2 MiB at T = 8)."""

_EXACT_SELECT = 1 << 17
"""Rows of at most this many entries get their top-k threshold from ``torch.kthvalue`` directly."""

_SAMPLE = 1 << 15
"""Largest sample per row that brackets the top-k threshold of a longer row."""

_SAMPLE_STRIDE = 2654435761
"""Prime multiplier that scrambles the sample's offsets within their strides."""

_ROW_BLOCK = 1 << 18
"""Entries of one row per step of the threshold pass (1 MiB in float32)."""


def _dense_rows(deltas: Sequence[Tensor]) -> tuple[list[Tensor], torch.Size, torch.dtype]:
    """Validate the deltas; return them as flat rows in the working dtype, their shape and promoted dtype.

    The working dtype is the promoted dtype of the deltas, at least float32 (half-precision deltas are
    widened exactly). Rows alias the caller's tensors where no conversion is needed: they are only read.
    They are detached: the dense combinations are built, not differentiated.
    """
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
    work = torch.promote_types(dtype, torch.float32)
    device = deltas[0].device
    return [d.detach().reshape(-1).to(device=device, dtype=work) for d in deltas], shape, dtype


def _blocks(rows: list[Tensor], buffer: Tensor, masks: Tensor | None = None) -> Iterator[tuple[int, int, Tensor]]:
    """``(start, stop, x)`` over column blocks, ``x`` = the rows' entries ``start:stop`` stacked as (T, w),
    times ``masks[:, start:stop]`` when a boolean (T, N) ``masks`` is given.

    ``x`` is a view of ``buffer`` (at least T·min(N, _BLOCK) entries), overwritten by the next block; the
    caller may change it in place.
    """
    t, n = len(rows), rows[0].numel()
    for start in range(0, n, _BLOCK):
        stop = min(start + _BLOCK, n)
        x = buffer[: t * (stop - start)].view(t, stop - start)
        torch.stack([r[start:stop] for r in rows], out=x)
        if masks is not None:
            x.mul_(masks[:, start:stop].to(x.dtype))  # (a boolean operand would take a slow path)
        yield start, stop, x


def _sum_rows_(m: Tensor) -> Tensor:
    """Σ over the rows of ``m`` (T, w) by pairwise adds in place (``m`` is overwritten); a (w,) view.

    Pairwise: the rounding error is at most ``⌈log₂T⌉·u`` relative to ``Σ|m_i|``.
    """
    rows = m.shape[0]
    while rows > 1:
        half = rows // 2
        m[:half].add_(m[rows - half : rows])  # with an odd count the middle row waits a round
        rows -= half
    return m[0]


def _keep_count(density: float, n: int) -> int:
    """Entries kept per row by magnitude: ``max(1, floor(density·n + 1/2))``."""
    return max(1, math.floor(density * n + 0.5))


def _sample_size(n: int) -> int:
    """Entries sampled from a row of n: about (2n)^(2/3), which balances the sample's two selections
    against the band that a smaller sample leaves (its width falls as 1/sqrt(s))."""
    return min(n // 8, _SAMPLE, math.ceil((2.0 * n) ** (2 / 3)))


def _sample_index(n: int, s: int, device: torch.device) -> Tensor:
    """Stratified sample positions: one entry of each of s equal strides of ``range(n)``, at a scrambled
    offset within it (ascending, so the gather reads the row front to back)."""
    i = torch.arange(s, device=device)
    return i.mul(n).div_(s, rounding_mode="floor").add_(i.mul_(_SAMPLE_STRIDE).remainder_(n // s))


def _magnitude_thresholds(rows: list[Tensor], density: float) -> Tensor | None:
    """Per row, the k-th largest ``|x|`` (counting repeated values), as a (T, 1) column; None when k = N.

    ``k = max(1, floor(density·N + 1/2))``. Keeping ``|x| ≥`` this threshold keeps the top k entries, and
    all entries tied with the k-th (ties have probability zero for trained weights; then exactly k).

    Exact, without a sort or a selection over whole rows (``torch.kthvalue`` costs about 20 ns an entry on
    a CPU). A spread sample of s entries per row brackets the threshold: ``lo ≤ v < hi`` unless the sample
    misleads by more than 3.5 standard deviations (probability about 5e-4). One pass over each row,
    ``_ROW_BLOCK`` entries at a time, counts ``#(|x| ≥ hi)`` and ``#(lo ≤ |x| < hi)`` and collects the band
    ``[lo, hi)`` (a few percent of the row); the threshold is then the ``(k − #(|x| ≥ hi))``-th largest of
    the band. A row whose counts show that the bracket missed falls back to ``torch.kthvalue`` on the row.
    """
    t, n = len(rows), rows[0].numel()
    k = _keep_count(density, n)
    if k >= n:
        return None
    if n <= _EXACT_SELECT:
        return torch.stack(rows).abs_().kthvalue(n - k + 1, dim=1, keepdim=True).values
    s = _sample_size(n)
    index = _sample_index(n, s, rows[0].device)
    sample = torch.stack([r.index_select(0, index) for r in rows]).abs_()
    p = k / n
    margin = 3.5 * math.sqrt(s * p * (1.0 - p)) + 2.0
    top, bottom = math.floor(p * s - margin), math.ceil(p * s + margin)  # ranks from the largest, from 0
    inf = torch.full((t, 1), math.inf, dtype=sample.dtype, device=sample.device)
    if bottom < s:  # the bottom + 1 largest, then lo and hi among them
        largest = sample.topk(bottom + 1, dim=1, sorted=False).values
        lo = largest.amin(dim=1, keepdim=True)
        hi = largest.kthvalue(bottom + 1 - top, dim=1, keepdim=True).values if top >= 0 else inf
    else:
        lo = torch.zeros_like(inf)
        hi = sample.kthvalue(s - top, dim=1, keepdim=True).values if top >= 0 else inf
    # Groups of `group` entries are flagged when they hold a band entry (a fraction 1 − (1 − f)^group of
    # them for a band fraction f, aimed at about 0.2) and only those are gathered: a nonzero over groups
    # instead of over entries.
    group = 1 << max(0, min(6, round(math.log2(0.1 * s / margin))))
    width = min(n, _ROW_BLOCK)
    mag, high, band = (sample.new_empty(width) for _ in range(3))
    ones = sample.new_ones(group)
    thresholds = torch.empty(t, 1, dtype=sample.dtype, device=sample.device)
    for i, r in enumerate(rows):
        # Counts of blocks (exact in float32: at most 2^18) add up in float64, exact for any row length.
        above = sample.new_zeros((), dtype=torch.float64)  # #(|x| ≥ hi)
        inside = sample.new_zeros((), dtype=torch.float64)  # #(lo ≤ |x| < hi)
        found: list[Tensor] = []  # band values, and −1 for the other entries of the flagged groups
        for start in range(0, n, width):
            w = min(width, n - start)
            cut = w - w % group
            a = torch.abs(r[start : start + w], out=mag[:w])
            h = torch.ge(a, hi[i, 0], out=high[:w])
            above += h.sum()
            f = torch.ge(a, lo[i, 0], out=band[:w]).sub_(h)  # 1 in [lo, hi)
            if cut:
                counts = f[:cut].view(-1, group) @ ones
                inside += counts.sum()
                hit = counts.bool().nonzero().squeeze(1)
                flags = f[:cut].view(-1, group).index_select(0, hit)
                found.append(a[:cut].view(-1, group).index_select(0, hit).mul_(flags).add_(flags.sub_(1)).view(-1))
            if cut < w:
                inside += f[cut:].sum()
                found.append(a[cut:] * f[cut:] + (f[cut:] - 1))
        rank = k - int(above.item())  # the threshold's rank from the top within the band
        if 1 <= rank <= inside.item():
            values = torch.cat(found)
            values = values[values >= 0]
            thresholds[i] = values.kthvalue(values.numel() - rank + 1).values
        else:  # the sample's bracket missed this row
            thresholds[i] = r.abs().kthvalue(n - k + 1).values
    return thresholds


def _dare_masks(
    rows: list[Tensor], ws: list[float], density: float, generator: torch.Generator
) -> tuple[list[Tensor], Tensor]:
    """The tasks of non-zero weight and their DARE keep masks ``M_i`` (boolean, (T', N)), drawn in task order.

    ``M_i = [u < density]`` with ``u = torch.rand(N, generator=generator, dtype=torch.float64)``, drawn for
    every task (so that a zero weight does not shift the others' draws), on the generator's device and
    then moved, so a seed gives the same masks on CPU and GPU. ``uniform_`` into one reused buffer draws
    the same numbers as ``torch.rand``: the masks are those of every earlier version. (On a CPU the float64
    draws are most of DARE's cost: about 6–9 ns an entry, from one sequential stream.)
    """
    n = rows[0].numel()
    draws = torch.empty(n, dtype=torch.float64, device=generator.device)
    kept = [r for r, w in zip(rows, ws) if w != 0]
    masks = torch.empty(len(kept), n, dtype=torch.bool, device=rows[0].device)
    i = 0
    for w in ws:
        draws.uniform_(generator=generator)
        if w != 0:
            if masks.device == draws.device:
                torch.lt(draws, density, out=masks[i])
            else:
                masks[i].copy_(torch.lt(draws, density))
            i += 1
    return kept, masks


def _elect_and_mean(tau: Tensor, sign: SignMethod) -> Tensor:
    """TIES sign election and disjoint mean over the rows of ``tau`` (already trimmed and weighted).

    ``"total"``: ``γ = sgn(Σ_i τ_i)``; ``"frequency"``: ``γ = sgn(#{i: τ_i > 0} − #{i: τ_i < 0})``;
    a tie (0) elects +1. Result ``Σ_{i∈S} τ_i / max(1, |S|)`` with ``S = {i : τ_i ≠ 0, sgn τ_i = γ}``.
    The direct form, used for the few entries that `_ties_blocks` settles in float64.
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


def _column(values: list[float], like: Tensor) -> Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)


def _ties_blocks(
    rows: list[Tensor],
    thresholds: Tensor | None,
    ws: list[float],
    sign: SignMethod,
    buffer: Tensor,
    divisor: float | None = None,
    masks: Tensor | None = None,
) -> Tensor:
    """TIES election and disjoint mean of ``τ_i = w_i·(x_i ⊙ [|x_i| ≥ v_i]) / divisor`` in blocked passes.

    All ``w_i ≠ 0``; no trim where ``thresholds`` is None, no division where ``divisor`` is None; with
    ``masks`` (DARE's), ``x_i`` is ``ΔW_i ⊙ M_i``. Per entry, with ``y_i = sgn(w_i)·x_i·[|x_i| ≥ v_i]``
    (exact) and ``τ_i = c_i·y_i``, ``c_i = |w_i| / divisor``:
    ``n₊ = #{y_i > 0}``, ``n₋ = #{y_i < 0}`` (exact counts, so ``"frequency"`` elects exactly),
    ``P = Σ max(τ_i, 0)``, ``Q = Σ max(−τ_i, 0)``; ``"total"`` elects + iff ``S = Σ τ_i ≥ 0``, and the
    result is ``P / n₊`` or ``−Q / n₋`` (0 where no task votes). When all ``c_i`` are equal they multiply
    the sums instead of the entries. The pairwise sums carry a rounding error of at most
    ``(⌈log₂T⌉ + 1)·u·(P + Q)``, so the sign of the computed S is the float64 sign wherever
    ``|S| > 4(T + 1)·u·(P + Q)``; the rare entries inside that bound (exact cancellations included) are
    recomputed in float64 exactly as the float64 algorithm computes them (`_elect_and_mean`).
    """
    t, n = len(rows), rows[0].numel()
    like = rows[0]
    scratch = like.new_empty(2 * t * min(n, _BLOCK))
    out = like.new_empty(n)
    zero = like.new_zeros(())
    signs = _column([math.copysign(1.0, w) for w in ws], like)
    flip = any(w < 0 for w in ws)
    sizes = [abs(w) / (divisor or 1.0) for w in ws]
    uniform = all(c == sizes[0] for c in sizes)
    size = sizes[0] if uniform else _column(sizes, like)
    # With a threshold v_i > 0 a kept entry is non-zero, so the mask itself counts the voters.
    kept_count = thresholds is not None and bool((thresholds > 0).all())
    u = torch.finfo(like.dtype).eps / 2
    tiny = torch.finfo(like.dtype).smallest_normal * torch.finfo(like.dtype).eps
    unsure: list[Tensor] = []
    for start, stop, y in _blocks(rows, buffer, masks):
        w = stop - start
        a, b = scratch[: t * w].view(t, w), scratch[t * w : 2 * t * w].view(t, w)
        if thresholds is not None:
            y.mul_(torch.ge(torch.abs(y, out=a), thresholds, out=a))
        if kept_count:
            voters = _sum_rows_(a).clone()  # n₊ + n₋
        if flip:
            y.mul_(signs)
        torch.sign(y, out=a)
        if not kept_count:
            voters = _sum_rows_(torch.abs(a, out=b)).clone()
        diff = _sum_rows_(a).clone()  # n₊ − n₋
        if not uniform:
            y.mul_(size)
        pos = _sum_rows_(torch.clamp_min(y, 0, out=a))  # P (of y when uniform)
        if sign == "total":
            score = _sum_rows_(y)  # S (of y)
            neg = pos - score  # Q = P − S: no cancellation where − is elected (S < 0)
            bound = (pos + neg).mul_(4 * (t + 1) * u).add_(t * tiny)
            doubt = torch.le(score.abs(), bound, out=bound).mul_(torch.gt(voters, zero, out=b[0]))
            if doubt.amax().item() > 0:
                unsure.append(doubt.nonzero().squeeze(1).add_(start))
        else:
            score = diff
            neg = _sum_rows_(torch.clamp_max(y, 0, out=b)).neg()
        n_pos = voters.add(diff).mul_(0.5).clamp_min_(1)
        n_neg = voters.sub_(diff).mul_(0.5).clamp_min_(1)
        up = torch.ge(score, zero, out=score)  # elected sign +: 1, −: 0
        res = pos.div_(n_pos).mul_(up).sub_(neg.div_(n_neg).mul_(up.sub_(1).neg_()))
        out[start:stop] = res.mul_(size) if uniform else res
    if unsure:
        # As the float64 algorithm computes them: τ = (x ⊙ mask) [/ divisor] · w, then elect and mean.
        index = torch.cat(unsure)
        x = torch.stack([r[index] for r in rows]).to(torch.float64)
        if masks is not None:
            x = x * masks[:, index]
        if thresholds is not None:
            x = x * (x.abs() >= thresholds.to(torch.float64))
        if divisor is not None:
            x = x / divisor
        tau = x * torch.tensor(ws, dtype=torch.float64, device=x.device).unsqueeze(1)
        out[index] = _elect_and_mean(tau, sign).to(out.dtype)
    return out


def _weighted_sum_blocks(
    rows: list[Tensor],
    thresholds: Tensor | None,
    coefficients: list[float],
    buffer: Tensor,
    masks: Tensor | None = None,
) -> Tensor:
    """``Σ_i c_i·(x_i ⊙ [|x_i| ≥ v_i])`` in blocked passes (no trim where ``thresholds`` is None; with
    ``masks``, ``x_i`` is ``ΔW_i ⊙ M_i``)."""
    t, n = len(rows), rows[0].numel()
    like = rows[0]
    scratch = like.new_empty(t * min(n, _BLOCK))
    out = like.new_empty(n)
    coef = _column(coefficients, like)
    for start, stop, y in _blocks(rows, buffer, masks):
        if thresholds is not None:
            a = scratch[: y.numel()].view_as(y)
            y.mul_(torch.ge(torch.abs(y, out=a), thresholds, out=a))
        out[start:stop] = _sum_rows_(y.mul_(coef))
    return out


def _buffer(rows: list[Tensor]) -> Tensor:
    """The block buffer of `_blocks` for these rows."""
    return rows[0].new_empty(len(rows) * min(rows[0].numel(), _BLOCK))


def _nonzero_weights(rows: list[Tensor], ws: list[float]) -> tuple[list[Tensor], list[float]]:
    """The tasks of non-zero weight (a zero weight makes ``τ_i = 0``: no vote, nothing in any sum)."""
    pairs = [(r, w) for r, w in zip(rows, ws) if w != 0]
    return [r for r, _ in pairs], [w for _, w in pairs]


def ties(deltas: Sequence[Tensor], weights: Sequence[float], density: float, sign: SignMethod = "total") -> Tensor:
    """TIES merging (Yadav et al. 2023) of one layer's deltas, entrywise on the flattened tensors.

    1. Trim: ``t_i = ΔW_i ⊙ m_i``, ``m_i`` keeping the top-``density`` fraction of entries of ``ΔW_i`` by
       magnitude (``k = max(1, round_half_up(density·numel))``, per layer: the caller passes one layer;
       entries tied with the k-th largest magnitude are all kept).
    2. Weight: ``τ_i = w_i · t_i``. The weights enter here, **before** the sign election, so a negative
       weight turns a task vector into its negation (task removal) and it then votes with its flipped
       sign. (PEFT's ``ties`` instead elects on the unweighted ``t_i`` and applies ``w_i`` only inside the
       mean, so a negated task is averaged in against the sign it voted for.)
    3. Elect, per entry: ``"total"``: ``γ = sgn(Σ_i τ_i)``; ``"frequency"``: the sign held by more
       tasks, ``γ = sgn(#{i: τ_i > 0} − #{i: τ_i < 0})``; a tie elects +1.
    4. Disjoint mean: ``Σ_{i∈S} τ_i / |S|`` over ``S = {i : τ_i ≠ 0, sgn τ_i = γ}`` (0 where S is empty).

    As in PEFT, the weights are not normalised and there is no extra λ: with all ``w_i = 1`` and identical
    deltas the result is the (trimmed) delta itself. Returns the shape and promoted dtype of the inputs.
    Steps 1 and 3 are exact (the entries and signs of a float64 computation); the sums of step 4 are
    rounded in the working dtype (see the module docstring).
    """
    rows, shape, dtype = _dense_rows(deltas)
    ws = _check_weights(weights, len(rows))
    density = _check_density(density)
    sign = _check_sign(sign)
    rows, ws = _nonzero_weights(rows, ws)
    if not rows:
        return deltas[0].new_zeros(shape, dtype=dtype)
    buffer = _buffer(rows)
    thresholds = _magnitude_thresholds(rows, density)
    return _ties_blocks(rows, thresholds, ws, sign, buffer).reshape(shape).to(dtype)


def magnitude_prune(deltas: Sequence[Tensor], weights: Sequence[float], density: float) -> Tensor:
    """Weighted sum of magnitude-trimmed deltas: ``Σ_i w_i · (ΔW_i ⊙ m_i)``.

    ``m_i`` keeps the top-``density`` fraction of the entries of ``ΔW_i`` by magnitude, as in `ties`.
    """
    rows, shape, dtype = _dense_rows(deltas)
    ws = _check_weights(weights, len(rows))
    density = _check_density(density)
    rows, ws = _nonzero_weights(rows, ws)
    if not rows:
        return deltas[0].new_zeros(shape, dtype=dtype)
    buffer = _buffer(rows)
    thresholds = _magnitude_thresholds(rows, density)
    return _weighted_sum_blocks(rows, thresholds, ws, buffer).reshape(shape).to(dtype)


def dare_linear(
    deltas: Sequence[Tensor], weights: Sequence[float], density: float, generator: torch.Generator
) -> Tensor:
    """DARE (Yu et al. 2023) then task arithmetic: ``Σ_i w_i · (ΔW_i ⊙ M_i) / density``.

    ``M_i`` keeps each entry independently with probability ``density`` (drop rate ``p = 1 − density``),
    drawn from ``generator`` in task order as ``torch.rand(numel, dtype=float64) < density``; the
    rescaling by ``1/density`` makes the expectation equal ``Σ_i w_i ΔW_i``. Seed the generator for a
    reproducible combination.
    """
    rows, shape, dtype = _dense_rows(deltas)
    ws = _check_weights(weights, len(rows))
    density = _check_density(density)
    kept, masks = _dare_masks(rows, ws, density, generator)
    if not kept:
        return deltas[0].new_zeros(shape, dtype=dtype)
    coefficients = [w / density for w in ws if w != 0]
    return _weighted_sum_blocks(kept, None, coefficients, _buffer(kept), masks).reshape(shape).to(dtype)


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
    rows, shape, dtype = _dense_rows(deltas)
    ws = _check_weights(weights, len(rows))
    density = _check_density(density)
    sign = _check_sign(sign)
    kept, masks = _dare_masks(rows, ws, density, generator)
    if not kept:
        return deltas[0].new_zeros(shape, dtype=dtype)
    nonzero = [w for w in ws if w != 0]
    result = _ties_blocks(kept, None, nonzero, sign, _buffer(kept), divisor=density, masks=masks)
    return result.reshape(shape).to(dtype)
