"""The lattice as JIT-compiled parallel CPU loops (numba): construction with a hash table, splat, blur and slice.

The arithmetic of every point follows SPEC §3.1 in the same floating-point order as the reference (and as
:mod:`crfasrnn.lattice._build`, which the tests compare it with). Two things make it faster than the reference:

* splatting is a parallel *gather*: each vertex sums its points' contributions, listed vertex by vertex in point order
  (a compressed sparse layout made at build time), which is also the reference's order of accumulation;
* the hash table keys are 64-bit integer codes of the vertex keys (mixed radix over the key coordinates and the image
  index), so that a probe compares one integer and a blur neighbour is a fixed offset of the code.

Compiled functions are cached on disk (``cache=True``): only the first call in a fresh environment compiles (a few
seconds per dtype); later processes load the machine code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch

from ._build import scale_factors

__all__ = ["NumbaLattice", "build_lattice", "filter_points"]

_HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
_EMPTY = np.int64(-1)


@dataclass(frozen=True)
class NumbaLattice:
    """A lattice built by :func:`build_lattice` (numpy arrays).

    Attributes:
        offsets: (P, d+1) int32 vertex of each point per remainder.
        weights: (P, d+1) barycentric weights.
        blur_neighbours: (d+1, 2, M+1) int32 neighbours along each axis; M is the empty vertex.
        splat_start: (M+1,) int64 start of each vertex's entries in ``splat_points``/``splat_weights``.
        splat_points, splat_weights: the points splatting onto each vertex and their weights, in point order.
        num_vertices: M.
        dim: d.
    """

    offsets: np.ndarray
    weights: np.ndarray
    blur_neighbours: np.ndarray
    splat_start: np.ndarray
    splat_points: np.ndarray
    splat_weights: np.ndarray
    num_vertices: int
    dim: int


@numba.njit(cache=True, nogil=True, parallel=True)
def _simplex_keys(features, scale, consts, keys, weights):  # pragma: no cover - compiled
    """Per point: elevation, remainder-0 point, rank, barycentric weights and the d+1 vertex keys (SPEC §3.1 3-8).

    ``consts`` holds, in the features' dtype: [0] = 0, [1] = 1, [2] = 1/(d+1), [3 + j] = j for j = 0..d.
    """
    num_points, d = features.shape
    d1 = d + 1
    zero = consts[0]
    one = consts[1]
    inv = consts[2]
    for p in numba.prange(num_points):
        el = np.empty(d1, dtype=features.dtype)
        rem0 = np.empty(d1, dtype=np.int64)
        rem0f = np.empty(d1, dtype=features.dtype)  # the same integers, for float arithmetic in the features' dtype
        rank = np.zeros(d1, dtype=np.int64)
        sm = zero
        for j in range(d, 0, -1):
            cf = features[p, j - 1] * scale[j - 1]
            el[j] = sm - consts[3 + j] * cf
            sm = sm + cf
        el[0] = sm
        total = 0
        for i in range(d1):
            v = np.rint(el[i] * inv)
            rem0[i] = np.int64(v) * d1
            rem0f[i] = rem0[i]
            total += np.int64(v)
        for i in range(d1):
            di = el[i] - rem0f[i]
            for j in range(i + 1, d1):
                if di < el[j] - rem0f[j]:
                    rank[i] += 1
                else:
                    rank[j] += 1
        for i in range(d1):
            rank[i] += total
            if rank[i] < 0:
                rank[i] += d1
                rem0[i] += d1
            elif rank[i] > d:
                rank[i] -= d1
                rem0[i] -= d1
            rem0f[i] = rem0[i]
        b = np.zeros(d1 + 1, dtype=features.dtype)
        for i in range(d1):
            t = (el[i] - rem0f[i]) * inv
            b[d - rank[i]] += t
            b[d - rank[i] + 1] -= t
        b[0] += one + b[d1]
        for r in range(d1):
            weights[p, r] = b[r]
            for k in range(d):
                c = r if rank[k] <= d - r else r - d1
                keys[p, r, k] = rem0[k] + c


@numba.njit(cache=True, nogil=True)
def _hash_slot(code, mask, shift):  # pragma: no cover - compiled
    return np.int64((np.uint64(code) * _HASH_MULTIPLIER) >> shift) & mask


@numba.njit(cache=True, nogil=True)
def _insert_all(codes, offsets_flat, num_entries):  # pragma: no cover - compiled
    """Assign vertex ids in first-insertion order; returns the table and the unique codes."""
    bits = 10
    while (np.int64(1) << bits) < 2 * min(num_entries, 1 << 16):
        bits += 1
    capacity = np.int64(1) << bits
    table_codes = np.full(capacity, _EMPTY, dtype=np.int64)
    table_ids = np.empty(capacity, dtype=np.int32)
    unique = np.empty(64, dtype=np.int64)
    count = 0
    last_code = _EMPTY
    last_id = 0
    d1 = codes.shape[1]
    for p in range(codes.shape[0]):
        for r in range(d1):
            code = codes[p, r]
            if r == 0 and code == last_code:  # neighbouring pixels often share their simplex
                offsets_flat[p * d1 + r] = last_id
                continue
            mask = capacity - 1
            shift = np.uint64(64 - bits)
            s = _hash_slot(code, mask, shift)
            while table_codes[s] != _EMPTY and table_codes[s] != code:
                s = (s + 1) & mask
            if table_codes[s] == code:
                vid = table_ids[s]
            else:
                vid = count
                table_codes[s] = code
                table_ids[s] = vid
                if count == unique.shape[0]:
                    grown = np.empty(2 * unique.shape[0], dtype=np.int64)
                    grown[:count] = unique[:count]
                    unique = grown
                unique[count] = code
                count += 1
                if 2 * count >= capacity:  # grow and rehash
                    bits += 1
                    capacity = np.int64(1) << bits
                    mask = capacity - 1
                    shift = np.uint64(64 - bits)
                    table_codes = np.full(capacity, _EMPTY, dtype=np.int64)
                    table_ids = np.empty(capacity, dtype=np.int32)
                    for u in range(count):
                        s2 = _hash_slot(unique[u], mask, shift)
                        while table_codes[s2] != _EMPTY:
                            s2 = (s2 + 1) & mask
                        table_codes[s2] = unique[u]
                        table_ids[s2] = u
            offsets_flat[p * d1 + r] = vid
            if r == 0:
                last_code = code
                last_id = vid
    return table_codes, table_ids, unique[:count], bits


@numba.njit(cache=True, nogil=True, parallel=True)
def _neighbours(unique, table_codes, table_ids, bits, shifts, out):  # pragma: no cover - compiled
    """out[j, s, v] = id of the vertex with code unique[v] + shifts[j, s], or M (the empty vertex) if absent."""
    num_vertices = unique.shape[0]
    capacity = np.int64(1) << bits
    mask = capacity - 1
    shift = np.uint64(64 - bits)
    for v in numba.prange(num_vertices):
        for j in range(shifts.shape[0]):
            for s in range(2):
                code = unique[v] + shifts[j, s]
                slot = _hash_slot(code, mask, shift)
                found = num_vertices
                while table_codes[slot] != _EMPTY:
                    if table_codes[slot] == code:
                        found = table_ids[slot]
                        break
                    slot = (slot + 1) & mask
                out[j, s, v] = found
    for j in range(shifts.shape[0]):
        for s in range(2):
            out[j, s, num_vertices] = num_vertices


@numba.njit(cache=True, nogil=True)
def _splat_lists(offsets, weights, num_vertices):  # pragma: no cover - compiled
    """Vertex-major lists of (point, weight), each vertex's entries in point order."""
    num_points, d1 = offsets.shape
    start = np.zeros(num_vertices + 2, dtype=np.int64)
    for p in range(num_points):
        for r in range(d1):
            start[offsets[p, r] + 2] += 1
    for v in range(2, num_vertices + 2):
        start[v] += start[v - 1]
    points = np.empty(num_points * d1, dtype=np.int32)
    entry_weights = np.empty(num_points * d1, dtype=weights.dtype)
    for p in range(num_points):
        for r in range(d1):
            v = offsets[p, r]
            e = start[v + 1]
            points[e] = p
            entry_weights[e] = weights[p, r]
            start[v + 1] = e + 1
    return start[: num_vertices + 1], points, entry_weights


def build_lattice(points: torch.Tensor) -> NumbaLattice:
    """Build the lattice of (B, N, d) contiguous CPU points (see :func:`crfasrnn.lattice._build.build_lattice`)."""
    batch, num_points, d = points.shape
    feats = points.reshape(batch * num_points, d).numpy()
    dtype = feats.dtype
    scale = np.array(scale_factors(d), dtype=dtype)
    consts = np.array([0.0, 1.0, 0.0] + list(range(d + 1)), dtype=dtype)
    consts[2] = dtype.type(1.0) / dtype.type(d + 1)
    keys = np.empty((batch * num_points, d + 1, d), dtype=np.int64)
    weights = np.empty((batch * num_points, d + 1), dtype=dtype)
    _simplex_keys(feats, scale, consts, keys, weights)

    pad = d + 1
    low = keys.min(axis=(0, 1)) - pad
    spans = (keys.max(axis=(0, 1)) - low + pad + 1).tolist()
    strides = [1] * d
    acc = 1
    for k in range(d - 1, -1, -1):
        strides[k] = acc
        acc *= spans[k]
    if acc * batch >= 2**62:
        raise ValueError(
            f"lattice features span too large a range to index (span per axis {spans}); the features are probably "
            f"scaled by a bandwidth (theta) that is far too small"
        )
    stride_arr = np.array(strides, dtype=np.int64)
    codes = (keys - low) @ stride_arr
    codes += (np.arange(batch, dtype=np.int64) * acc).repeat(num_points)[:, None]
    del keys

    offsets = np.empty(batch * num_points * (d + 1), dtype=np.int32)
    table_codes, table_ids, unique, bits = _insert_all(codes, offsets, codes.size)
    offsets = offsets.reshape(batch * num_points, d + 1)
    num_vertices = unique.shape[0]

    all_ones = int(stride_arr.sum())
    shifts = np.array(
        [[-all_ones + (strides[j] * (d + 1) if j < d else 0), all_ones - (strides[j] * (d + 1) if j < d else 0)]
         for j in range(d + 1)],
        dtype=np.int64,
    )
    neighbours = np.empty((d + 1, 2, num_vertices + 1), dtype=np.int32)
    _neighbours(unique, table_codes, table_ids, bits, shifts, neighbours)
    start, splat_points, splat_weights = _splat_lists(offsets, weights, num_vertices)
    return NumbaLattice(offsets, weights, neighbours, start, splat_points, splat_weights, num_vertices, d)


@numba.njit(cache=True, nogil=True, parallel=True)
def _splat(values, start, points, entry_weights, grid):  # pragma: no cover - compiled
    num_vertices = start.shape[0] - 1
    num_channels = values.shape[1]
    for v in numba.prange(num_vertices):
        for c in range(num_channels):
            grid[v, c] = 0.0
        for e in range(start[v], start[v + 1]):
            p = points[e]
            w = entry_weights[e]
            for c in range(num_channels):
                grid[v, c] += w * values[p, c]
    for c in range(num_channels):
        grid[num_vertices, c] = 0.0


@numba.njit(cache=True, nogil=True, parallel=True)
def _blur(src, dst, n1, n2, half):  # pragma: no cover - compiled
    num_rows, num_channels = src.shape
    for v in numba.prange(num_rows):
        a = n1[v]
        b = n2[v]
        for c in range(num_channels):
            dst[v, c] = src[v, c] + half * (src[a, c] + src[b, c])


@numba.njit(cache=True, nogil=True, parallel=True)
def _slice(grid, offsets, weights, alpha, out):  # pragma: no cover - compiled
    num_points, num_channels = out.shape
    for i in numba.prange(num_points):
        for c in range(num_channels):
            out[i, c] = 0.0
        for r in range(offsets.shape[1]):
            v = offsets[i, r]
            w = weights[i, r] * alpha
            for c in range(num_channels):
                out[i, c] += w * grid[v, c]


def filter_points(lattice: NumbaLattice, values: torch.Tensor, reverse: bool) -> torch.Tensor:
    """Filter (P, C) contiguous CPU values; see :func:`crfasrnn.lattice._torch.filter_points`."""
    d = lattice.dim
    vals = values.detach().numpy()
    dtype = vals.dtype
    grid = np.empty((lattice.num_vertices + 1, vals.shape[1]), dtype=dtype)
    _splat(vals, lattice.splat_start, lattice.splat_points, lattice.splat_weights, grid)
    spare = np.empty_like(grid)
    half = dtype.type(0.5)
    for j in range(d, -1, -1) if reverse else range(d + 1):
        _blur(grid, spare, lattice.blur_neighbours[j, 0], lattice.blur_neighbours[j, 1], half)
        grid, spare = spare, grid
    out = np.empty_like(vals)
    alpha = dtype.type(1.0) / (dtype.type(1.0) + dtype.type(2.0) ** dtype.type(-d))
    _slice(grid, lattice.offsets, lattice.weights, alpha, out)
    return torch.from_numpy(out)
