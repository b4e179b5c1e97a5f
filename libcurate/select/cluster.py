"""Clustering of embedding matrices for selection: k-means, balanced subsets and spectral clusters.

Everything here works on a plain ``[n, d]`` array (``np.ndarray`` or ``np.memmap``, float16/32/64) and
returns numpy arrays; nothing reads or writes storage. Rows are read ``chunk`` at a time and converted to
float32 chunk-wise, so a float16 memmap of 10M rows never has to fit in memory as float32.

The seed (InstructionGPT-4, SEEDS.md 1.5 and 1.8) used scikit-learn on a few thousand raw features; it
balanced k-means clusters by list order and dropped 19 samples, and ran spectral clustering on
unnormalised features. Here:

- ``kmeans``: k-means++ seeding and Lloyd iterations in faiss on a seeded subsample, then
  every row assigned in chunks. Deterministic for a given seed (on a given machine and BLAS).
- ``balanced_split``: k-means, then a capacity-constrained greedy assignment by distance to the
  centroid that assigns every sample; sizes differ by at most one.
- ``spectral``: spectral clustering of a kNN graph of L2-normalised rows; above ``max_direct`` rows it
  clusters k-means anchors instead and gives each row its anchor's label.

Distances are squared L2 in the space that was clustered. With ``normalize=True`` rows and centroids
are unit vectors, so a distance is ``2 * (1 - cos)``: 0 for the same direction, 2 for orthogonal.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

CHUNK = 65536  # rows per chunk: 65536 x 1024 float32 = 256 MiB at the widest embeddings we use


def _use_all_cores() -> None:
    # faiss's OpenMP default ignores CPU affinity and quotas (containers, taskset): count the cores we may use.
    from ..cpus import available_cores

    faiss.omp_set_num_threads(available_cores())


def _rows_f32(x, start: int, stop: int, normalize: bool) -> np.ndarray:
    """Rows ``start:stop`` of ``x`` as a contiguous float32 array, L2-normalised if asked."""
    part = np.ascontiguousarray(x[start:stop], dtype=np.float32)
    if normalize:
        norms = np.linalg.norm(part, axis=1, keepdims=True)
        # Zero rows (missing embeddings) stay zero instead of becoming NaN.
        np.divide(part, norms, out=part, where=norms > 0)
    return part


def _take_f32(x, rows: np.ndarray, normalize: bool) -> np.ndarray:
    """The given rows of ``x`` (any order) as float32; reads a memmap in increasing row order."""
    order = np.argsort(rows, kind="stable")
    out = np.empty((len(rows), x.shape[1]), dtype=np.float32)
    out[order] = x[rows[order]]
    if normalize:
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
    return out


def _check_matrix(x) -> tuple[int, int]:
    if getattr(x, "ndim", None) != 2:
        raise ValueError(f"want a 2-D [n, d] array, got shape {getattr(x, 'shape', None)}")
    return int(x.shape[0]), int(x.shape[1])


def l2_normalize(x, chunk: int = CHUNK) -> np.ndarray:
    """Unit-length rows.

    Args:
        x: ``[n, d]`` array of any float dtype (a memmap is read ``chunk`` rows at a time).
        chunk: rows converted at once.

    Returns:
        ``[n, d]`` float32 in memory; rows whose norm is zero stay zero.
    """
    n, d = _check_matrix(x)
    out = np.empty((n, d), dtype=np.float32)
    for a in range(0, n, chunk):
        out[a:a + chunk] = _rows_f32(x, a, min(a + chunk, n), True)
    return out


def _flat_index(centroids: np.ndarray, normalize: bool) -> faiss.Index:
    index = faiss.IndexFlatIP(centroids.shape[1]) if normalize else faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index


def _search(index: faiss.Index, rows: np.ndarray, k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """k nearest centroids of each row, nearest first, as (squared L2 distances, ids)."""
    sims, ids = index.search(rows, k)
    # Unit vectors: |a - b|^2 = 2 - 2 cos. faiss's L2 uses |a|^2 + |b|^2 - 2ab, which can dip below 0.
    dist = 2.0 - 2.0 * sims if normalize else sims
    np.maximum(dist, 0.0, out=dist)
    return dist.astype(np.float32, copy=False), ids


def _assign(x, centroids: np.ndarray, normalize: bool, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row of ``x``: (labels int32 [n], squared L2 distances float32 [n])."""
    n = x.shape[0]
    index = _flat_index(centroids, normalize)
    labels = np.empty(n, dtype=np.int32)
    dist = np.empty(n, dtype=np.float32)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        dd, ii = _search(index, _rows_f32(x, a, b, normalize), 1, normalize)
        labels[a:b], dist[a:b] = ii[:, 0], dd[:, 0]
    return labels, dist


@dataclass
class KMeansResult:
    """Output of :func:`kmeans`.

    Attributes:
        centroids: float32 ``[k, d]`` (unit rows when the data were normalised).
        labels: int32 ``[n]``, the nearest centroid of every row.
        distances: float32 ``[n]``, squared L2 distance to that centroid (``2 * (1 - cos)`` when
            normalised).
        inertia: sum of ``distances`` over all rows (float64 sum).
        objective: the training objective of the kept restart (mean squared distance over the training
            subsample), the value restarts are compared on.
    """

    centroids: np.ndarray
    labels: np.ndarray
    distances: np.ndarray
    inertia: float
    objective: float


def kmeans(x, k: int, *, seed: int = 0, n_init: int = 1, niter: int = 20, normalize: bool = True,
           sample: int = 256, chunk: int = CHUNK) -> KMeansResult:
    """k-means with k-means++ seeding, trained on a subsample and applied to every row.

    Seeding is faiss's own k-means++ (D^2 sampling). scikit-learn's ``kmeans_plusplus`` gives the same
    kind of start but is far slower at large k: with k=1000 on 2 cores it took 15 s for 16,000 x 512
    rows (its cost grows with rows x k), faiss 5 s for 64,000; SemDeDup buckets need k in the thousands.

    Args:
        x: ``[n, d]`` array, any float dtype; may be a memmap (only the subsample and one chunk of rows
            are held as float32 at a time).
        k: number of clusters, ``1 <= k <= n``.
        seed: seeds the subsample, the k-means++ draws and faiss; restart ``i`` uses ``seed + i``.
        n_init: restarts; the one with the lowest training objective is kept.
        niter: Lloyd iterations per restart.
        normalize: L2-normalise rows and keep centroids on the unit sphere (spherical k-means), the
            right geometry for CLIP-like embeddings.
        sample: at most ``sample * k`` rows train the centroids (faiss's ``max_points_per_centroid``);
            256 is faiss's default; training cost grows with ``sample * k**2``.
        chunk: rows assigned per faiss search.

    Returns:
        :class:`KMeansResult`. Same inputs and seed give the same result on the same machine.
    """
    n, d = _check_matrix(x)
    if not 1 <= k <= n:
        raise ValueError(f"kmeans: need 1 <= k <= n, got k={k}, n={n}")
    if n_init < 1 or niter < 1 or sample < 1:
        raise ValueError("kmeans: n_init, niter and sample must be >= 1")
    _use_all_cores()
    rng = np.random.default_rng(seed)
    m = min(n, sample * k)
    # One subsample for all restarts, so their objectives are comparable.
    rows = np.arange(n) if m == n else np.sort(rng.choice(n, size=m, replace=False))
    train = _take_f32(x, rows, normalize)

    best = None
    for i in range(n_init):
        km = faiss.Kmeans(d, k, niter=niter, seed=seed + i, spherical=normalize,
                          init_method=faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
                          max_points_per_centroid=sample,
                          # faiss prints a warning below 39 points per centroid; small k-means is allowed.
                          min_points_per_centroid=1)
        km.train(train)
        # faiss's own obj is measured before the last centroid update and is a similarity when
        # spherical; recompute one definition for every restart.
        dist, _ = _search(_flat_index(km.centroids, normalize), train, 1, normalize)
        obj = float(dist.astype(np.float64).mean())
        if best is None or obj < best[0]:
            best = (obj, km.centroids.copy())

    obj, centroids = best
    labels, dist = _assign(x, centroids, normalize, chunk)
    return KMeansResult(centroids=centroids, labels=labels, distances=dist,
                        inertia=float(dist.sum(dtype=np.float64)), objective=obj)


@dataclass
class SplitResult:
    """Output of :func:`balanced_split`.

    Attributes:
        labels: int32 ``[n]``, subset of every sample (every sample has one).
        distances: float32 ``[n]``, squared L2 distance to the centroid of its subset.
        sizes: int64 ``[k]``, samples per subset; they differ by at most one and sum to n.
        centroids: float32 ``[k, d]``, the k-means centroid that anchors each subset.
        kmeans_labels: int32 ``[n]``, the unconstrained nearest centroid (``labels != kmeans_labels``
            marks the samples moved to respect the capacities).
    """

    labels: np.ndarray
    distances: np.ndarray
    sizes: np.ndarray
    centroids: np.ndarray
    kmeans_labels: np.ndarray


def balanced_split(x, n_subsets: int, *, seed: int = 0, n_init: int = 10, normalize: bool = True,
                   chunk: int = CHUNK) -> SplitResult:
    """Split all n samples into ``n_subsets`` subsets of equal size (+-1) that follow k-means clusters.

    k-means gives one centroid per subset. Capacities are ``n // k`` and the ``n % k`` subsets whose
    k-means clusters are largest get one more (ties: lower subset id): those clusters have a surplus
    anyway, so the extra slots keep samples in their own cluster instead of pushing them out.

    Assignment is greedy over (sample, centroid) pairs in increasing distance: a pair is taken when the
    sample is still free and the subset still has room. So a sample is in its nearest subset unless that
    subset filled up with samples at least as close to its centroid, and no sample is dropped (the seed
    handed over surplus ids in list order and silently dropped 19 of 3,439).

    The greedy scan is done in rounds: each free sample proposes its nearest subset with room; proposals
    are accepted in distance order up to the first one that overflows a subset; that subset is then full.
    This gives exactly the sequential greedy's result in at most ``k`` vectorised rounds.

    Args:
        x: ``[n, d]`` array, any float dtype, may be a memmap.
        n_subsets: k, ``1 <= k <= n``.
        seed, n_init, normalize: passed to :func:`kmeans`.
        chunk: rows per faiss search.

    Returns:
        :class:`SplitResult`.

    Memory: the per-row centroid ranking is held in full, about ``6 * n * k`` bytes (1M x 30: 180 MB;
    10M x 30: 1.8 GB); that bounds the n x k this function is meant for.
    """
    n, _ = _check_matrix(x)
    k = int(n_subsets)
    km = kmeans(x, k, seed=seed, n_init=n_init, normalize=normalize, chunk=chunk)

    # Every row's centroids, nearest first: the columns of `pref` are its proposals in order.
    index = _flat_index(km.centroids, normalize)
    pref = np.empty((n, k), dtype=np.int16 if k < 2 ** 15 else np.int32)
    pdist = np.empty((n, k), dtype=np.float32)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        pdist[a:b], pref[a:b] = _search(index, _rows_f32(x, a, b, normalize), k, normalize)

    kmeans_sizes = np.bincount(km.labels, minlength=k)
    cap = np.full(k, n // k, dtype=np.int64)
    # Stable sort on -size: the largest clusters first, ties to the lower id.
    cap[np.argsort(-kmeans_sizes, kind="stable")[: n % k]] += 1

    labels = np.full(n, -1, dtype=np.int32)
    dist = np.zeros(n, dtype=np.float32)
    room = cap.copy()
    ptr = np.zeros(n, dtype=np.int64)
    free = np.arange(n)
    while free.size:
        # Move each free sample's pointer past subsets that are full. Total room equals the number of free
        # samples, so some subset always has room and the pointer stays < k.
        stuck = free[room[pref[free, ptr[free]]] == 0]
        while stuck.size:
            ptr[stuck] += 1
            stuck = stuck[room[pref[stuck, ptr[stuck]]] == 0]
        sub = pref[free, ptr[free]].astype(np.int64)
        d_free = pdist[free, ptr[free]]
        # Distance order; `free` is increasing, so the stable sort breaks ties by sample id.
        order = np.argsort(d_free, kind="stable")
        sub_o = sub[order]
        # Rank of each proposal among the proposals for the same subset, in distance order.
        by_sub = np.argsort(sub_o, kind="stable")
        counts = np.bincount(sub_o, minlength=k)
        starts = np.cumsum(counts) - counts
        rank = np.empty(len(order), dtype=np.int64)
        rank[by_sub] = np.arange(len(order)) - starts[sub_o[by_sub]]
        over = rank >= room[sub_o]
        stop = int(np.argmax(over)) if over.any() else len(order)
        take = order[:stop]
        labels[free[take]] = sub[take]
        dist[free[take]] = d_free[take]
        room -= np.bincount(sub[take], minlength=k)
        keep = np.ones(len(free), dtype=bool)
        keep[take] = False
        free = free[keep]

    sizes = np.bincount(labels, minlength=k).astype(np.int64)
    return SplitResult(labels=labels, distances=dist, sizes=sizes, centroids=km.centroids,
                       kmeans_labels=km.labels)


@dataclass
class SpectralResult:
    """Output of :func:`spectral`.

    Attributes:
        labels: int32 ``[n]``; cluster 0 is the largest (ties: the cluster holding the lowest index).
        sizes: int64 ``[n_clusters]``, members per cluster (a cluster can be empty only if the spectral
            step produced fewer clusters than asked).
        n_components: connected components of the kNN graph that was clustered; above ``n_clusters``
            the graph is fragmented and small components may each take a cluster.
        anchors: int32 ``[n]`` k-means anchor of every row on the anchor path, else None.
    """

    labels: np.ndarray
    sizes: np.ndarray
    n_components: int
    anchors: np.ndarray | None


def _knn_affinity(unit: np.ndarray, n_neighbors: int):
    """Symmetric kNN connectivity of unit rows, as scikit-learn's ``affinity='nearest_neighbors'``.

    Each row links to its ``n_neighbors`` most similar rows, itself included (``include_self=True`` in
    scikit-learn); the affinity is ``0.5 * (C + C.T)``.
    """
    from scipy import sparse

    n = unit.shape[0]
    kk = min(n_neighbors, n)
    index = faiss.IndexFlatIP(unit.shape[1])
    index.add(unit)
    _, ids = index.search(unit, kk)
    rows = np.repeat(np.arange(n), kk)
    conn = sparse.csr_matrix((np.ones(n * kk), (rows, ids.ravel())), shape=(n, n))
    conn.data[:] = 1.0  # a duplicate entry (never expected from an exact search) still counts once
    return (0.5 * (conn + conn.T)).tocsr()


def _spectral_labels(unit: np.ndarray, n_clusters: int, n_neighbors: int, seed: int) -> tuple[np.ndarray, int]:
    import warnings

    from scipy.sparse.csgraph import connected_components
    from sklearn.cluster import SpectralClustering

    affinity = _knn_affinity(unit, n_neighbors)
    n_comp, _ = connected_components(affinity, directed=False)
    if n_clusters == 1:
        return np.zeros(unit.shape[0], dtype=np.int32), n_comp
    model = SpectralClustering(n_clusters=n_clusters, affinity="precomputed", random_state=seed,
                               assign_labels="kmeans")
    with warnings.catch_warnings():
        # A disconnected graph is reported through n_components rather than a warning per call.
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        labels = model.fit_predict(affinity)
    return labels.astype(np.int32), n_comp


def _by_size(labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Renumber labels so cluster 0 is the largest; ties go to the cluster with the lower first member."""
    sizes = np.bincount(labels, minlength=k)
    first = np.full(k, len(labels), dtype=np.int64)
    np.minimum.at(first, labels, np.arange(len(labels)))
    order = np.lexsort((first, -sizes))
    new = np.empty(k, dtype=np.int32)
    new[order] = np.arange(k, dtype=np.int32)
    return new[labels], sizes[order].astype(np.int64)


def spectral(x, n_clusters: int, *, seed: int = 0, n_neighbors: int = 10, max_direct: int = 20000,
             n_anchor: int = 1000, chunk: int = CHUNK) -> SpectralResult:
    """Spectral clustering of L2-normalised rows on a kNN graph (cosine neighbours).

    Up to ``max_direct`` rows: exact kNN graph (faiss ``IndexFlatIP``) of all rows and scikit-learn's
    ``SpectralClustering(affinity='precomputed')`` (ARPACK eigenvectors, then k-means on them). Above
    it: ``kmeans`` into ``n_anchor`` centroids, spectral clustering of the centroids' kNN graph, and every
    row takes its centroid's label; a cluster therefore never splits an anchor cell.

    The seed clustered raw features; their norms vary with image content and skew the neighbour graph,
    so rows are normalised first.

    Args:
        x: ``[n, d]`` array, any float dtype, may be a memmap (the direct path holds ``n x d`` float32).
        n_clusters: ``1 <= n_clusters <= n``.
        seed: seeds the eigen-solver, the label k-means and the anchor k-means.
        n_neighbors: neighbours per row (self included), scikit-learn's default 10.
        max_direct: largest n clustered directly (ARPACK on 20k nodes takes seconds).
        n_anchor: anchors for larger n (capped at n).
        chunk: rows per chunk for normalisation and anchor assignment.

    Returns:
        :class:`SpectralResult`. A disconnected graph does not fail: ``n_components`` says so.
    """
    n, _ = _check_matrix(x)
    if not 1 <= n_clusters <= n:
        raise ValueError(f"spectral: need 1 <= n_clusters <= n, got {n_clusters}, n={n}")
    _use_all_cores()
    if n <= max_direct:
        labels, n_comp = _spectral_labels(l2_normalize(x, chunk), n_clusters, n_neighbors, seed)
        anchors = None
    else:
        m = max(n_clusters, min(n_anchor, n))
        # Anchors only need to tile the data finely; 64 rows per anchor trains them 4x faster than 256.
        km = kmeans(x, m, seed=seed, normalize=True, sample=64, chunk=chunk)
        anchor_labels, n_comp = _spectral_labels(km.centroids, n_clusters, n_neighbors, seed)
        anchors = km.labels
        labels = anchor_labels[anchors]
    labels, sizes = _by_size(labels, n_clusters)
    return SpectralResult(labels=labels, sizes=sizes, n_components=int(n_comp), anchors=anchors)
