"""The lattice as JIT-compiled parallel CPU loops (numba): construction with a hash table, splat, blur and slice.

The arithmetic of every point follows docs/reference.md §3.1 in the same floating-point order as the reference (and as
:mod:`crfasrnn.lattice._build`, which the tests compare it with). Two things make it faster than the reference:

* splatting is a parallel *gather*: each vertex sums its points' contributions, listed vertex by vertex in point order
  (a compressed sparse layout made at build time), which is also the reference's order of accumulation;
* the hash table keys are 64-bit integer codes of the vertex keys (mixed radix over the key coordinates and the image
  index), so that a probe compares one integer and a blur neighbour is a fixed offset of the code.

* the value grids have a channel count padded to a multiple of 8: the channel loops then vectorise without a scalar
  remainder, which more than pays for the extra columns (21 channels cost 1.4x what 24 do);
* splatting is spread over the threads in chunks of equal numbers of entries, not of vertices (the first vertices,
  inserted where the image begins, carry most of the entries).

Compiled functions are cached on disk (``cache=True``): only the first call in a fresh environment compiles (a few
seconds per dtype); later processes load the machine code.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numba
import numpy as np
import torch

from .._parallel import parallel_kernel
from ._build import check_magnitudes, scale_factors, span_error

__all__ = [
    "NumbaLattice",
    "build_lattice",
    "filter_each",
    "filter_points",
    "filter_sum",
    "normalizer",
    "padded_width",
    "softmax_rows",
]

_HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
_EMPTY = np.int64(-1)
_SPLAT_CHUNKS = 256  # work items of the splat, each with about the same number of entries


def padded_width(channels: int) -> int:
    """The row width the kernels use for ``channels`` value channels: the next multiple of 8 (from 4 channels up).

    The compiled channel loops vectorise in blocks of 8 and finish a remainder one value at a time, so 21 channels take
    longer than 24; below 4 channels padding costs more than the remainder.
    """
    return channels if channels < 4 else -(-channels // 8) * 8


@dataclass(frozen=True)
class NumbaLattice:
    """A lattice built by :func:`build_lattice` (numpy arrays).

    Attributes:
        offsets: (P, d+1) int32 vertex of each point per remainder.
        weights: (P, d+1) barycentric weights.
        blur_neighbours: (d+1, 2, M+1) int32 neighbours along each axis; M is the empty vertex.
        splat_start: (M+1,) int64 start of each vertex's entries in ``splat_points``/``splat_weights``.
        splat_points, splat_weights: the points splatting onto each vertex and their weights, in point order.
        splat_chunks: (K+1,) int64 vertex boundaries of K chunks with about equal numbers of splat entries.
        num_vertices: M.
        dim: d.
    """

    offsets: np.ndarray
    weights: np.ndarray
    blur_neighbours: np.ndarray
    splat_start: np.ndarray
    splat_points: np.ndarray
    splat_weights: np.ndarray
    splat_chunks: np.ndarray
    num_vertices: int
    dim: int


def _empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised array in memory from torch's allocator, for the large arrays the build and the filters fill.

    numpy asks the kernel for transparent huge pages on large arrays (``madvise``); where the kernel then compacts
    memory at the first touch (``defrag=madvise``, a common default), faulting in a fresh multi-megabyte array inside
    a parallel loop took 40 % longer than the loop's arithmetic (the build's weights at 2.1 M points); torch's
    allocator does not ask.
    """
    return torch.empty(shape, dtype=_TORCH_DTYPES[np.dtype(dtype)]).numpy()


_TORCH_DTYPES = {
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.int64): torch.int64,
}


class _ScratchPool:
    """Reusable flat buffers for the lattice value grids, shared by all lattices.

    A forward builds a new bilateral lattice, and a fresh multi-megabyte grid is new pages for the kernel to fault in
    (with glibc, freed large blocks go back to the operating system). Buffers are handed out whole to one caller at a
    time, so lattices can be filtered from several threads; the pool keeps at most ``limit`` bytes of idle buffers.
    """

    def __init__(self, limit: int = 128 << 20) -> None:
        self._idle: list[np.ndarray] = []
        self._lock = threading.Lock()
        self._limit = limit

    def take(self, shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
        """A (rows, channels) array, from an idle buffer of the dtype holding between 1 and 2 times the need."""
        need = shape[0] * shape[1]
        with self._lock:
            fits = [i for i, b in enumerate(self._idle) if b.dtype == dtype and need <= b.size <= 2 * need + 4096]
            if fits:
                best = min(fits, key=lambda i: self._idle[i].size)
                return self._idle.pop(best)[:need].reshape(shape)
            # none fits: idle buffers too small for this need are let go first, so that growing needs (a larger
            # image, the next lattice's vertex codes) replace the buffers they outgrow instead of piling up beside them
            self._idle = [b for b in self._idle if b.dtype != dtype or b.size >= need]
        return _empty((need + need // 8,), dtype)[:need].reshape(shape)  # slack: the next image's grid may be larger

    def clear(self) -> int:
        """Drop the idle buffers; returns the bytes released."""
        with self._lock:
            released = sum(b.nbytes for b in self._idle)
            self._idle.clear()
        return released

    def give(self, *arrays: np.ndarray) -> None:
        with self._lock:
            for array in arrays:
                self._idle.append(array.base if isinstance(array.base, np.ndarray) else array)
            while sum(b.nbytes for b in self._idle) > self._limit:
                self._idle.pop(0)


_SCRATCH = _ScratchPool()


@numba.njit(cache=True, nogil=True, inline="always")
def _elevate(features, p, scale, consts, el):  # pragma: no cover - compiled
    """Elevation of point p onto the hyperplane (docs/reference.md §3.1 step 3), in the reference's operation order."""
    d = features.shape[1]
    sm = consts[0]
    for j in range(d, 0, -1):
        cf = features[p, j - 1] * scale[j - 1]
        el[j] = sm - consts[3 + j] * cf
        sm = sm + cf
    el[0] = sm


@numba.njit(cache=True, nogil=True, parallel=True)
def _elevation_range(features, scale, consts):  # pragma: no cover - compiled
    """In one pass: the minimum and maximum of each feature, the number of non-finite feature values, and the minimum
    and maximum of each of the first d elevated coordinates (float64; meaningful only where all values are finite)."""
    num_points, d = features.shape
    chunks = 64
    step = (num_points + chunks - 1) // chunks
    lows = np.empty((chunks, d), dtype=np.float64)
    highs = np.empty((chunks, d), dtype=np.float64)
    f_lows = np.empty((chunks, d), dtype=np.float64)
    f_highs = np.empty((chunks, d), dtype=np.float64)
    bad = np.zeros(chunks, dtype=np.int64)
    for ch in numba.prange(chunks):
        el = np.empty(d + 1, dtype=features.dtype)
        for k in range(d):
            lows[ch, k] = np.inf
            highs[ch, k] = -np.inf
            f_lows[ch, k] = np.inf
            f_highs[ch, k] = -np.inf
        for p in range(ch * step, min(num_points, (ch + 1) * step)):
            for k in range(d):
                f = features[p, k]
                if not np.isfinite(f):
                    bad[ch] += 1
                f_lows[ch, k] = min(f_lows[ch, k], f)
                f_highs[ch, k] = max(f_highs[ch, k], f)
            _elevate(features, p, scale, consts, el)
            for k in range(d):
                lows[ch, k] = min(lows[ch, k], el[k])
                highs[ch, k] = max(highs[ch, k], el[k])
    el_low = np.empty(d, dtype=np.float64)
    el_high = np.empty(d, dtype=np.float64)
    f_low = np.empty(d, dtype=np.float64)
    f_high = np.empty(d, dtype=np.float64)
    for k in range(d):
        el_low[k] = lows[:, k].min()
        el_high[k] = highs[:, k].max()
        f_low[k] = f_lows[:, k].min()
        f_high[k] = f_highs[:, k].max()
    return el_low, el_high, f_low, f_high, bad.sum()


@numba.njit(cache=True, nogil=True, parallel=True)
def _simplex_codes(
    features, scale, consts, low, strides, image_stride, points_per_image, codes, weights, bad
):  # pragma: no cover - compiled
    """Per point: remainder-0 point, rank, barycentric weights and the integer codes of the d+1 simplex vertices.

    docs/reference.md §3.1 steps 3-8; the vertex key ``k`` (d coordinates) is coded as
    ``sum_k (key[k] - low[k]) * strides[k] + image * image_stride``.
    ``consts`` holds, in the features' dtype: [0] = 0, [1] = 1, [2] = 1/(d+1), [3 + j] = j for j = 0..d.
    A rank that leaves [0, d] after its correction (features beyond what the arithmetic handles; the caller checks
    their magnitude first) sets ``bad[0]`` and is clamped, so that no write leaves the arrays.
    """
    num_points, d = features.shape
    d1 = d + 1
    zero = consts[0]
    one = consts[1]
    inv = consts[2]
    chunk = 1024
    stride_sum = np.int64(0)
    for k in range(d):
        stride_sum += strides[k]
    for ch in numba.prange((num_points + chunk - 1) // chunk):
        el = np.empty(d1, dtype=features.dtype)
        rem0 = np.empty(d1, dtype=np.int64)
        rem0f = np.empty(d1, dtype=features.dtype)  # the same integers, for float arithmetic in the features' dtype
        rank = np.empty(d1, dtype=np.int64)
        b = np.empty(d1 + 1, dtype=features.dtype)
        by_rank = np.empty(d1, dtype=np.int64)  # the coordinate of each rank
        for p in range(ch * chunk, min(num_points, (ch + 1) * chunk)):
            _elevate(features, p, scale, consts, el)
            total = 0
            point_bad = False
            for i in range(d1):
                v = np.rint(el[i] * inv)
                rem0[i] = np.int64(v) * d1
                rem0f[i] = rem0[i]
                rank[i] = 0
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
                if rank[i] < 0 or rank[i] > d:
                    bad[0] = 1
                    point_bad = True
                    rank[i] = 0
                rem0f[i] = rem0[i]
            for i in range(d1 + 1):
                b[i] = zero
            for i in range(d1):
                t = (el[i] - rem0f[i]) * inv
                b[d - rank[i]] += t
                b[d - rank[i] + 1] -= t
            b[0] += one + b[d1]
            # Vertex r's key is rem0[k] + r, less d+1 where rank[k] > d - r (the canonical simplex): from r to r+1 every
            # coordinate grows by 1 and the one of rank d - r drops by d+1, so the codes follow in O(d), not O(d²).
            code = (p // points_per_image) * image_stride
            for k in range(d):
                code += (rem0[k] - low[k]) * strides[k]
                by_rank[rank[k]] = k
            by_rank[rank[d]] = d
            if point_bad:  # its ranks are no permutation, so by_rank has holes: fill it (the build is refused anyway)
                for r in range(d1):
                    by_rank[r] = r
            for r in range(d1):
                weights[p, r] = b[r]
                codes[p, r] = code
                k = by_rank[d - r]
                code += stride_sum - (d1 * strides[k] if k < d else 0)


@numba.njit(cache=True, nogil=True, inline="always")
def _probe(table_codes, code, mask, shift):  # pragma: no cover - compiled
    """The slot of ``code`` in an open-addressing table (multiplicative hash, linear probing), or the empty slot where
    it would go."""
    s = np.int64((np.uint64(code) * _HASH_MULTIPLIER) >> shift) & mask
    while table_codes[s] != _EMPTY and table_codes[s] != code:
        s = (s + 1) & mask
    return s


@numba.njit(cache=True, nogil=True)
def _insert_range(codes, offsets, first, last):  # pragma: no cover - compiled
    """Vertex ids for the points [first, last), local to the range, in first-insertion order (point by point,
    remainder by remainder) through a hash table; a point's vertex is first compared with the previous point's of the
    same remainder, which neighbouring points often share. The range's unique codes, in id order, are written over
    the range's own entries of ``codes`` (never beyond the entry being read: a stream compaction; the previous point's
    codes are kept aside). Returns their number."""
    d1 = codes.shape[1]
    flat = codes.reshape(-1)
    base = first * d1
    entries = (last - first) * d1
    bits = 10
    while (np.int64(1) << bits) < min(2 * entries, 1 << 18):
        bits += 1
    capacity = np.int64(1) << bits
    table_codes = np.empty(capacity, dtype=np.int64)
    table_codes[:] = _EMPTY
    table_ids = np.empty(capacity, dtype=np.int32)
    previous = np.empty(d1, dtype=np.int64)
    current = np.empty(d1, dtype=np.int64)
    count = 0
    for p in range(first, last):
        for r in range(d1):
            current[r] = codes[p, r]
        for r in range(d1):
            code = current[r]
            if p > first and code == previous[r]:  # neighbouring points often share their simplex
                offsets[p, r] = offsets[p - 1, r]
                continue
            s = _probe(table_codes, code, capacity - 1, np.uint64(64 - bits))
            if table_codes[s] == code:
                offsets[p, r] = table_ids[s]
                continue
            offsets[p, r] = count
            table_codes[s] = code
            table_ids[s] = count
            flat[base + count] = code
            count += 1
            if 2 * count >= capacity:  # grow and rehash
                bits += 1
                capacity = np.int64(1) << bits
                mask = capacity - 1
                table_codes = np.empty(capacity, dtype=np.int64)
                table_codes[:] = _EMPTY
                table_ids = np.empty(capacity, dtype=np.int32)
                for u in range(count):  # (the codes are distinct: each finds an empty slot)
                    s2 = _probe(table_codes, flat[base + u], mask, np.uint64(64 - bits))
                    table_codes[s2] = flat[base + u]
                    table_ids[s2] = u
        for r in range(d1):
            previous[r] = current[r]
    return count


@numba.njit(cache=True, nogil=True, parallel=True)
def _insert_ranges(codes, offsets, starts, counts):  # pragma: no cover - compiled
    for t in numba.prange(starts.shape[0] - 1):
        counts[t] = _insert_range(codes, offsets, starts[t], starts[t + 1])


@numba.njit(cache=True, nogil=True)
def _merge_ranges(codes, starts, counts, maps):  # pragma: no cover - compiled
    """The ranges' unique codes, range after range, into one hash table: global ids in first-insertion order over all
    the points (as one range over all of them would give); ``maps`` receives each local id's global id. Returns the
    table, the unique codes in id order and the table's size in bits."""
    d1 = codes.shape[1]
    flat = codes.reshape(-1)
    total = 0
    for t in range(counts.shape[0]):
        total += counts[t]
    bits = 10
    while (np.int64(1) << bits) < 2 * total + 2:
        bits += 1
    capacity = np.int64(1) << bits
    mask = capacity - 1
    shift = np.uint64(64 - bits)
    table_codes = np.empty(capacity, dtype=np.int64)
    table_codes[:] = _EMPTY
    table_ids = np.empty(capacity, dtype=np.int32)
    unique = np.empty(total, dtype=np.int64)
    count = 0
    k = 0
    for t in range(counts.shape[0]):
        base = starts[t] * d1
        for local in range(counts[t]):
            code = flat[base + local]
            s = _probe(table_codes, code, mask, shift)
            if table_codes[s] == code:
                maps[k] = table_ids[s]
            else:
                table_codes[s] = code
                table_ids[s] = count
                unique[count] = code
                maps[k] = count
                count += 1
            k += 1
    return table_codes, table_ids, unique[:count], bits


@numba.njit(cache=True, nogil=True, parallel=True)
def _remap(offsets, starts, map_starts, maps):  # pragma: no cover - compiled
    d1 = offsets.shape[1]
    for t in numba.prange(starts.shape[0] - 1):
        m0 = map_starts[t]
        for p in range(starts[t], starts[t + 1]):
            for r in range(d1):
                offsets[p, r] = maps[m0 + offsets[p, r]]


#: The hash table is built by ranges of points in parallel (then merged) from this many points up.
_PARALLEL_INSERT_POINTS = 1 << 17


def _insert_vertices(codes: np.ndarray, offsets: np.ndarray):
    """The lattice's vertices: the hash table (codes and ids), the unique codes in id order (first insertion over the
    points) and the table's size in bits; ``offsets`` receives every point's vertex ids and ``codes`` is overwritten.

    Large inputs are cut into ranges of points, each with its own table, built in parallel; the ranges' unique codes
    are then merged in order and the ids mapped back, which gives the ids a single range would (vertex for vertex).
    """
    num_points = codes.shape[0]
    ranges = max(1, min(numba.get_num_threads() * 2, num_points // (_PARALLEL_INSERT_POINTS // 2)))
    if num_points < _PARALLEL_INSERT_POINTS:
        ranges = 1
    starts = np.linspace(0, num_points, ranges + 1).astype(np.int64)
    counts = np.zeros(ranges, dtype=np.int64)
    _insert_ranges(codes, offsets, starts, counts)
    map_starts = np.zeros(ranges, dtype=np.int64)
    map_starts[1:] = np.cumsum(counts)[:-1]
    maps = np.empty(int(counts.sum()), dtype=np.int32)
    table_codes, table_ids, unique, bits = _merge_ranges(codes, starts, counts, maps)
    _remap(offsets, starts, map_starts, maps)  # (the identity for one range: then cheap, and compiled by small inputs)
    return table_codes, table_ids, unique, bits


@numba.njit(cache=True, nogil=True, parallel=True)
def _neighbours(unique, table_codes, table_ids, bits, shifts, out):  # pragma: no cover - compiled
    """out[j, s, v] = id of the vertex with code unique[v] + shifts[j, s], or M (the empty vertex) if absent.

    Only the forward neighbours (s = 1) are looked up: the relation is symmetric (``shifts[j, 0] = -shifts[j, 1]``), so
    finding u after v also records v before u. Each u has one vertex before it on each axis, so the writes never meet.
    """
    num_vertices = unique.shape[0]
    capacity = np.int64(1) << bits
    mask = capacity - 1
    shift = np.uint64(64 - bits)
    out[:, 0, :] = num_vertices
    for v in numba.prange(num_vertices):
        for j in range(shifts.shape[0]):
            code = unique[v] + shifts[j, 1]
            slot = _probe(table_codes, code, mask, shift)
            found = table_ids[slot] if table_codes[slot] == code else num_vertices
            out[j, 1, v] = found
            if found != num_vertices:
                out[j, 0, found] = v
    for j in range(shifts.shape[0]):
        out[j, 1, num_vertices] = num_vertices


@numba.njit(cache=True, nogil=True, parallel=True)
def _splat_lists(offsets, weights, num_vertices, num_chunks):  # pragma: no cover - compiled
    """Vertex-major lists of (point, weight), each vertex's entries in point order: a counting sort in parallel.

    The points are cut into ``num_chunks`` ranges; each range counts its entries per vertex, an exclusive scan over
    (vertex, range) gives every range its first slot in every vertex's list, and the ranges then write their entries
    in parallel. The lists are the same for any number of ranges.
    """
    num_points, d1 = offsets.shape
    step = (num_points + num_chunks - 1) // num_chunks
    slots = np.zeros((num_chunks, num_vertices), dtype=np.int64)
    for ch in numba.prange(num_chunks):
        for p in range(ch * step, min(num_points, (ch + 1) * step)):
            for r in range(d1):
                slots[ch, offsets[p, r]] += 1
    start = np.empty(num_vertices + 1, dtype=np.int64)
    running = 0
    for v in range(num_vertices):
        start[v] = running
        for ch in range(num_chunks):
            count = slots[ch, v]
            slots[ch, v] = running
            running += count
    start[num_vertices] = running
    points = np.empty(num_points * d1, dtype=np.int32)
    entry_weights = np.empty(num_points * d1, dtype=weights.dtype)
    for ch in numba.prange(num_chunks):
        for p in range(ch * step, min(num_points, (ch + 1) * step)):
            for r in range(d1):
                v = offsets[p, r]
                e = slots[ch, v]
                points[e] = p
                entry_weights[e] = weights[p, r]
                slots[ch, v] = e + 1
    return start, points, entry_weights


@parallel_kernel
def build_lattice(points: torch.Tensor, phantoms: int = 0, splat_lists: bool = True) -> NumbaLattice:
    """Build the lattice of (B, N, d) contiguous CPU points (see :func:`crfasrnn.lattice._build.build_lattice`);
    ``phantoms`` zero feature vectors per image add their vertices but are not points of the lattice. Without
    ``splat_lists`` the vertex-major lists are not made (a compact lattice, splatted by :func:`_scatter`)."""
    real = points.shape[1]
    if phantoms:
        points = torch.cat([points, points.new_zeros(points.shape[0], phantoms, points.shape[2])], dim=1)
    batch, num_points, d = points.shape
    feats = points.reshape(batch * num_points, d).numpy()
    dtype = feats.dtype
    scale = np.array(scale_factors(d), dtype=dtype)
    consts = np.array([0.0, 1.0, 0.0] + list(range(d + 1)), dtype=dtype)
    consts[2] = dtype.type(1.0) / dtype.type(d + 1)

    # A vertex key coordinate lies within 1.5(d+1) + d of the point's elevated coordinate (rounding to a multiple of
    # d+1, the wrap-around of step 6 and the canonical offset); a further d+1 on each side keeps the codes of blur
    # neighbours (shifts of at most d+1) inside the range, so that they can never alias another key.
    margin = 3 * (d + 1) + d
    el_low, el_high, f_low, f_high, non_finite = _elevation_range(feats, scale, consts)
    # the same checks as check_extent (which the torch back end runs), from the same pass
    check_magnitudes(torch.from_numpy(f_low), torch.from_numpy(f_high), non_finite > 0, points.dtype, feats.shape[0])
    low = np.floor(el_low).astype(np.int64) - margin
    spans = (np.ceil(el_high).astype(np.int64) + margin - low + 1).tolist()
    strides = [1] * d
    acc = 1
    for k in range(d - 1, -1, -1):
        strides[k] = acc
        acc *= spans[k]
    if acc * batch >= 2**62:
        raise span_error(spans, batch * num_points, d)
    stride_arr = np.array(strides, dtype=np.int64)
    # the vertex codes live only until the hash table is built: a scratch buffer, whose pages stay mapped between builds
    codes = _SCRATCH.take((batch * num_points, d + 1), np.dtype(np.int64))
    weights = _empty((batch * num_points, d + 1), dtype)
    bad = np.zeros(1, dtype=np.int64)
    _simplex_codes(feats, scale, consts, low, stride_arr, acc, num_points, codes, weights, bad)
    if bad[0]:
        raise ValueError(
            "lattice features too large in magnitude for the lattice arithmetic in their dtype (a point's "
            "simplex could not be found); divide them by larger bandwidths"
        )

    offsets = _empty((batch * num_points, d + 1), np.dtype(np.int32))
    try:
        table_codes, table_ids, unique, bits = _insert_vertices(codes, offsets)
    finally:
        _SCRATCH.give(codes)  # before the splat lists are made, which keeps the peak down
    del codes
    num_vertices = unique.shape[0]

    all_ones = int(stride_arr.sum())
    shifts = np.array(
        [
            [-all_ones + (strides[j] * (d + 1) if j < d else 0), all_ones - (strides[j] * (d + 1) if j < d else 0)]
            for j in range(d + 1)
        ],
        dtype=np.int64,
    )
    neighbours = np.empty((d + 1, 2, num_vertices + 1), dtype=np.int32)
    _neighbours(unique, table_codes, table_ids, bits, shifts, neighbours)
    if phantoms:  # the phantoms' vertices stay in the lattice; the points are the real ones
        offsets = np.ascontiguousarray(offsets.reshape(batch, num_points, d + 1)[:, :real].reshape(-1, d + 1))
        weights = np.ascontiguousarray(weights.reshape(batch, num_points, d + 1)[:, :real].reshape(-1, d + 1))
    if not splat_lists:  # a compact lattice: the splat scatters point by point (see _scatter)
        none = np.empty(0, dtype=np.int64)
        return NumbaLattice(
            offsets,
            weights,
            neighbours,
            none,
            np.empty(0, dtype=np.int32),
            np.empty(0, dtype=dtype),
            none.copy(),
            num_vertices,
            d,
        )
    # ranges for the parallel counting sort: a few per thread, each of at least 64k points, and their (ranges, M)
    # table of slots no larger than a quarter of the lists' entries
    entries = offsets.shape[0] * (d + 1)
    chunks_for_lists = max(
        1, min(numba.get_num_threads() * 2, offsets.shape[0] // 65536, entries // (4 * max(num_vertices, 1)))
    )
    start, splat_points, splat_weights = _splat_lists(offsets, weights, num_vertices, chunks_for_lists)
    targets = np.linspace(0, start[-1], _SPLAT_CHUNKS + 1)
    chunks = np.unique(np.searchsorted(start, targets).clip(0, num_vertices).astype(np.int64))
    chunks[0], chunks[-1] = 0, num_vertices
    return NumbaLattice(offsets, weights, neighbours, start, splat_points, splat_weights, chunks, num_vertices, d)


@numba.njit(cache=True, nogil=True, parallel=True)
def _splat(values, start, points, entry_weights, pre_scale, chunks, grid):  # pragma: no cover - compiled
    """grid[v] = sum over v's entries of weight * pre_scale[point] * values[point] (pre_scale empty: 1).

    Vertices are taken in the chunks given by ``chunks`` (vertex boundaries), one chunk per work item.
    """
    num_vertices = start.shape[0] - 1
    num_channels = values.shape[1]
    scaled = pre_scale.shape[0] > 0
    for ch in numba.prange(chunks.shape[0] - 1):
        for v in range(chunks[ch], chunks[ch + 1]):
            g = grid[v]
            for c in range(num_channels):
                g[c] = 0.0
            for e in range(start[v], start[v + 1]):
                p = points[e]
                w = entry_weights[e] * pre_scale[p] if scaled else entry_weights[e]
                row = values[p]
                for c in range(num_channels):
                    g[c] += w * row[c]
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
def _slice(grid, offsets, weights, alpha, post_scale, out):  # pragma: no cover - compiled
    """out[i] = post_scale[i] * sum_r (weights[i, r] * alpha) * grid[offsets[i, r]] (post_scale empty: 1).

    ``grid`` may be wider than ``out`` (padded channels): the sums run over its whole rows, and ``out`` receives the
    first ``out.shape[1]`` channels.
    """
    num_points, num_channels = out.shape
    width = grid.shape[1]
    scaled = post_scale.shape[0] > 0
    block = 64
    for blk in numba.prange((num_points + block - 1) // block):
        acc = np.empty(width, dtype=grid.dtype)
        for i in range(blk * block, min(num_points, (blk + 1) * block)):
            for c in range(width):
                acc[c] = 0.0
            for r in range(offsets.shape[1]):
                row = grid[offsets[i, r]]
                w = weights[i, r] * alpha
                for c in range(width):
                    acc[c] += w * row[c]
            o = out[i]
            if scaled:
                n = post_scale[i]
                for c in range(num_channels):
                    o[c] = acc[c] * n
            else:
                for c in range(num_channels):
                    o[c] = acc[c]


@numba.njit(cache=True, nogil=True, inline="always")
def _exp_nonpositive(x):  # pragma: no cover - compiled
    """``exp(x)`` for ``x <= 0`` as (mantissa part, bits of the float 2^n), without a libm call (Cephes ``expf``).

    Pure float32 arithmetic, so that a loop over it vectorises; relative error a few ULP (the tests compare the softmax
    with ``torch.softmax``). Below e^-75 (3e-33) the result is exactly 0: such probabilities change nothing, and
    near-denormal values would turn later multiplications by lattice weights into denormal ones, which the CPU executes
    a hundred times slower.
    """
    keep = x >= np.float32(-75.0)
    x = max(x, np.float32(-87.0))
    n = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
    r = x - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    return p, ((np.int32(n) + np.int32(127)) << 23) if keep else np.int32(0)


@numba.njit(cache=True, nogil=True, inline="always")
def _softmax_block(src, dst, rows, num_channels, shifted, scale_bits):  # pragma: no cover - compiled
    """``dst[k, :C] = softmax(src[k, :C])`` for the ``rows`` rows of a block, over the flat buffers ``shifted`` and
    ``scale_bits`` (at least rows · C each) so that the exponentials (:func:`_exp_nonpositive`) vectorise."""
    scale = scale_bits.view(shifted.dtype)
    m = 0
    for k in range(rows):
        row = src[k]
        top = row[0]
        for c in range(1, num_channels):
            top = max(top, row[c])
        for c in range(num_channels):
            shifted[m + c] = row[c] - top
        m += num_channels
    for j in range(m):
        shifted[j], scale_bits[j] = _exp_nonpositive(shifted[j])
    for j in range(m):
        shifted[j] *= scale[j]
    m = 0
    for k in range(rows):
        o = dst[k]
        total = shifted[m]
        for c in range(1, num_channels):
            total += shifted[m + c]
        inv = np.float32(1.0) / total
        for c in range(num_channels):
            o[c] = shifted[m + c] * inv
        m += num_channels


@numba.njit(cache=True, nogil=True, parallel=True)
def _slice_sum2(g1, off1, w1, k1, post1, g2, off2, w2, k2, post2, base, out, soft):  # pragma: no cover - compiled
    """``out = base + k1 ⊙ post1 ⊙ slice(g1) + k2 ⊙ post2 ⊙ slice(g2)`` for (P, C) ``base``; ``k`` are (W,) scales.

    The grids' rows hold W >= C channels per image (padded; ``k`` is zero beyond C), and the sums run over all W so
    that the channel loops vectorise; only the first C channels are used. A lattice built over fewer points than P (one
    image's lattice shared by a batch, its grid holding the images side by side in its channels) is indexed with point
    ``i % rows`` and channel offset ``(i // rows) * W``. The slice factor 1 / (1 + 2^-d) is folded into ``k`` by the
    caller. Where ``soft`` is (P, W') with W' >= C (not empty), its first C channels receive the softmax of each output
    row, computed 64 rows at a time over flat buffers so that the exponentials vectorise. ``out`` (P, C) may be empty
    (then ``soft`` is not): the sum is then only kept for the softmax, which spares writing it to memory.
    """
    num_points, num_channels = base.shape
    width = k1.shape[0]
    rows1 = off1.shape[0]
    rows2 = off2.shape[0]
    do_softmax = soft.shape[0] > 0
    keep_sum = out.shape[0] > 0
    block = 64
    for blk in numba.prange((num_points + block - 1) // block):
        first = blk * block
        last = min(num_points, first + block)
        local = np.empty((block, width), dtype=base.dtype)
        r1 = first % rows1  # row and channel offset in each lattice, advanced per point below (no division per row)
        c1 = (first // rows1) * width
        r2 = first % rows2
        c2 = (first // rows2) * width
        for i in range(first, last):
            if r1 == rows1:
                r1 = 0
                c1 += width
            if r2 == rows2:
                r2 = 0
                c2 += width
            o = local[i - first]
            for c in range(width):
                o[c] = 0.0
            for r in range(off1.shape[1]):
                row = g1[off1[r1, r], c1 : c1 + width]
                w = w1[r1, r]
                for c in range(width):
                    o[c] += w * row[c]
            n1 = post1[r1]
            b = base[i]
            for c in range(num_channels):
                o[c] = b[c] + (k1[c] * n1) * o[c]
            for r in range(off2.shape[1]):
                row = g2[off2[r2, r], c2 : c2 + width]
                w = w2[r2, r] * post2[r2]
                for c in range(width):
                    o[c] += (w * k2[c]) * row[c]
            if keep_sum:
                dest = out[i]
                for c in range(num_channels):
                    dest[c] = o[c]
            r1 += 1
            r2 += 1
        if do_softmax:
            shifted = np.empty(block * num_channels, dtype=base.dtype)
            scale_bits = np.empty(block * num_channels, dtype=np.int32)
            _softmax_block(local, soft[first:last], last - first, num_channels, shifted, scale_bits)


@numba.njit(cache=True, nogil=True, parallel=True)
def _softmax_rows(x, out):  # pragma: no cover - compiled
    """``out[i] = softmax(x[i])`` for float32 (P, C) rows (``out`` may be ``x``), 64 rows at a time over flat buffers
    with :func:`_exp_nonpositive`, as the fused slice computes the next iteration's softmax."""
    num_points, num_channels = x.shape
    block = 64
    for blk in numba.prange((num_points + block - 1) // block):
        first = blk * block
        last = min(num_points, first + block)
        shifted = np.empty(block * num_channels, dtype=x.dtype)
        scale_bits = np.empty(block * num_channels, dtype=np.int32)
        _softmax_block(x[first:last], out[first:last], last - first, num_channels, shifted, scale_bits)


@parallel_kernel
def softmax_rows(values: torch.Tensor, out: torch.Tensor) -> None:
    """``out = softmax(values, dim=1)`` for float32 CPU (P, C) tensors with unit channel stride (``out`` may be
    ``values``; either may be a column slice of a padded tensor); torch's softmax over a few channels is slow."""
    _softmax_rows(values.detach().numpy(), out.detach().numpy())


def _rows_in_place(values: torch.Tensor) -> np.ndarray | None:
    """(P, C) values as a (P, W) array without copying, W = :func:`padded_width` (C); None where they are not so.

    That is where the values are contiguous with W = C, or their rows lie W apart in memory that holds them whole (a
    column slice of a wider tensor, such as :func:`crfasrnn.lattice.values_buffer` makes).
    """
    rows, channels = values.shape
    width = padded_width(channels)
    if values.stride(1) != 1 or (values.stride(0) != width and rows > 1):
        return None
    array = values.detach().numpy()
    if width == channels:
        return array
    if values.storage_offset() + rows * width > values.untyped_storage().nbytes() // values.element_size():
        return None
    size = array.itemsize
    return np.lib.stride_tricks.as_strided(array, shape=(rows, width), strides=(width * size, size))


def _padded_rows(values: torch.Tensor) -> tuple[np.ndarray, bool]:
    """(P, C) values as a (P, W) array (see :func:`_rows_in_place`), and whether it is a scratch copy.

    Where the values are not laid out so, they are copied into a scratch buffer with zero padding (give it back to
    ``_SCRATCH``).
    """
    array = _rows_in_place(values)
    if array is not None:
        return array, False
    rows, channels = values.shape
    padded = _SCRATCH.take((rows, padded_width(channels)), values.detach().numpy().dtype)
    target = torch.from_numpy(padded)
    target[:, :channels].copy_(values.detach())  # torch copies with its threads
    target[:, channels:].zero_()
    return padded, True


def _folded_rows(values: torch.Tensor) -> np.ndarray:
    """(B, N, C) values as one scratch (N, B·W) array, image b in columns b·W ... b·W + C (W = padded_width(C))."""
    batch, num_points, channels = values.shape
    width = padded_width(channels)
    folded = _SCRATCH.take((num_points, batch * width), values.detach().numpy().dtype)
    view = torch.from_numpy(folded).view(num_points, batch, width)
    view[:, :, :channels].copy_(values.detach().transpose(0, 1))
    view[:, :, channels:].zero_()
    return folded


#: A compact lattice's splat scatters each range of points into a grid of its own; the ranges are summed in order.
#: Their number depends on the number of points only (so results do not depend on the thread count), bounded so that
#: the ranges' grids stay within _SCATTER_BUDGET bytes.
_SCATTER_RANGES, _SCATTER_MIN_POINTS, _SCATTER_BUDGET = 8, 32768, 64 << 20


@numba.njit(cache=True, nogil=True, parallel=True)
def _scatter(values, offsets, weights, pre_scale, partial, grid):  # pragma: no cover - compiled
    """grid[v] = sum over the points p and remainders r with offsets[p, r] = v of weights[p, r] * pre_scale[p] *
    values[p] (pre_scale empty: 1), as R = partial.shape[0] ranges of points, each into its own (M+1, C) grid in
    point order, then summed range by range."""
    num_points, d1 = offsets.shape
    num_ranges, rows, num_channels = partial.shape
    step = (num_points + num_ranges - 1) // num_ranges
    scaled = pre_scale.shape[0] > 0
    for t in numba.prange(num_ranges):
        g = partial[t]
        for v in range(rows):
            for c in range(num_channels):
                g[v, c] = 0.0
        for p in range(t * step, min(num_points, (t + 1) * step)):
            row = values[p]
            for r in range(d1):
                w = weights[p, r] * pre_scale[p] if scaled else weights[p, r]
                dst = g[offsets[p, r]]
                for c in range(num_channels):
                    dst[c] += w * row[c]
    for v in numba.prange(rows):
        for c in range(num_channels):
            total = partial[0, v, c]
            for t in range(1, num_ranges):
                total += partial[t, v, c]
            grid[v, c] = total
    for c in range(num_channels):
        grid[rows - 1, c] = 0.0


@numba.njit(cache=True, nogil=True, parallel=True)
def _normalizer_slice(grid, offsets, weights, alpha, eps, out):  # pragma: no cover - compiled
    """out[i] = 1 / (sum_r (weights[i, r] * alpha) * grid[offsets[i, r], 0] + eps): :func:`_slice` of one channel and
    the normaliser's inversion in one pass, in the same arithmetic."""
    num_points, d1 = offsets.shape
    for i in numba.prange(num_points):
        acc = grid.dtype.type(0.0)
        for r in range(d1):
            acc += (weights[i, r] * alpha) * grid[offsets[i, r], 0]
        out[i] = grid.dtype.type(1.0) / (acc + eps)


def normalizer(lattice: NumbaLattice, eps: float) -> torch.Tensor:
    """``1 / (K·1 + eps)`` per point, as the lattice's filter of an all-ones column would give it, for a compact
    lattice: the splat scatters the weights, the slice inverts as it goes (no column of ones, no torch passes)."""
    num_points = lattice.offsets.shape[0]
    dtype = lattice.weights.dtype
    ones = _SCRATCH.take((num_points, 1), dtype)
    ones.fill(1.0)
    try:
        grid = _splat_blur(lattice, ones, False, np.empty(0, dtype=dtype))
    finally:
        _SCRATCH.give(ones)
    try:
        out = torch.empty(num_points, dtype=_TORCH_DTYPES[dtype])
        _normalizer_slice(
            grid, lattice.offsets, lattice.weights, _alpha(dtype, lattice.dim), dtype.type(eps), out.numpy()
        )
    finally:
        _SCRATCH.give(grid)
    return out


def _splat_into(lattice: NumbaLattice, vals: np.ndarray, pre: np.ndarray, grid: np.ndarray) -> None:
    """The splat: a parallel gather over the vertex-major lists, or for a compact lattice a scatter by ranges."""
    if lattice.splat_points.shape[0] or lattice.offsets.shape[0] == 0:
        _splat(vals, lattice.splat_start, lattice.splat_points, lattice.splat_weights, pre, lattice.splat_chunks, grid)
        return
    per_range = grid.shape[0] * grid.shape[1] * grid.dtype.itemsize
    ranges = max(1, min(_SCATTER_RANGES, lattice.offsets.shape[0] // _SCATTER_MIN_POINTS, _SCATTER_BUDGET // per_range))
    partial = _SCRATCH.take((ranges * grid.shape[0], grid.shape[1]), grid.dtype)
    try:
        _scatter(
            vals, lattice.offsets, lattice.weights, pre, partial.reshape(ranges, grid.shape[0], grid.shape[1]), grid
        )
    finally:
        _SCRATCH.give(partial)


def _splat_blur(lattice: NumbaLattice, vals: np.ndarray, reverse: bool, pre: np.ndarray) -> np.ndarray:
    """Splat and blur into a scratch grid; returns it (give it back to ``_SCRATCH`` when done)."""
    shape = (lattice.num_vertices + 1, vals.shape[1])
    grid, spare = _SCRATCH.take(shape, vals.dtype), _SCRATCH.take(shape, vals.dtype)
    try:
        _splat_into(lattice, vals, pre, grid)
        half = vals.dtype.type(0.5)
        for j in range(lattice.dim, -1, -1) if reverse else range(lattice.dim + 1):
            _blur(grid, spare, lattice.blur_neighbours[j, 0], lattice.blur_neighbours[j, 1], half)
            grid, spare = spare, grid
    finally:
        _SCRATCH.give(spare)
    return grid


def _alpha(dtype: np.dtype, d: int):
    return dtype.type(1.0) / (dtype.type(1.0) + dtype.type(2.0) ** dtype.type(-d))


@parallel_kernel
def filter_sum(
    lattices: tuple[NumbaLattice, NumbaLattice],
    values: torch.Tensor,
    scales: tuple[torch.Tensor, torch.Tensor],
    post_scales: tuple[torch.Tensor, torch.Tensor],
    base: torch.Tensor,
    out: torch.Tensor | None,
    softmax_out: torch.Tensor | None = None,
    pre_scales: tuple[torch.Tensor | None, ...] | None = None,
) -> None:
    """``out = base + Σ_k scales[k] ⊙ post_scales[k] ⊙ K_k values`` for two lattices, sliced in one pass.

    ``values`` is (B, N, C), its rows contiguous (a column slice of a padded tensor is read without a copy); a lattice
    built over N points (rather than B·N) is shared by the images. ``scales[k]`` are (C,); ``post_scales[k]`` hold
    one factor per lattice point; ``base`` and ``out`` are (B·N, C) contiguous; ``softmax_out`` (optional, may be the
    memory of ``values``, rows contiguous) receives the softmax of each row of the sum; ``out`` may be None when
    ``softmax_out`` is given. ``pre_scales[k]`` (optional, one factor per lattice point) scale the values as they are
    splatted onto lattice k.
    """
    batch, num_points, channels = values.shape
    width = padded_width(channels)
    flat = values.reshape(batch * num_points, channels)
    grids, scratch = [], []
    try:
        laid_out = None  # the values padded once for every lattice over all B·N points
        pre_scales = pre_scales or (None,) * len(lattices)
        for lattice, pre_scale in zip(lattices, pre_scales):
            if lattice.offsets.shape[0] == flat.shape[0]:
                if laid_out is None:
                    laid_out, copied = _padded_rows(flat)
                    if copied:
                        scratch.append(laid_out)
                vals = laid_out
            else:  # one image's lattice for the whole batch: the images side by side in the channels
                vals = _folded_rows(values)
                scratch.append(vals)
            pre = np.empty(0, dtype=vals.dtype) if pre_scale is None else pre_scale.detach().reshape(-1).numpy()
            grids.append(_splat_blur(lattice, vals, False, pre))
        dtype = grids[0].dtype
        k = [np.zeros(width, dtype=dtype) for _ in lattices]
        for kk, s, lat in zip(k, scales, lattices):
            kk[:channels] = s.detach().numpy() * _alpha(dtype, lat.dim)
        post = [p.detach().reshape(-1).numpy() for p in post_scales]
        (l1, l2), (g1, g2) = lattices, grids
        none2 = np.empty((0, 0), dtype=dtype)
        soft = none2
        if softmax_out is not None:  # contiguous, or with padded rows: written in place either way
            rows = softmax_out.view(batch * num_points, channels)
            in_place = _rows_in_place(rows)
            soft = rows.detach().numpy() if in_place is None else in_place
        _slice_sum2(
            g1,
            l1.offsets,
            l1.weights,
            k[0],
            post[0],
            g2,
            l2.offsets,
            l2.weights,
            k[1],
            post[1],
            base.detach().numpy(),
            none2 if out is None else out.detach().numpy(),
            soft,
        )
    finally:
        _SCRATCH.give(*grids, *scratch)


def filter_points(
    lattice: NumbaLattice,
    values: torch.Tensor,
    reverse: bool,
    pre_scale: torch.Tensor | None = None,
    post_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Filter (P, C) CPU values (into contiguous ``out`` if given); see
    :func:`crfasrnn.lattice._torch.filter_points`."""
    return filter_each((lattice,), values, reverse, (pre_scale,), (post_scale,), (out,))[0]


@parallel_kernel
def filter_each(
    lattices: tuple[NumbaLattice, ...],
    values: torch.Tensor,
    reverse: bool,
    pre_scales: tuple[torch.Tensor | None, ...],
    post_scales: tuple[torch.Tensor | None, ...],
    outs: tuple[torch.Tensor | None, ...],
) -> list[torch.Tensor]:
    """:func:`filter_points` of the same (P, C) values through several lattices over P points, padded once."""
    vals, copied = _padded_rows(values)
    dtype = vals.dtype
    none = np.empty(0, dtype=dtype)
    results = []
    try:
        for lattice, pre_scale, post_scale, out in zip(lattices, pre_scales, post_scales, outs):
            pre = none if pre_scale is None else pre_scale.detach().reshape(-1).numpy()
            post = none if post_scale is None else post_scale.detach().reshape(-1).numpy()
            result = torch.empty(values.shape, dtype=values.dtype) if out is None else out
            grid = _splat_blur(lattice, vals, reverse, pre)
            try:
                _slice(
                    grid, lattice.offsets, lattice.weights, _alpha(dtype, lattice.dim), post, result.detach().numpy()
                )
            finally:
                _SCRATCH.give(grid)
            results.append(result)
    finally:
        if copied:
            _SCRATCH.give(vals)
    return results
