"""Near-duplicate detection: perceptual hashes of images and semantic duplicates of embeddings.

Two pair finders produce ``(i, j, value)`` arrays with ``i < j`` over sample indices ``0..n-1``:

- :func:`hash_pairs`: 64-bit pHashes within a Hamming distance (exact; multi-index hashing).
- :func:`semdedup_pairs`: embeddings with cosine >= ``1 - eps`` inside k-means buckets (SemDeDup).

:func:`group_pairs` turns pairs into groups (connected components), :func:`choose_keepers` keeps the
best-quality member of each group, and :func:`pair_similarity_to_keeper` says how close every dropped
sample is to the sample that replaced it (groups are transitive, so chains can drift).

Everything is vectorised over numpy arrays (no Python object per sample); nothing reads storage.
"""

from __future__ import annotations

import io
import itertools
from math import comb

import numpy as np

from .cluster import CHUNK, _check_matrix, _rows_f32, _take_f32, kmeans

# Default pHash threshold, chosen on real photos (skimage.data, see tests/test_cluster_dedup.py):
# resizing (0.25x-0.98x) and JPEG re-encoding at quality 30-70 move a pHash by 0-4 bits; a 2% crop per
# side by 2-8 bits; 5% crops by 6-18. Between 15 distinct photos the smallest distance is 20
# (hubble_deep_field vs retina). 8 is the smallest threshold that keeps every 2% crop, with 12 bits of
# margin to distinct photos. pHash sets bits where a DCT coefficient exceeds the median of 64, so
# nearly every hash has 32 ones and distances are even: 8 and 9 behave alike. A stochastic texture
# (skimage's brick) moves by 22 bits under a 2% crop; no pHash threshold separates that from distinct
# photos, which is what semantic dedup is for.
PHASH_MAX_DISTANCE = 8

HASH_BITS = 64
_POPCOUNT8 = np.array([bin(v).count("1") for v in range(256)], dtype=np.uint8)


def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64, as uint8."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x).astype(np.uint8, copy=False)
    x = np.ascontiguousarray(x, dtype=np.uint64)
    return _POPCOUNT8[x.view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1, dtype=np.uint8)


def hamming(a, b) -> np.ndarray:
    """Hamming distance between 64-bit hashes, elementwise with numpy broadcasting.

    Args:
        a, b: uint64 arrays (or Python ints below 2**64).

    Returns:
        uint8 array of distances 0..64.
    """
    return _popcount(np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64)))


def phash(data) -> int:
    """64-bit perceptual hash (``imagehash.phash``, hash_size 8) of an image.

    Args:
        data: encoded image bytes, or a ``PIL.Image.Image``.

    Returns:
        The hash as a Python int in ``[0, 2**64)``; bit 63 is the hash's first bit, so
        ``f"{h:016x}" == str(imagehash.phash(img))``. Store many as a uint64 array.

    The EXIF orientation is applied first (the image as displayed is hashed, so a rotated-by-tag phone
    photo matches its upright re-save). Palette, alpha and CMYK images go through RGB; 16/32-bit and
    float images are rescaled to 8 bits. Raises ValueError on bytes PIL cannot decode.
    """
    import imagehash
    from PIL import Image, ImageOps

    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            img = Image.open(io.BytesIO(data))
            img.load()  # decoding is lazy; truncated data only fails here
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise ValueError(f"phash: cannot decode {len(data)} bytes as an image: {exc}") from exc
        img = ImageOps.exif_transpose(img, in_place=True) or img
    elif isinstance(data, Image.Image):
        img = ImageOps.exif_transpose(data)
    else:
        raise TypeError(f"phash: want bytes or a PIL image, got {type(data).__name__}")

    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # PIL's convert("L") clips these instead of scaling, which turns most 16-bit images white.
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.round().astype(np.uint8))
    elif img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    bits = imagehash.phash(img, hash_size=8).hash  # bool [8, 8], row-major = imagehash's hex order
    return int.from_bytes(np.packbits(bits.ravel()).tobytes(), "big")


def _bands(n_bands: int) -> list[tuple[int, int]]:
    """(shift, width) of ``n_bands`` contiguous bands covering all 64 bits, widths differing by <= 1."""
    widths = [HASH_BITS // n_bands + (1 if b < HASH_BITS % n_bands else 0) for b in range(n_bands)]
    shifts = np.concatenate([[0], np.cumsum(widths)[:-1]])
    return [(int(s), int(w)) for s, w in zip(shifts, widths)]


def _band_key(h: np.ndarray, shift: int, width: int) -> np.ndarray:
    return ((h >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.int64)


_MAX_TABLE_BITS = 24  # a band probed with bit flips is looked up in a dense table of 2**width int64s


def _auto_bands(m: int, t: int) -> int:
    """Number of bands with the lowest expected work for m distinct, roughly uniform hashes.

    With b bands a pair within distance t differs by at most ``t // b`` bits in some band (pigeonhole).
    Work per band is the probes (m queries times the ball volume V of radius t // b in that band) plus
    the candidates they find (about V * m**2 / 2**(width+1)). b = t+1 is plain multi-index hashing on
    equal band values; fewer, wider bands probed with bit flips win once m**2 / 2**(64/(t+1)) dwarfs m
    (for t=8: 9 bands of 7 bits give ~m**2/28 candidates; 3 bands of 21-22 bits probed with <= 2
    flips give ~m**2/7000 candidates for ~360 table lookups per hash).
    """
    best = None
    for b in range(1, t + 2):
        r = t // b
        bands = _bands(b)
        if r > 0 and max(w for _, w in bands) > _MAX_TABLE_BITS:
            continue
        cost = 0.0
        for _, w in bands:
            vol = sum(comb(w, e) for e in range(r + 1))
            cost += m * vol + vol * m * m / 2.0 ** (w + 1)
        if best is None or cost < best[0]:
            best = (cost, b)
    return best[1]


def _flip_masks(width: int, r: int) -> np.ndarray:
    """All non-zero masks of at most r set bits within ``width`` bits."""
    masks = [sum(1 << p for p in bits) for e in range(1, r + 1) for bits in itertools.combinations(range(width), e)]
    return np.array(masks, dtype=np.int64)


def hash_pairs(hashes, max_distance: int = PHASH_MAX_DISTANCE, *, n_bands: int | None = None,
               chunk: int = 1 << 22, max_candidates: int = 3 * 10 ** 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs of 64-bit hashes within a Hamming distance, exactly, without comparing all pairs.

    Identical hashes are collapsed first (``np.unique``): each repeat is paired with the lowest index
    holding the same value (distance 0), a star rather than all m*(m-1)/2 pairs, so a million blank
    images cost a million pairs. Near pairs are then found among the distinct values by multi-index
    hashing: the 64 bits are cut into ``n_bands`` bands; a pair within distance t differs by at most
    ``t // n_bands`` bits in at least one band (pigeonhole). With ``n_bands = t + 1`` that is "agrees
    exactly on one band": candidates are runs of equal band values after a sort. With fewer bands each
    hash also probes its band values with up to ``t // n_bands`` bits flipped, through a dense table.
    Candidates are verified with a popcount and each pair is kept only in the first band that finds it.
    A near pair between two repeated values is reported once, between their lowest indices.

    So the result is exact for grouping: two samples are connected through the returned pairs if and
    only if they are connected through all pairs within ``max_distance``. When all hashes are distinct
    the result is exactly the set of pairs within ``max_distance``.

    Args:
        hashes: uint64 ``[n]`` (e.g. from :func:`phash`).
        max_distance: t, 0..64; pairs with distance <= t are returned.
        n_bands: bands for multi-index hashing, 1..t+1; None picks the cheapest for n under a uniform
            model (3 bands for t=8 at any n large enough to matter).
        chunk: candidates expanded and verified at once (bounds memory, ~40 bytes each).
        max_candidates: if a band would raise the running candidate count above this, ValueError is
            raised before that band is expanded. Near-identical but distinct hashes (e.g. noisy blank
            images) share band values and can make candidates quadratic; this turns that into an error
            naming the count instead of hours of work. Uniform random hashes at t=8 need about
            n**2 / 7000 candidates: 1.4e8 at 1M (about 15 s), 1.4e10 at 10M. The default allows about
            half an hour of single-threaded work.

    Returns:
        ``(i, j, dist)``: int64, int64, uint8 arrays, ``i < j``, sorted by (i, j).
    """
    h = np.ascontiguousarray(np.asarray(hashes, dtype=np.uint64).ravel())
    n = len(h)
    t = int(max_distance)
    if not 0 <= t <= HASH_BITS:
        raise ValueError(f"hash_pairs: max_distance must be in 0..64, got {t}")
    uniq, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    rep = first[inverse]
    dup = np.flatnonzero(rep != np.arange(n))
    out_i, out_j, out_d = [rep[dup]], [dup], [np.zeros(len(dup), dtype=np.uint8)]

    m = len(uniq)
    if t > 0 and m > 1:
        b = _auto_bands(m, t) if n_bands is None else int(n_bands)
        if not 1 <= b <= t + 1:
            raise ValueError(f"hash_pairs: n_bands must be in 1..{t + 1} for max_distance {t}, got {b}")
        if t // b > 0 and HASH_BITS // b + (HASH_BITS % b > 0) > _MAX_TABLE_BITS:
            raise ValueError(f"hash_pairs: {b} bands are wider than {_MAX_TABLE_BITS} bits and would need "
                             f"bit-flip probing; use n_bands >= 3 or n_bands = {t + 1}")
        ua, ub, dd = _near_pairs(uniq, t, b, chunk, max_candidates)
        i, j = first[ua], first[ub]
        out_i.append(np.minimum(i, j))
        out_j.append(np.maximum(i, j))
        out_d.append(dd)

    i = np.concatenate(out_i).astype(np.int64)
    j = np.concatenate(out_j).astype(np.int64)
    d = np.concatenate(out_d).astype(np.uint8)
    order = np.lexsort((j, i))
    return i[order], j[order], d[order]


def _near_pairs(u: np.ndarray, t: int, n_bands: int, chunk: int, max_candidates: int):
    """Pairs (a < b) of distinct sorted hashes ``u`` within distance t, as indices into u."""
    m = len(u)
    r = t // n_bands
    bands = _bands(n_bands)
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    total = 0

    def budget(count: int, band: int) -> None:
        nonlocal total
        total += count
        if total > max_candidates:
            raise ValueError(
                f"hash_pairs: more than max_candidates={max_candidates:.3g} candidate pairs by band {band} of "
                f"{n_bands} ({m} distinct hashes, max_distance {t}); many distinct hashes are nearly equal. "
                "Lower max_distance, pre-group those images, or raise max_candidates.")

    def verify(a: np.ndarray, c: np.ndarray, band: int) -> None:
        # Keep a pair only in the first band where it is within r, and only if it is within t overall.
        x = u[a] ^ u[c]
        keep = np.ones(len(a), dtype=bool)
        for shift, width in bands[:band]:
            keep &= _popcount(_band_key(x, shift, width).astype(np.uint64)) > r
        dist = _popcount(x)
        keep &= dist <= t
        lo, hi = np.minimum(a[keep], c[keep]), np.maximum(a[keep], c[keep])
        found.append((lo, hi, dist[keep]))

    for band, (shift, width) in enumerate(bands):
        key = _band_key(u, shift, width)
        order = np.argsort(key, kind="stable")
        ks = key[order]

        # Equal band values: all pairs inside each run of the sorted keys.
        run_start = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])
        run_end = np.r_[run_start[1:], m]
        lengths = run_end - run_start
        after = np.repeat(run_end, lengths) - np.arange(m) - 1  # partners after each sorted position
        budget(int(after.sum()), band)
        _expand_runs(order, after, chunk, lambda a, c: verify(a, c, band))

        if r == 0:
            continue
        # Band values within r flipped bits: a hash looks up its band value with each mask of <= r bits
        # flipped, in a dense table. The pair (key, key ^ mask) is met only from the end whose key has the
        # mask's top bit clear, so each pair is expanded once.
        counts = np.bincount(key, minlength=1 << width).astype(np.int64)
        starts = np.cumsum(counts) - counts
        masks = _flip_masks(width, r)
        tops = np.array([int(mk).bit_length() - 1 for mk in masks])
        for top in np.unique(tops):
            query = np.flatnonzero((key >> top) & 1 == 0)
            qkey = key[query]
            for mask in masks[tops == top]:
                target = qkey ^ mask
                cnt = counts[target]
                hit = np.flatnonzero(cnt)
                if not hit.size:
                    continue
                budget(int(cnt[hit].sum()), band)
                _expand_lookups(query[hit], starts[target[hit]], cnt[hit], order, chunk,
                                lambda a, c: verify(a, c, band))

    if not found:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.uint8)
    return (np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found]),
            np.concatenate([f[2] for f in found]))


def _blocks(counts: np.ndarray, chunk: int):
    """Slices of ``counts`` whose sums stay near ``chunk`` (a single larger count gets its own block)."""
    ends = np.cumsum(counts)
    a = 0
    while a < len(counts):
        base = ends[a - 1] if a else 0
        b = max(a + 1, int(np.searchsorted(ends, base + chunk, side="right")))
        yield a, b
        a = b


def _expand_runs(order: np.ndarray, after: np.ndarray, chunk: int, emit) -> None:
    """For sorted position p, pair order[p] with order[p+1 .. p+after[p]], chunk by chunk."""
    nz = np.flatnonzero(after)
    for a, b in _blocks(after[nz], chunk):
        pos, cnt = nz[a:b], after[nz[a:b]]
        left = np.repeat(pos, cnt)
        # Offset of each partner within its position's run: 1..cnt.
        offs = np.arange(len(left)) - np.repeat(np.cumsum(cnt) - cnt, cnt) + 1
        emit(order[left], order[left + offs])


def _expand_lookups(query: np.ndarray, start: np.ndarray, cnt: np.ndarray, order: np.ndarray, chunk: int,
                    emit) -> None:
    """Pair each query with order[start .. start+cnt), chunk by chunk."""
    for a, b in _blocks(cnt, chunk):
        c = cnt[a:b]
        left = np.repeat(query[a:b], c)
        offs = np.arange(len(left)) - np.repeat(np.cumsum(c) - c, c)
        emit(left, order[np.repeat(start[a:b], c) + offs])


def semdedup_pairs(emb, eps: float, *, n_clusters: int | None = None, seed: int = 0, sample: int = 64,
                   block: int = 1 << 24, chunk: int = CHUNK, max_pairs: int = 10 ** 8
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SemDeDup pairs: embeddings with cosine similarity >= ``1 - eps`` inside k-means buckets.

    As in SemDeDup (Abbas et al. 2023) and NeMo Curator: rows are L2-normalised, clustered with
    spherical k-means, and all pairs are compared only inside each cluster. Pairs that straddle two
    clusters are missed; near-duplicates are so close that they nearly always share a cluster, and more
    clusters trade a little recall for speed. ``n_clusters=1`` is the exact all-pairs search.

    Args:
        emb: ``[n, d]`` float array, may be a float16 memmap (buckets are gathered one at a time).
        eps: pairs with cosine >= 1 - eps are returned (SemDeDup uses eps around 0.01-0.1 for CLIP).
        n_clusters: buckets; None uses ``round(sqrt(n))`` clipped to [1, 50000], which balances the
            k-means cost (grows with n*k) against the in-bucket cost (grows with n**2/k).
        seed: seeds the k-means.
        sample: k-means trains on at most ``sample * n_clusters`` rows; 64 is enough for buckets (their
            exact borders only matter for the rare straddling pair) and keeps 10M rows tractable.
        block: most similarity entries computed at once inside a bucket (2**24 float32 = 64 MiB), so a
            huge bucket is processed in row blocks.
        chunk: rows per chunk for the k-means assignment.
        max_pairs: ValueError once more pairs than this are found (about 20 bytes each): a flood of
            pairs means eps is too loose or the data holds many exact copies (group those first).

    Returns:
        ``(i, j, sim)``: int64, int64, float32 arrays, ``i < j``, sorted by (i, j); sim is the cosine
        computed in float32.
    """
    n, _ = _check_matrix(emb)
    thr = np.float32(1.0 - float(eps))
    k = n_clusters if n_clusters is not None else int(np.clip(round(np.sqrt(n)), 1, 50000))
    k = max(1, min(int(k), n))
    if k == 1:
        labels = np.zeros(n, dtype=np.int32)
    else:
        labels = kmeans(emb, k, seed=seed, normalize=True, sample=sample, chunk=chunk).labels

    members = np.argsort(labels, kind="stable")  # bucket by bucket, increasing row ids inside each
    ends = np.cumsum(np.bincount(labels, minlength=k))
    out_i, out_j, out_s = [], [], []
    found = 0
    a = 0
    for e in ends:
        rows, a = members[a:e], e
        size = len(rows)
        if size < 2:
            continue
        x = _rows_f32(emb, 0, n, True) if size == n else _take_f32(emb, rows, True)
        step = max(1, block // size)
        for r0 in range(0, size, step):
            r1 = min(r0 + step, size)
            # Only columns from r0 on: the upper triangle of this row block and everything right of it.
            sims = x[r0:r1] @ x[r0:].T
            rr, cc = np.nonzero(sims >= thr)
            upper = cc > rr  # column index c means row r0 + c; keep pairs (p, q) with p < q
            rr, cc = rr[upper], cc[upper]
            if not rr.size:
                continue
            found += rr.size
            if found > max_pairs:
                raise ValueError(f"semdedup_pairs: more than max_pairs={max_pairs:.3g} pairs at eps={eps}; "
                                 "eps is too loose or the data holds many exact copies (group them first)")
            out_i.append(rows[r0 + rr])
            out_j.append(rows[r0 + cc])
            out_s.append(sims[rr, cc])

    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    i = np.concatenate(out_i).astype(np.int64)
    j = np.concatenate(out_j).astype(np.int64)
    s = np.concatenate(out_s).astype(np.float32)
    order = np.lexsort((j, i))
    return i[order], j[order], s[order]


def group_pairs(n: int, i, j) -> np.ndarray:
    """Connected components of the graph on ``0..n-1`` with edges (i, j).

    Returns:
        int64 ``[n]``: each sample's group id, the smallest index in its component (a sample in no pair
        is its own group).
    """
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components

    i = np.asarray(i, dtype=np.int64)
    j = np.asarray(j, dtype=np.int64)
    graph = sparse.coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n)).tocsr()
    _, comp = connected_components(graph, directed=False)
    # np.unique's return_index is the first (= smallest) index of each component.
    _, smallest, inverse = np.unique(comp, return_index=True, return_inverse=True)
    return smallest[inverse].astype(np.int64)


def choose_keepers(group, quality, *, higher_is_better: bool = True) -> np.ndarray:
    """Keep the best-quality member of every group.

    Args:
        group: int ``[n]`` group ids (any labels; e.g. from :func:`group_pairs`).
        quality: float ``[n]``; NaN (unscored) ranks below every number, -inf included.
        higher_is_better: False keeps the lowest value instead.

    Returns:
        int64 ``[n]``: ``kept_index[i] == i`` for the kept sample of each group, else the index of the
        kept member of i's group. Ties go to the lowest index.
    """
    g = np.asarray(group, dtype=np.int64)
    q = np.asarray(quality, dtype=np.float64)
    if g.shape != q.shape or g.ndim != 1:
        raise ValueError(f"choose_keepers: group and quality must be 1-D of one length, got {g.shape}, {q.shape}")
    n = len(g)
    missing = np.isnan(q)
    rank = np.where(missing, 0.0, -q if higher_is_better else q)
    idx = np.arange(n)
    # Last key is primary: by group, numbers before NaN, best value first, then lowest index.
    order = np.lexsort((idx, rank, missing, g))
    gs = g[order]
    head = np.r_[True, gs[1:] != gs[:-1]] if n else np.zeros(0, dtype=bool)
    head_pos = np.maximum.accumulate(np.where(head, idx, 0))
    kept = np.empty(n, dtype=np.int64)
    kept[order] = order[head_pos]
    return kept


def pair_similarity_to_keeper(kept_index, *, embeddings=None, hashes=None, chunk: int = CHUNK) -> np.ndarray:
    """Similarity of every dropped sample to the sample kept in its place.

    Groups are transitive (a ~ b ~ c groups a with c), so a dropped sample can be further from its
    keeper than the pair threshold; this is the number to audit.

    Args:
        kept_index: int ``[n]`` from :func:`choose_keepers`.
        embeddings: ``[n, d]`` float array (may be a memmap): cosine similarity is returned.
        hashes: uint64 ``[n]``: ``1 - hamming / 64`` is returned. Give exactly one of the two.
        chunk: dropped samples processed at once (embeddings only).

    Returns:
        float32 ``[n]``: the similarity for dropped samples, NaN for kept ones.
    """
    kept = np.asarray(kept_index, dtype=np.int64)
    if (embeddings is None) == (hashes is None):
        raise ValueError("pair_similarity_to_keeper: give exactly one of embeddings= or hashes=")
    n = len(kept)
    out = np.full(n, np.nan, dtype=np.float32)
    dropped = np.flatnonzero(kept != np.arange(n))
    if hashes is not None:
        h = np.asarray(hashes, dtype=np.uint64)
        out[dropped] = 1.0 - hamming(h[dropped], h[kept[dropped]]) / np.float32(HASH_BITS)
        return out
    for a in range(0, len(dropped), chunk):
        d = dropped[a:a + chunk]
        x = _take_f32(embeddings, d, True)
        y = _take_f32(embeddings, kept[d], True)
        out[d] = np.einsum("ij,ij->i", x, y)
    return out
