"""The fast truncated SVD of extract: adaptive randomized block Krylov, with its Krylov products optionally in bf16.

`svd_adaptive` is a pure function of tensors. `sketch_dtype` resolves the user's precision choice ("auto", "fp32",
"bf16") for a device: bf16 only where the hardware multiplies it natively (`native_bf16`), else the matrix's dtype.

Measured alternatives of `svd_adaptive` at rank 128, kept out: oversample 16 (blocks of 72) halves the median excess
for ~12 % more CPU; blocks of 48-56 gain nothing more (more blocks, more fixed costs) for 1.5-2x the worst excess;
stopping a block earlier (4 blocks of 64: +1.2-1.4 % median) breaks the rule; blocks of rank + oversample columns
cut the excess 5-10x for 1.5-2x the time; int8 products (VNNI, 1.5-2x a bf16 GEMM) lose it again quantizing the
matrix; z rows and Gram in bf16 save ~3 % but leave vh orthonormal only to ~1e-3. On a core whose bf16 GEMMs run 4x
its fp32 ones (401 against 92-100 GF/s), where the eigen-solves and fp32 GEMMs take two thirds of a layer: blocks of
96 or 128 (fewer, larger Grams) cost 25-35 % more; CholeskyQR2 is no faster than Householder QR on a 1280x64 block
(0.55 against 0.48 ms); a Rayleigh-Ritz restarted on 192 Ritz vectors solves smaller Grams but needs eigenvectors
every block, for no gain and +0.10 % excess. CPU bf16 GEMMs round their result to bf16 (torch's fp32-output
`mm(..., out_dtype=)` is CUDA-only), so the Gram and Gram-Schmidt stay fp32.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from xlbake.errors import ConfigError, InputError
from xlbake.lora.buffers import Buffers
from xlbake.lora.lowrank import Svd, svd_exact

SKETCH_PRECISIONS = ("auto", "fp32", "bf16")
# torch's CPU feature probes (private, hence looked up defensively): AVX512-BF16 (Zen 4, Cooper Lake) or AMX
# A bf16 sketch adds about (2⁻⁹ ||t||)² to the squared error (measured: (1.6-3.5e-3 ||t||)²): negligible while
# the error is above a tenth of the norm (< 0.06 % of it), not below, where the products switch to t's dtype.
_SKETCH_FLOOR = 1e-2
_CPU_BF16_PROBES = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
MIN_BLOCK, SMALL_RANK_OVERSAMPLE = 24, 16
"""Krylov blocks are at least min(MIN_BLOCK, (rank + SMALL_RANK_OVERSAMPLE) / 2) wide, whatever the oversampling:
each block has fixed costs (an eigen-solve of the Gram, a QR) that the narrow blocks of a small rank do not repay
(rank 32 in blocks of 16 instead of 24: same CPU time, twice the worst excess), and a block of a column or two
would make a tiny rank's result hinge on a few random vectors. Large ranks need no oversampling (the basis grows to
2.5x the rank): at rank 128 blocks of 64, not 72, cost ~12 % less CPU, at rank 64 32 not 40 ~14 % less."""


@functools.cache
def native_bf16(device: str) -> bool:
    """Whether `device` ("cpu", "cuda", "cuda:N") multiplies bf16 matrices in hardware, so that a bf16 product is
    cheaper than an fp32 one: CUDA GPUs of compute capability >= 8.0 (A100, A6000, ...) and x86 CPUs with
    AVX512-BF16 or AMX. Anything else (older GPUs, other CPUs, MPS) emulates bf16, slower than fp32: False."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(dev) >= (8, 0)
    if dev.type == "cpu":
        return any(bool(getattr(torch.cpu, probe, lambda: False)()) for probe in _CPU_BF16_PROBES)
    return False


def sketch_dtype(
    choice: str, dtype: torch.dtype, device: torch.device | str, native: Callable[[str], bool] = native_bf16
) -> torch.dtype:
    """The dtype of `svd_adaptive`'s Krylov products for a matrix of `dtype` on `device`.

    "fp32": `dtype` itself (no low precision); "bf16": bf16; "auto": bf16 when `dtype` is fp32 and `native(device)`
    says the device does bf16 in hardware, else `dtype` (an fp64 difference was asked for accuracy: it stays fp64).
    """
    if choice not in SKETCH_PRECISIONS:
        raise ConfigError(f"unknown sketch precision {choice!r}: use one of {', '.join(SKETCH_PRECISIONS)}")
    if choice == "bf16":
        return torch.bfloat16
    if choice == "auto" and dtype == torch.float32 and native(str(torch.device(device))):
        return torch.bfloat16
    return dtype


def svd_adaptive(
    m: Tensor, rank: int, *, oversample: int = 0, min_iters: int = 3, max_iters: int = 12, tol: float = 5e-3,
    seed: int = 0, sketch: torch.dtype | None = None, energy: float | None = None, workspace: Buffers | None = None,
) -> Svd:
    """Approximate top-`rank` SVD of m (rows, cols) by randomized block Krylov (Musco & Musco 2015) that stops on
    an a-posteriori error estimate.

    Works on t, the matrix with its short side first, in blocks of b = ceil((rank + oversample) / 2) columns, at
    least min(MIN_BLOCK, ceil((rank + SMALL_RANK_OVERSAMPLE) / 2)):
    q_0 = orth(t Ω) with a Gaussian Ω seeded by `seed`, then for each block z_i = tᵀ q_i and
    q_{i+1} = orth(t z_i) against every earlier block. The basis K = [q_0 .. q_i] gives the Rayleigh-Ritz
    approximation from the Gram Kᵀ t tᵀ K = Zᵀ Z of the kept z's; its error e_i = sqrt(||t||² - top-`rank` Ritz
    energy) is exact for the current basis and never increases. Iterating stops after at least max(`min_iters`, 3)
    blocks once the gains still to come, extrapolated from the last two (the last gain g shrinking by its ratio r
    to the one before: g r / (1 - r); Krylov's gains in fact shrink faster), are at most `tol` of e_i, or at
    `max_iters`: the excess over what more blocks would reach is then about `tol` or less, flat spectra get more
    blocks, steep ones fewer. The result needs no further product with m: u = K V for the Gram's top
    eigenvectors V, and vh = (Z V)ᵀ / s.

    `sketch` (default: m's dtype), e.g. bf16, is the dtype of every product with m; the orthonormalization, the
    Gram and its eigen-solve stay in m's dtype. The rounding tilts the basis by ~2⁻⁹ and adds about
    (2⁻⁹ ||m||)² to the squared error, and vh, made from the rounded z's, is u's projection of m up to the same
    rounding (its rows stay orthonormal: the Gram is that of the rounded z's). That is nothing while the error
    is large (the benchmark's finetune and slow-decay differences: the excess over the Eckart-Young optimum moves
    by < 0.01 % of it); once e_i drops below ||m|| / 10 the z's are redone and the remaining products made exactly,
    so that a nearly low-rank m is factored to fp32 accuracy.
    Per block: two products with m, one GEMM for the Gram's new column, the re-orthogonalization GEMMs (one
    Gram-Schmidt pass reuses the Gram's coefficients) and an eigvalsh of the Gram (fp64 when the error is small);
    the basis, the z's and the Gram live in buffers sized for the most blocks that fit.
    With the defaults at rank 128 SDXL layers take 5-6 blocks of 64 (320-384 basis columns). `python -m
    benchmarks.bench_extract --dim 128 --conv-dim 128 --fraction 0.1` (bf16 sketch): excess over the optimum of
    the stored difference median +0.21 % / worst +0.48 % (finetune), +0.18 % / +0.51 % (--difference slow-decay).
    The rule before, e_{i-1} - e_i <= 1e-2 e_i (the last gain alone), did the same work on the finetune set (644
    blocks against 641) but stopped slow-decay's 1280x1280 layers at +0.48 % (median +0.39 %, at the rule's
    edge); per-block errors: `python -m benchmarks.bench_krylov`. Alternatives measured: the module's docstring.
    `energy`, ||m||² when the caller has it already (extract does, from reading the layer), saves a pass over m.
    `workspace`: a pool (xlbake.lora.buffers) whose memory an earlier call on this thread left idle, for the
    sketch's copy of m, the basis, z rows and Gram (None: fresh buffers); the result never points into it.
    Falls back to `svd_exact` when min_iters + 2 blocks would not fit in the short side.
    Returns u (rows, k), s (k,), vh (k, cols) with k = min(rank, rows, cols); u and vh are orthonormal up to
    rounding, s descending.
    """
    if m.dim() != 2:
        raise InputError(f"expected a matrix, got shape {tuple(m.shape)}; reshape conv kernels with to_matrix")
    if rank < 1 or oversample < 0 or not 1 <= min_iters <= max_iters or tol < 0:
        raise ConfigError(f"need rank >= 1, oversample >= 0, 1 <= min_iters <= max_iters, tol >= 0; got {rank}, "
                          f"{oversample}, {min_iters}, {max_iters}, {tol}")  # fmt: skip
    tall = m.shape[0] > m.shape[1]
    t = m.mT if tall else m  # (short, long): orthonormalize on the short side only
    block = krylov_block(t.shape[0], rank, oversample, min_iters)
    if block is None:
        return svd_exact(m, rank)
    workspace = Buffers() if workspace is None else workspace
    low = None
    if sketch is not None and sketch != t.dtype:  # converted into m's layout: a contiguous pass
        low = workspace.take(tuple(m.shape), sketch, m.device).copy_(m)
        low = low.mT if tall else low
    space = _Space(t, low, block, max_iters, workspace)
    generator = torch.Generator(device=m.device).manual_seed(seed)
    omega = torch.randn(block, t.shape[1], generator=generator, device=m.device, dtype=m.dtype)
    space.rows[:block] = torch.linalg.qr(space.times(omega).mT).Q.mT
    energy = float(torch.linalg.vector_norm(t)) ** 2 if energy is None else energy
    vectors = _krylov(space, rank, energy, min_iters, tol)
    return _ritz(space, vectors, rank, tall)


def krylov_block(short: int, rank: int, oversample: int, min_iters: int) -> int | None:
    """The width of `svd_adaptive`'s Krylov blocks for a matrix whose short side is `short`: ceil((rank +
    oversample) / 2), at least min(MIN_BLOCK, ceil((rank + SMALL_RANK_OVERSAMPLE) / 2)); None when min_iters + 2
    blocks would fill the short side (no room to settle: `svd_adaptive` returns the exact SVD)."""
    block = max(-(-(rank + oversample) // 2), min(MIN_BLOCK, -(-(rank + SMALL_RANK_OVERSAMPLE) // 2)))
    return None if block * (min_iters + 2) >= short else block


class _Space:
    """The growing Krylov space of t (short, long): basis K (short, p) kept as its rows Kᵀ (each block written
    contiguously), the rows zt = Kᵀ t (p, long) and the Gram zt ztᵀ (p, p), in buffers sized for the most blocks
    that fit; `low`, t in the sketch's dtype (None: exact)."""

    def __init__(self, t: Tensor, low: Tensor | None, block: int, max_iters: int, workspace: Buffers) -> None:
        self.t, self.low, self.block, self.size = t, low, block, 0
        self.newest = t.new_empty(0)  # the newest block's z rows, in the dtype of their product
        self.blocks = min(max_iters, t.shape[0] // block - 1)  # then another 2 blocks would not fit the short side
        cap = self.blocks * block
        self.rows = workspace.take((cap, t.shape[0]), t.dtype, t.device)  # Kᵀ
        self.zt = workspace.take((cap, t.shape[1]), t.dtype, t.device)
        self.gram = workspace.take((cap, cap), t.dtype, t.device)

    def times(self, rows: Tensor) -> Tensor:
        """(t rowsᵀ)ᵀ = rows tᵀ (b, short) for rows (b, long), in the sketch's dtype when there is one."""
        if self.low is None:
            return rows @ self.t.mT
        return (rows.to(self.low.dtype) @ self.low.mT).to(self.t.dtype)

    def grow(self) -> Tensor:
        """Add the newest basis block's z rows and Gram column; the column Kᵀ t tᵀ q (p, b)."""
        p, b = self.size, self.block
        q = self.rows[p : p + b]  # q_iᵀ
        if self.low is None:
            self.newest = torch.mm(q, self.t, out=self.zt[p : p + b])
        else:  # kept as the product gave them too: the next block's product takes them so, without a conversion
            self.newest = q.to(self.low.dtype) @ self.low
            self.zt[p : p + b] = self.newest
        self.size = p + b
        return self._gram_column(p)

    def redo_exactly(self) -> Tensor:
        """Drop the sketch: every z row again as an exact product, the Gram anew; the newest Gram column."""
        p, b = self.size, self.block
        self.low = None
        torch.mm(self.rows[:p], self.t, out=self.zt[:p])
        self.newest = self.zt[p - b : p]
        self.size = 0
        for start in range(0, p, b):
            self.size = start + b
            column = self._gram_column(start)
        return column

    def _gram_column(self, p: int) -> Tensor:
        end = self.size
        column = self.zt[:end] @ self.zt[p:end].mT  # (end, b)
        self.gram[:end, p:end] = column
        self.gram[p:end, :p] = column[:p].mT
        diagonal = self.gram[p:end, p:end]
        diagonal.copy_((diagonal + diagonal.mT) / 2)
        return column


def _krylov(space: _Space, rank: int, energy: float, min_iters: int, tol: float) -> Tensor | None:
    """Grow the space block by block until the error estimate settles; the Gram's eigenvectors when the last
    block was expected to settle (computed with its eigenvalues rather than again in `_ritz`)."""
    errors: list[float] = []
    while True:
        cross = space.grow()
        count, p = len(errors) + 1, space.size
        last, may_stop = count >= space.blocks, count >= max(min_iters, 3)
        likely = last  # this block likely the last: its eigenvectors come with the eigenvalues (not again in _ritz)
        if may_stop and not last and len(errors) >= 3:  # this block's gain guessed as the last one's times r
            e = errors[-2:]
            likely = _settled([*e, e[1] - (e[0] - e[1]) * _ratio(errors[-3:])], tol)
        error, vectors = _ritz_error(space.gram[:p, :p], rank, energy, likely)
        errors.append(error)
        if last or (may_stop and _settled(errors[-3:], tol)):
            return vectors
        if space.low is not None and errors[-1] ** 2 < _SKETCH_FLOOR * energy:
            # the sketch's rounding would show in the error: exact products from here on, and the z's redone
            # exactly (one product), so that the Ritz step chooses from the basis without the rounding
            cross = space.redo_exactly()
        y = space.times(space.newest)  # (b, short): (t tᵀ q)ᵀ, the next Krylov block
        space.rows[p : p + space.block] = _orthonormalize(y, space.rows[:p], cross)


def _ratio(errors: list[float]) -> float:
    """The last gain over the one before, of three errors, within [0, 0.9] (a gain that grew says nothing of the
    next but that it may be as large)."""
    first, last = errors[0] - errors[1], errors[1] - errors[2]
    return min(max(last / first, 0.0), 0.9) if first > 0 else 0.9


def _settled(errors: list[float], tol: float) -> bool:
    """Whether the gains still to come, extrapolated geometrically from the last three errors (g r / (1 - r) for
    the last gain g shrinking by r per block), are at most `tol` of the error: the error is then within about
    `tol` of what more blocks would reach."""
    ratio, gain = _ratio(errors), errors[1] - errors[2]
    return gain <= 0 or gain * ratio / (1 - ratio) <= tol * errors[2]


def _orthonormalize(y: Tensor, rows: Tensor, cross: Tensor) -> Tensor:
    """The rows (b, short) of an orthonormal basis of the part of yᵀ (short, b) outside the basis K, given K's
    rows Kᵀ (p, short) and cross ≈ Kᵀ yᵀ (p, b); all in rows, so that yᵀ and the result are column-major, as
    LAPACK's QR takes and gives them.

    Two Gram-Schmidt passes (once loses orthogonality on a steep spectrum; Giraud et al. 2005); the first uses the
    Gram's cross column Kᵀ t z, which is Kᵀ yᵀ up to the sketch's rounding; the second, exact pass removes that.
    When a column lies almost inside K (a numerically low-rank matrix: t tᵀ squares its small singular values
    below the rounding), what remains is mostly rounding, and normalizing it brings back components along K that
    would break the Gram's orthonormality: a third pass on the normalized columns removes them.
    """
    norms = torch.linalg.vector_norm(y, dim=1)
    y = y - cross.mT @ rows
    y = y - (y @ rows.mT) @ rows
    q, r = torch.linalg.qr(y.mT)
    if bool((r.diagonal().abs() < 1e-2 * norms).any()):  # more than two digits cancelled
        q = torch.linalg.qr(q - rows.mT @ (rows @ q)).Q
    return q.mT


def _ritz_error(gram: Tensor, rank: int, energy: float, vectors: bool) -> tuple[float, Tensor | None]:
    """sqrt(energy - the top-`rank` eigenvalues of the Gram): the Ritz approximation's Frobenius error; and the
    Gram's eigenvectors if asked for.

    Solved in the Gram's dtype, whose entries are no more accurate anyway; but when the error is small the
    subtraction cancels: below a tenth of the norm, the eigenvalues are recomputed in fp64 (rounding of fp32
    eigenvalues, ~1e-6 of the energy, would otherwise be a visible part of the 1e-2 of it that remains).
    While the basis has no more than `rank` columns every eigenvalue counts: their sum is the trace (in fp64), and
    no eigen-solve is needed (at rank 128 in blocks of 64, the first two of ~5).
    """
    if not vectors and gram.shape[0] <= rank:
        return math.sqrt(max(energy - float(gram.diagonal().sum(dtype=torch.float64)), 0.0)), None
    values, eigenvectors = torch.linalg.eigh(gram) if vectors else (torch.linalg.eigvalsh(gram), None)
    top = float(values[-rank:].sum())
    if energy - top < 1e-2 * energy and gram.dtype != torch.float64:
        top = float(torch.linalg.eigvalsh(gram.double())[-rank:].sum())
    return math.sqrt(max(energy - top, 0.0)), eigenvectors


def _ritz(space: _Space, vectors: Tensor | None, rank: int, tall: bool) -> Svd:
    """The top-`rank` Ritz triplets of t on the basis: u = K V, vh = (Vᵀ zt) / s."""
    p = space.size
    # vectors only as accurate as the Gram's dtype: they pick the kept subspace, whose projection below is exact
    vectors = torch.linalg.eigh(space.gram[:p, :p]).eigenvectors if vectors is None else vectors
    vectors = vectors.flip(1)[:, : min(rank, p)]
    u = space.rows[:p].mT @ vectors  # (short, k)
    w = vectors.mT @ space.zt[:p]  # (k, long): uᵀ t
    s = torch.linalg.vector_norm(w, dim=1)
    if bool((s[1:] > s[:-1]).any()):  # norms out of the eigenvalues' order by rounding: sort (a gather, rare)
        s, order = torch.sort(s, descending=True, stable=True)
        u, w = u[:, order], w[order]
    inverse = torch.where(s > 0, 1 / s, torch.zeros_like(s))
    vh = w.mul_(inverse[:, None])  # (k, long)
    return Svd(u=vh.mT, s=s, vh=u.mT) if tall else Svd(u=u, s=s, vh=vh)
