"""Fused generalized task arithmetic: one pass over K sources + base writes the merged tensor.

Covers mergekit 0.1.5's ``GeneralizedTaskArithmeticMerge`` family: task_arithmetic (Ilharco et al. 2023,
arXiv 2212.04089), ties (Yadav et al. 2023, arXiv 2306.01708), dare_ties / dare_linear (Yu et al. 2024,
arXiv 2311.03099), breadcrumbs / breadcrumbs_ties (Davari & Belilovsky 2024, arXiv 2312.06795), della /
della_linear (Deep et al. 2024, arXiv 2406.11617). For each non-base source k (weight w_k):

    d_k   = x_k - base                                    delta
    d_k  <- d_k * keep_k * s_k                            sparsify; s_k = ||d_k||_1 / ||d_k * keep_k||_1 (rescale)
    e_k   = w_k * d_k                                     weighted delta
    maj   = sign(sum_k e_k) (ties "sum") or sign(sum_k sign e_k) ("count"), 0 counting as +
    mix   = sum_k e_k [sign e_k == maj]      (consensus)  or  sum_k e_k   (no consensus)
    div   = sum_k w_k [sign e_k == maj], 0 -> 1           or  sum_k w_k, |.| < 1e-8 -> 1
    out   = base + lam * (mix / div if normalize else mix)

The kernel keeps the TIES election in one pass without storing the K deltas: it accumulates the positive and
negative parts (and their weight sums) separately and picks one side once the majority sign is known.

Sources are passed as a tuple of pointers (Triton tuple arguments), not a stacked (K, n) tensor: the resident
sources of the PS runtime are separate parameter tensors, and stacking them would copy K tensors per merge -
more traffic than the merge itself. The tuple also lets each source keep its own storage dtype.

Masks. ``magnitude`` / ``magnitude_outliers`` keep a band of sorted positions of |d_k| (see reductions.py;
ties broken by flat index). DARE keeps with probability ``density``; DELLA with probability
``density - eps + 2 eps * rank / (n_cols - 1)`` over each row's magnitude ranks. Both draw ``u`` from
Philox4x32-10 (``tl.randint4x``) with the counter ``index // 4 + k * 2**40`` (element ``index`` takes one of
the four lanes): keyed by the global flat element index and the source number, so a mask depends on the seed
only - not on BLOCK, the grid or the launch - and one Philox call serves four elements (at bf16 and H100
bandwidth, one call per element would make DARE compute-bound by an estimated ~4x). It differs from torch's RNG,
so the reference accepts ``masks=`` and the tests check the rest of the computation given the kernel's masks.

Limitations: compute is fp32 whatever the storage dtype (mergekit computes in the storage dtype, so bf16
results differ from mergekit's by bf16 rounding); inputs must be contiguous and of one shape; DELLA on a
tensor whose ranked dimension has length 1 (where mergekit divides 0 by 0 and fails) keeps with probability
``density``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dfsmerge.errors import MergeError

from ._common import GTA_METHODS, check_kernel_mode, check_triton_inputs, promoted_dtype, tl, triton
from .reductions import (
    KEEP_ALL_HI,
    KEEP_ALL_LO,
    KEEP_NONE_HI,
    KEEP_NONE_LO,
    band_positions,
    della_ranks,
    sorted_position_pair,
)

RESCALE_EPS = 1e-7  # mergekit's rescaled_masked_tensor eps
NF = 8  # floats per source in the parameter table
_F_WEIGHT, _F_LO, _F_HI, _F_PLO, _F_PSPAN, _F_SCALE = range(6)
SOURCE_STRIDE = 1 << 40  # Philox counter offset between sources (flat indices stay below 2**40)


# ----------------------------------------------------------------------------------------------------------
# PyTorch reference (eager, fp32)
# ----------------------------------------------------------------------------------------------------------


def reference_keep_mask(
    sparsification: str,
    delta: torch.Tensor,
    *,
    density: float,
    gamma: float,
    epsilon: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Boolean keep mask of one fp32 delta, as mergekit's sparsify computes it (stable tie order).

    Args:
        sparsification: ``magnitude``, ``magnitude_outliers``, ``random`` or ``della_magprune``.
        delta: fp32 delta, any shape.
        density, gamma, epsilon: the source's parameters.
        generator: torch RNG for ``random`` / ``della_magprune``.

    Returns:
        Bool tensor shaped like ``delta``.

    Raises:
        MergeError: DELLA with ``density +- epsilon`` outside (0, 1).
    """
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    a = delta.abs()
    if sparsification in ("magnitude", "magnitude_outliers"):
        band = band_positions(sparsification, n, density, gamma)
        keep = torch.zeros(n, dtype=torch.bool, device=delta.device)
        if band != "none":
            order = torch.sort(a.flatten(), stable=True).indices  # ascending, ties by flat index
            keep[order[band[0] : band[1] + 1]] = True
        return keep.reshape(delta.shape)
    if sparsification == "random":
        probs = torch.full_like(delta, max(density, 0.0))
        return torch.bernoulli(probs, generator=generator).bool()
    if sparsification == "della_magprune":
        if density <= 0:
            return torch.zeros_like(delta, dtype=torch.bool)
        _check_della(density, epsilon)
        a2 = a.unsqueeze(0) if a.dim() == 1 else a
        n_cols = a2.shape[1]
        ranks = torch.argsort(torch.argsort(a2, dim=1, stable=True), dim=1).float()  # 0-based row ranks
        if n_cols > 1:
            probs = (density - epsilon) + (ranks / (n_cols - 1)).clamp(0, 1) * 2 * epsilon
        else:
            probs = torch.full_like(ranks, density)
        return torch.bernoulli(probs, generator=generator).bool().reshape(delta.shape)
    raise MergeError(f"sparsification={sparsification!r} is unknown")


def gta_reference(
    method: str,
    base: torch.Tensor,
    sources: Sequence[torch.Tensor],
    *,
    weights: Sequence[float],
    densities: Sequence[float],
    gammas: Sequence[float],
    epsilons: Sequence[float],
    normalize: bool,
    rescale: bool,
    lam: float,
    seed: int = 0,
    masks: Sequence[torch.Tensor] | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Eager fp32 generalized task arithmetic (the semantics the kernel must reproduce).

    Args:
        method: a name in ``GTA_METHODS``.
        base: base tensor.
        sources: the K non-base tensors, shaped like ``base``.
        weights, densities, gammas, epsilons: per source.
        normalize, rescale, lam: shared parameters.
        seed: seeds a ``torch.Generator`` for the random methods (masks differ from the kernel's Philox masks).
        masks: optional K keep masks used instead of computing them (to check the kernel given its masks).
        out_dtype: result dtype (default: promoted dtype of the inputs, as mergekit).

    Returns:
        The merged tensor.
    """
    spec = GTA_METHODS[method]
    out_dtype = out_dtype or promoted_dtype([base, *sources])
    if not sources:
        return base.to(out_dtype, copy=True)
    b = base.float()
    generator = torch.Generator(device=base.device).manual_seed(seed)
    deltas = []
    for k, x in enumerate(sources):
        d = x.float() - b
        if spec.sparsification is not None:
            if masks is not None:
                keep = masks[k].bool()
            else:
                keep = reference_keep_mask(
                    spec.sparsification, d, density=densities[k], gamma=gammas[k], epsilon=epsilons[k],
                    generator=generator,
                )
            masked = d * keep
            if rescale:
                before, after = d.abs().sum(), masked.abs().sum()
                if before >= RESCALE_EPS and after >= RESCALE_EPS:
                    masked = masked * (before / after)
            d = masked
        deltas.append(d * weights[k])
    e = torch.stack(deltas)  # (K, *shape) weighted deltas
    w = torch.tensor(weights, dtype=torch.float32, device=base.device).view(-1, *([1] * base.dim()))  # (K, 1..)
    if spec.consensus is not None:
        if spec.consensus == "sum":
            majority = torch.where(e.sum(0) >= 0, 1.0, -1.0)
        else:
            majority = torch.where(e.sign().sum(0) >= 0, 1.0, -1.0)
        agree = e.sign() == majority  # (K, *shape)
        mixed = (e * agree).sum(0)
        divisor = (w * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = e.sum(0)
        divisor = w.sum(0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return (b + mixed * lam).to(out_dtype)


def _check_della(density: float, epsilon: float) -> None:
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise MergeError(
            f"della: density={density} with epsilon={epsilon} puts density +- epsilon outside (0, 1); "
            f"choose epsilon < min(density, 1 - density)"
        )


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _uniform(
    seed,  # Philox seed
    start,  # int64 global flat index of the block's first element (a multiple of 4)
    k: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One Philox4x32 call per 4 elements (the RNG, not memory, would bound DARE otherwise): element e draws a
    # fixed lane of philox(seed, e // 4 + k * 2**40), so the draw depends on (seed, k, e) only.
    groups = start // 4 + tl.arange(0, BLOCK // 4) + k * 1099511627776  # (BLOCK/4,) int64 counters
    r0, r1, r2, r3 = tl.randint4x(seed, groups)  # 4 x (BLOCK/4,) uint32
    r = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), [BLOCK])  # (BLOCK/4, 2, 2) -> (BLOCK,)
    return (r >> 8).to(tl.float32) * 5.960464477539063e-08  # top 24 bits * 2**-24: uniform in [0, 1)


@triton.jit
def _keep_mask(
    a,  # (BLOCK,) fp32 |delta| of source k
    offs,  # (BLOCK,) int64 global flat element indices
    start,  # int64 global index of offs[0]
    valid,  # (BLOCK,) bool: offs < n
    rank_ptr,  # int32 DELLA 0-based row ranks of source k (read only when SPARSIFY == 3)
    fparams_ptr,  # (K, NF) fp32 per-source parameter table
    iparams_ptr,  # (K, 2) int64 per-source band tie-break indices
    seed,  # Philox seed
    rank_denom,  # fp32: n_cols - 1 of DELLA's ranked dimension (1 when n_cols == 1)
    k: tl.constexpr,
    SPARSIFY: tl.constexpr,
    NF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    if SPARSIFY == 1:  # sorted-position band (TIES magnitude, breadcrumbs)
        lo = tl.load(fparams_ptr + k * NF + 1)
        hi = tl.load(fparams_ptr + k * NF + 2)
        lo_i = tl.load(iparams_ptr + k * 2 + 0)
        hi_i = tl.load(iparams_ptr + k * 2 + 1)
        above = (a > lo) | ((a == lo) & (offs >= lo_i))
        below = (a < hi) | ((a == hi) & (offs <= hi_i))
        keep = above & below
    elif SPARSIFY == 2:  # DARE: Bernoulli(density)
        p = tl.load(fparams_ptr + k * NF + 3)
        u = _uniform(seed, start, k, BLOCK)
        keep = u < p
    elif SPARSIFY == 3:  # DELLA MAGPRUNE: Bernoulli(p_lo + rank_norm * p_span)
        p_lo = tl.load(fparams_ptr + k * NF + 3)
        p_span = tl.load(fparams_ptr + k * NF + 4)
        r = tl.load(rank_ptr + offs, mask=valid, other=0).to(tl.float32)
        rank_norm = tl.minimum(tl.maximum(r / rank_denom, 0.0), 1.0)
        u = _uniform(seed, start, k, BLOCK)
        keep = u < p_lo + rank_norm * p_span
    else:
        keep = valid | (~valid)
    return keep


@triton.jit(do_not_specialize=["seed"])
def _gta_merge_kernel(
    srcs,  # tuple of K pointers: the non-base sources, n elements each (fp32/fp16/bf16)
    base_ptr,  # base tensor, n elements
    out_ptr,  # output, n elements (may alias base or a resident parameter's storage)
    ranks,  # tuple of K int32 pointers: DELLA row ranks per source (placeholders unless SPARSIFY == 3)
    fparams_ptr,  # (K, NF) fp32: weight, band lo, band hi, p_lo, p_span, rescale factor
    iparams_ptr,  # (K, 2) int64: band lo / hi tie-break flat indices
    div_ptr,  # (1,) fp32: no-consensus divisor sum_k w_k (|.| < 1e-8 -> 1)
    n,  # number of elements
    seed,  # Philox seed for DARE / DELLA
    rank_denom,  # fp32 DELLA rank normaliser
    lam,  # fp32 lambda
    K: tl.constexpr,
    SPARSIFY: tl.constexpr,  # 0 none, 1 band, 2 random, 3 della
    RESCALE: tl.constexpr,
    CONSENSUS: tl.constexpr,  # 0 none, 1 sum, 2 count
    NORMALIZE: tl.constexpr,
    NF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)  # (BLOCK,) int64 global indices
    valid = offs < n
    b = tl.load(base_ptr + offs, mask=valid, other=0).to(tl.float32)
    total = tl.zeros([BLOCK], dtype=tl.float32)  # sum_k e_k
    pos = tl.zeros([BLOCK], dtype=tl.float32)  # sum of positive e_k
    neg = tl.zeros([BLOCK], dtype=tl.float32)  # sum of negative e_k
    w_pos = tl.zeros([BLOCK], dtype=tl.float32)  # sum of w_k with e_k > 0
    w_neg = tl.zeros([BLOCK], dtype=tl.float32)
    votes = tl.zeros([BLOCK], dtype=tl.float32)  # sum_k sign(e_k)
    for k in tl.static_range(K):
        x = tl.load(srcs[k] + offs, mask=valid, other=0).to(tl.float32)
        d = x - b
        if SPARSIFY != 0:
            keep = _keep_mask(
                tl.abs(d), offs, start, valid, ranks[k], fparams_ptr, iparams_ptr, seed, rank_denom, k, SPARSIFY,
                NF, BLOCK,
            )
            d = tl.where(keep, d, 0.0)
            if RESCALE:
                d = d * tl.load(fparams_ptr + k * NF + 5)
        w = tl.load(fparams_ptr + k * NF + 0)
        e = d * w
        total += e
        if CONSENSUS != 0:
            is_pos = e > 0
            is_neg = e < 0
            pos += tl.where(is_pos, e, 0.0)
            neg += tl.where(is_neg, e, 0.0)
            w_pos += tl.where(is_pos, w, 0.0)
            w_neg += tl.where(is_neg, w, 0.0)
            votes += is_pos.to(tl.float32) - is_neg.to(tl.float32)
    if CONSENSUS == 0:
        mixed = total
        if NORMALIZE:
            mixed = mixed / tl.load(div_ptr)
    else:
        if CONSENSUS == 1:  # noqa: SIM108 (constexpr branch: only one side is compiled)
            majority_pos = total >= 0
        else:
            majority_pos = votes >= 0
        mixed = tl.where(majority_pos, pos, neg)
        if NORMALIZE:
            div = tl.where(majority_pos, w_pos, w_neg)
            div = tl.where(div == 0, 1.0, div)
            mixed = mixed / div
    result = b + mixed * lam
    tl.store(out_ptr + offs, result.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit(do_not_specialize=["seed"])
def _gta_l1_kernel(
    srcs,  # tuple of K pointers: the non-base sources
    base_ptr,  # base tensor, n elements
    ranks,  # tuple of K int32 pointers: DELLA row ranks (placeholders unless SPARSIFY == 3)
    fparams_ptr,  # (K, NF) fp32 per-source parameter table
    iparams_ptr,  # (K, 2) int64 band tie-break indices
    partial_ptr,  # (G, K, 2) fp32 out: per-program [sum |d_k|, sum |d_k * keep_k|]
    n,  # number of elements
    seed,  # Philox seed
    rank_denom,  # fp32 DELLA rank normaliser
    K: tl.constexpr,
    SPARSIFY: tl.constexpr,
    NF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    valid = offs < n
    b = tl.load(base_ptr + offs, mask=valid, other=0).to(tl.float32)
    for k in tl.static_range(K):
        x = tl.load(srcs[k] + offs, mask=valid, other=0).to(tl.float32)
        a = tl.abs(x - b)
        keep = _keep_mask(
            a, offs, start, valid, ranks[k], fparams_ptr, iparams_ptr, seed, rank_denom, k, SPARSIFY, NF, BLOCK
        )
        tl.store(partial_ptr + (pid * K + k) * 2 + 0, tl.sum(a, axis=0))
        tl.store(partial_ptr + (pid * K + k) * 2 + 1, tl.sum(tl.where(keep & valid, a, 0.0), axis=0))


@triton.jit(do_not_specialize=["seed"])
def _gta_mask_kernel(
    srcs,  # tuple of K pointers: the non-base sources
    base_ptr,  # base tensor, n elements
    ranks,  # tuple of K int32 pointers: DELLA row ranks (placeholders unless SPARSIFY == 3)
    masks,  # tuple of K int8 pointers out: keep mask of each source, n elements
    fparams_ptr,  # (K, NF) fp32 per-source parameter table
    iparams_ptr,  # (K, 2) int64 band tie-break indices
    n,  # number of elements
    seed,  # Philox seed
    rank_denom,  # fp32 DELLA rank normaliser
    K: tl.constexpr,
    SPARSIFY: tl.constexpr,
    NF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    valid = offs < n
    b = tl.load(base_ptr + offs, mask=valid, other=0).to(tl.float32)
    for k in tl.static_range(K):
        x = tl.load(srcs[k] + offs, mask=valid, other=0).to(tl.float32)
        keep = _keep_mask(
            tl.abs(x - b), offs, start, valid, ranks[k], fparams_ptr, iparams_ptr, seed, rank_denom, k, SPARSIFY,
            NF, BLOCK,
        )
        tl.store(masks[k] + offs, keep.to(tl.int8), mask=valid)


# ----------------------------------------------------------------------------------------------------------
# Wrapper
# ----------------------------------------------------------------------------------------------------------

_SPARSIFY_CODE = {None: 0, "magnitude": 1, "magnitude_outliers": 1, "random": 2, "della_magprune": 3}
_CONSENSUS_CODE = {None: 0, "sum": 1, "count": 2}


def _prepare(
    spec_sparsification: str | None,
    base: torch.Tensor,
    sources: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    gammas: Sequence[float],
    epsilons: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...], float, int]:
    """Per-source parameter tables (on device, no host sync except the band tie-break), DELLA ranks."""
    dev, n = base.device, base.numel()
    f_rows, i_rows, ranks = [], [], []
    rank_denom = 1.0
    b = base.float() if spec_sparsification in ("magnitude", "magnitude_outliers", "della_magprune") else None
    for k, x in enumerate(sources):
        lo, hi = KEEP_ALL_LO, KEEP_ALL_HI
        p_lo, p_span = 1.0, 0.0
        dens = densities[k]
        if spec_sparsification in ("magnitude", "magnitude_outliers"):
            band = band_positions(spec_sparsification, n, dens, gammas[k])
            if band == "none":
                lo, hi = KEEP_NONE_LO, KEEP_NONE_HI
            elif band != "all":
                a = (x.float() - b).abs().flatten()  # (n,) fp32, the same |d| the kernel computes
                lo = sorted_position_pair(a, band[0])
                hi = KEEP_ALL_HI if band[1] == n - 1 else sorted_position_pair(a, band[1])
                del a
        elif spec_sparsification == "random":
            p_lo = min(max(dens, 0.0), 1.0)
        elif spec_sparsification == "della_magprune" and dens < 1:
            if dens <= 0:
                p_lo = 0.0
            else:
                _check_della(dens, epsilons[k])
                r, n_cols = della_ranks((x.float() - b).abs())
                ranks.append(r)
                rank_denom = float(max(n_cols - 1, 1))
                p_lo, p_span = (dens - epsilons[k], 2 * epsilons[k]) if n_cols > 1 else (dens, 0.0)
        f_rows.append(
            torch.stack(
                [
                    torch.as_tensor(float(weights[k]), dtype=torch.float32, device=dev),
                    torch.as_tensor(lo[0], dtype=torch.float32, device=dev),
                    torch.as_tensor(hi[0], dtype=torch.float32, device=dev),
                    torch.as_tensor(p_lo, dtype=torch.float32, device=dev),
                    torch.as_tensor(p_span, dtype=torch.float32, device=dev),
                    torch.ones((), dtype=torch.float32, device=dev),
                    torch.zeros((), dtype=torch.float32, device=dev),
                    torch.zeros((), dtype=torch.float32, device=dev),
                ]
            )
        )
        i_rows.append(
            torch.stack(
                [torch.as_tensor(lo[1], dtype=torch.int64, device=dev),
                 torch.as_tensor(hi[1], dtype=torch.int64, device=dev)]
            )
        )
        if len(ranks) < k + 1:
            ranks.append(None)  # no ranks: not DELLA, or a keep-all / keep-none DELLA source (p_span = 0)
    fparams = torch.stack(f_rows).contiguous()  # (K, NF)
    iparams = torch.stack(i_rows).contiguous()  # (K, 2)
    code = _SPARSIFY_CODE[spec_sparsification]
    real = [r for r in ranks if r is not None]
    if code == 3 and not real:
        code = 2  # every DELLA source keeps all or none: p_lo alone decides, no rank is read
    # Placeholders must still be valid int32 buffers of n elements when SPARSIFY == 3 reads them (p_span = 0).
    filler = real[0] if real else base
    rank_ptrs = tuple(r if r is not None else filler for r in ranks)
    return fparams, iparams, rank_ptrs, rank_denom, code


def _seed(seed: int) -> int:
    return int(seed) & (2**63 - 1)


def _check_block(block: int) -> None:
    if block < 16 or block & (block - 1):
        raise MergeError(f"block={block} is not a power of two >= 16; use e.g. 1024")


@dataclass(frozen=True, slots=True)
class GTAPlan:
    """Everything the fused merge pass reads besides the tensors: built by ``gta_plan`` (thresholds, ranks,
    rescale factors: the reductions), launched by ``gta_apply`` (the one elementwise pass). Reusable for
    every launch with the same sources, parameters and seed.

    Attributes:
        method: name in ``GTA_METHODS``.
        fparams: (K, NF) fp32 per-source table on the device.
        iparams: (K, 2) int64 band tie-break indices on the device.
        rank_ptrs: K int32 DELLA rank tensors (placeholders otherwise).
        rank_denom: DELLA rank normaliser.
        divisor: (1,) fp32 no-consensus divisor on the device.
        sparsify: kernel SPARSIFY code. rescale: whether fparams holds rescale factors.
        normalize, lam, seed: shared parameters.
    """

    method: str
    fparams: torch.Tensor
    iparams: torch.Tensor
    rank_ptrs: tuple[torch.Tensor, ...]
    rank_denom: float
    divisor: torch.Tensor
    sparsify: int
    rescale: bool
    normalize: bool
    lam: float
    seed: int


def gta_plan(
    method: str,
    base: torch.Tensor,
    sources: Sequence[torch.Tensor],
    *,
    weights: Sequence[float],
    densities: Sequence[float],
    gammas: Sequence[float],
    epsilons: Sequence[float],
    normalize: bool,
    rescale: bool,
    lam: float,
    seed: int = 0,
    block: int = 1024,
    num_warps: int = 4,
) -> GTAPlan:
    """Run the reductions of a fused GTA merge (torch thresholds / ranks, the L1 rescale kernel).

    Args: as ``gta_triton``.

    Returns:
        The plan ``gta_apply`` launches.

    Raises:
        MergeError: unsupported input, or invalid DELLA parameters.
    """
    spec = GTA_METHODS[method]
    check_triton_inputs(f"{method} (fused GTA kernel)", [base, *sources], None)
    check_kernel_mode(_gta_merge_kernel, base.device, f"{method} (fused GTA kernel)")
    _check_block(block)
    fparams, iparams, rank_ptrs, rank_denom, code = _prepare(
        spec.sparsification, base, sources, weights, densities, gammas, epsilons
    )
    n, K = base.numel(), len(sources)
    do_rescale = bool(rescale and code != 0 and n > 0 and K > 0)
    if do_rescale:
        grid = (triton.cdiv(n, block),)
        partial = torch.empty((grid[0], K, 2), dtype=torch.float32, device=base.device)
        _gta_l1_kernel[grid](
            tuple(sources), base, rank_ptrs, fparams, iparams, partial, n, _seed(seed), rank_denom,
            K=K, SPARSIFY=code, NF=NF, BLOCK=block, num_warps=num_warps,
        )
        sums = partial.double().sum(0).float()  # (K, 2): [||d||_1, ||d * keep||_1]
        before, after = sums[:, 0], sums[:, 1]
        ok = (before >= RESCALE_EPS) & (after >= RESCALE_EPS)
        fparams[:, _F_SCALE] = torch.where(ok, before / torch.where(ok, after, 1.0), 1.0)
    w = torch.tensor(list(weights), dtype=torch.float32, device=base.device)
    div = w.sum().reshape(1)
    div = torch.where(div.abs() < 1e-8, torch.ones_like(div), div)
    return GTAPlan(method, fparams, iparams, rank_ptrs, rank_denom, div, code, do_rescale, bool(normalize),
                   float(lam), _seed(seed))


def gta_apply(
    plan: GTAPlan,
    base: torch.Tensor,
    sources: Sequence[torch.Tensor],
    out: torch.Tensor,
    *,
    block: int = 1024,
    num_warps: int = 4,
) -> torch.Tensor:
    """Launch the one fused pass: reads base + K sources once, writes ``out`` once.

    Args:
        plan: from ``gta_plan`` with the same base and sources.
        base, sources: the tensors the plan was built for.
        out: output (may alias base / resident parameter storage).
        block: elements per program (results do not depend on it).
        num_warps: Triton launch option.

    Returns:
        ``out``.

    Raises:
        MergeError: unsupported ``out``.
    """
    check_triton_inputs(f"{plan.method} (fused GTA kernel)", [base, *sources], out)
    _check_block(block)
    n = base.numel()
    if n == 0:
        return out
    if not sources:
        out.copy_(base)
        return out
    _gta_merge_kernel[(triton.cdiv(n, block),)](
        tuple(sources), base, out, plan.rank_ptrs, plan.fparams, plan.iparams, plan.divisor, n, plan.seed,
        plan.rank_denom, plan.lam,
        K=len(sources), SPARSIFY=plan.sparsify, RESCALE=plan.rescale,
        CONSENSUS=_CONSENSUS_CODE[GTA_METHODS[plan.method].consensus], NORMALIZE=plan.normalize, NF=NF,
        BLOCK=block, num_warps=num_warps,
    )
    return out


def gta_triton(
    method: str,
    base: torch.Tensor,
    sources: Sequence[torch.Tensor],
    *,
    weights: Sequence[float],
    densities: Sequence[float],
    gammas: Sequence[float],
    epsilons: Sequence[float],
    normalize: bool,
    rescale: bool,
    lam: float,
    seed: int = 0,
    out: torch.Tensor | None = None,
    block: int = 1024,
    num_warps: int = 4,
) -> torch.Tensor:
    """Run the fused GTA merge with Triton: ``gta_plan`` (reductions) then ``gta_apply`` (one pass).

    Args:
        method: a name in ``GTA_METHODS``.
        base: base tensor (contiguous, fp32/fp16/bf16; CUDA, or CPU under ``TRITON_INTERPRET=1``).
        sources: the K non-base tensors, same shape/device/layout as ``base`` (dtypes may differ).
        weights, densities, gammas, epsilons: per source.
        normalize, rescale, lam: shared parameters.
        seed: Philox seed of the DARE / DELLA masks.
        out: output tensor (may be ``base`` itself or resident parameter storage); allocated when None in the
            inputs' promoted dtype.
        block: elements per program (a power of two; results do not depend on it).
        num_warps: Triton launch option.

    Returns:
        ``out``.

    Raises:
        MergeError: unsupported dtype / device / layout / shape, or invalid DELLA parameters.
    """
    check_triton_inputs(f"{method} (fused GTA kernel)", [base, *sources], out)
    if out is None:
        out = torch.empty_like(base, dtype=promoted_dtype([base, *sources]))
    plan = gta_plan(
        method, base, sources, weights=weights, densities=densities, gammas=gammas, epsilons=epsilons,
        normalize=normalize, rescale=rescale, lam=lam, seed=seed, block=block, num_warps=num_warps,
    )
    return gta_apply(plan, base, sources, out, block=block, num_warps=num_warps)


def gta_masks_triton(
    method: str,
    base: torch.Tensor,
    sources: Sequence[torch.Tensor],
    *,
    densities: Sequence[float],
    gammas: Sequence[float],
    epsilons: Sequence[float],
    seed: int = 0,
    block: int = 1024,
) -> list[torch.Tensor]:
    """Debug path: the keep masks the fused kernel uses (bool, one per source), from the same ``_keep_mask``.

    Args:
        method: a sparsifying name in ``GTA_METHODS``.
        base, sources: as for ``gta_triton``.
        densities, gammas, epsilons: per source.
        seed: Philox seed.
        block: elements per program.

    Returns:
        K bool tensors shaped like ``base``.

    Raises:
        MergeError: as ``gta_triton``, or a method without sparsification.
    """
    spec = GTA_METHODS[method]
    if spec.sparsification is None:
        raise MergeError(f"{method}: has no sparsification mask; use ties, dare_*, breadcrumbs* or della*")
    check_triton_inputs(f"{method} (mask kernel)", [base, *sources], None)
    check_kernel_mode(_gta_mask_kernel, base.device, f"{method} (mask kernel)")
    _check_block(block)
    masks = [torch.empty(base.shape, dtype=torch.int8, device=base.device) for _ in sources]
    n = base.numel()
    if n == 0 or not sources:
        return [m.bool() for m in masks]
    fparams, iparams, rank_ptrs, rank_denom, code = _prepare(
        spec.sparsification, base, sources, [1.0] * len(sources), densities, gammas, epsilons
    )
    grid = (triton.cdiv(n, block),)
    _gta_mask_kernel[grid](
        tuple(sources), base, rank_ptrs, tuple(masks), fparams, iparams, n, _seed(seed), rank_denom,
        K=len(sources), SPARSIFY=code, NF=NF, BLOCK=block,
    )
    return [m.bool() for m in masks]
