"""Late interaction over what a wrapped retriever kept, and the document index.

:func:`maxsim` scores queries against documents, ``score(q, d) = sum_i max_j <q_i, d_j>``
(ColBERT/ColPali late interaction), zero rows on either side being padding (the retrievers'
own convention: they multiply their embeddings by the attention mask; the adapter pads kept
sets with zero rows). :class:`Codebook` is HPC-ColPali's K-means quantiser (scikit-learn's
``KMeans``, seeded; K <= 256 gives one byte per patch) with its binary codes (``ceil(log2 K)``
bits per patch, compared by Hamming distance). :class:`MultiVectorIndex` stores each document's
kept patches as floats, codes or packed bits, saves and loads, and reports its size in bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MODES = ("float", "codes", "binary")


def valid_rows(x: torch.Tensor) -> torch.Tensor:
    """``[..., L]`` bool: rows of ``x [..., L, D]`` that are not padding (not all zero)."""
    return x.abs().sum(-1) > 0


def maxsim(queries: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
    """``[Q, Dn]`` late-interaction scores of ``queries [Q, Lq, D]`` against ``documents
    [Dn, Ld, D]``: each query token's best dot product over the document's real rows, summed
    over the query's real rows (zero rows: padding, masked on both sides)."""
    sims = torch.einsum("qid,njd->qnij", queries.float(), documents.float())
    sims = sims.masked_fill(~valid_rows(documents)[None, :, None, :], float("-inf"))
    best = sims.max(-1).values
    return (best * valid_rows(queries)[:, None, :]).nan_to_num(neginf=0.0).sum(-1)


def code_bits(k: int) -> int:
    """Bits of one code of a K-entry codebook: ``ceil(log2 K)`` (at least 1)."""
    return max(1, math.ceil(math.log2(k)))


def to_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[..., bits]`` bool: each code's binary digits, most significant first."""
    shifts = torch.arange(bits - 1, -1, -1, device=codes.device)
    return (codes.long()[..., None] >> shifts) & 1 == 1


def hamming(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[..., M, N]`` Hamming distances between bit strings ``a [..., M, bits]`` and
    ``b [..., N, bits]`` (bool)."""
    return (a[..., :, None, :] != b[..., None, :, :]).sum(-1)


@dataclass
class Codebook:
    """K centroids ``[K, D]`` (float32) from K-means over patch embeddings."""

    centroids: torch.Tensor

    @classmethod
    def fit(cls, patches: torch.Tensor, k: int = 256, seed: int = 0) -> Codebook:
        """scikit-learn ``KMeans(n_clusters=k, random_state=seed, n_init=1)`` on ``patches
        [N, D]``; K <= 256 (one byte per code, HPC-ColPali's main setting K = 256) and K <= N."""
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 256:
            raise ValueError(f"parameter 'codebook' must be an int in [1, 256] (one byte per patch), got {k!r}")
        if patches.shape[0] < k:
            raise ValueError(f"parameter 'codebook': K-means with K={k} needs at least {k} patches, got {patches.shape[0]}")
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=k, random_state=seed, n_init=1).fit(patches.detach().float().cpu().numpy())
        return cls(torch.from_numpy(km.cluster_centers_).float())

    @property
    def k(self) -> int:
        return self.centroids.shape[0]

    @property
    def bits(self) -> int:
        return code_bits(self.k)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 index of the nearest centroid (L2) of each row of ``x [..., D]``."""
        dist = torch.cdist(x.float().reshape(-1, x.shape[-1]), self.centroids.to(x.device))
        return dist.argmin(-1).to(torch.uint8).reshape(x.shape[:-1])

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.centroids.to(codes.device)[codes.long()]


class MultiVectorIndex:
    """Documents' kept patch vectors, stored as ``mode``: ``"float"`` (as kept), ``"codes"``
    (one uint8 per patch, scored as MaxSim over the decoded centroids) or ``"binary"`` (the
    codes' ``ceil(log2 K)`` bits; a query token is encoded too and a patch's similarity is
    ``bits - Hamming``: HPC-ColPali's optional binary path, which carries geometry only as far
    as the centroids' numbering does; the paper does not order them [unverified reading])."""

    def __init__(self, mode: str = "float", codebook: Codebook | None = None):
        if mode not in MODES:
            raise ValueError(f"parameter 'mode' must be one of {list(MODES)}, got {mode!r}")
        if mode != "float" and codebook is None:
            raise ValueError(f"mode {mode!r} needs a codebook (Codebook.fit)")
        self.mode, self.codebook = mode, codebook
        self.docs: list[torch.Tensor] = []  # per document: [n, D] float, [n] uint8 codes
        self._padded_docs: torch.Tensor | None = None  # built by _padded(), dropped by add()

    @classmethod
    def build(cls, embeddings: list[torch.Tensor], codebook: int | None = None, binary: bool = False,
              seed: int = 0) -> MultiVectorIndex:
        """An index of the documents in ``embeddings`` (batches ``[B, L, D]``): floats, or with
        ``codebook=K`` a K-means codebook fitted on all their real rows (``binary``: bits)."""
        book = None
        if codebook is not None:
            book = Codebook.fit(torch.cat([b.reshape(-1, b.shape[-1])[valid_rows(b).reshape(-1)] for b in embeddings]),
                                codebook, seed)
        index = cls("float" if book is None else "binary" if binary else "codes", book)
        for batch in embeddings:
            index.add(batch)
        return index

    @classmethod
    def from_handle(cls, handle, model, documents) -> MultiVectorIndex:
        """Run the wrapped ``model`` on each batch of ``documents`` (dicts of its inputs) and
        :meth:`build` the index with the wrap's method options ``codebook`` / ``binary`` (absent
        or 0: floats) and seed."""
        with torch.no_grad():
            embeddings = [model(**batch).embeddings for batch in documents]
        method = handle.method
        return cls.build(embeddings, getattr(method, "codebook", 0) or None, getattr(method, "binary", False), method.seed)

    def add(self, embeddings: torch.Tensor) -> None:
        """Add documents from a (wrapped) retriever's ``embeddings [B, L, D]``: each row's real
        (non-zero) rows."""
        for row in embeddings.detach().cpu():
            kept = row[valid_rows(row)]
            self.docs.append(kept.float() if self.mode == "float" else self.codebook.encode(kept))
        self._padded_docs = None

    def __len__(self) -> int:
        return len(self.docs)

    def _padded(self) -> torch.Tensor:
        """The documents as one zero-padded ``[N, Lmax, D]`` tensor (codes decoded; binary mode:
        ``[N, Lmax]`` codes padded with -1), built once until :meth:`add` changes them."""
        if self._padded_docs is None:
            longest = max(d.shape[0] for d in self.docs)
            if self.mode == "float":
                rows = [torch.cat([d, d.new_zeros(longest - d.shape[0], d.shape[1])]) for d in self.docs]
            elif self.mode == "codes":
                width = self.codebook.centroids.shape[1]
                rows = [torch.cat([self.codebook.decode(d), torch.zeros(longest - d.shape[0], width)]) for d in self.docs]
            else:
                rows = [torch.cat([d.long(), torch.full((longest - d.shape[0],), -1)]) for d in self.docs]
            self._padded_docs = torch.stack(rows)
        return self._padded_docs

    def scores(self, queries: torch.Tensor) -> torch.Tensor:
        """``[Q, len(self)]`` scores of ``queries [Q, Lq, D]`` (zero rows: padding)."""
        queries = queries.detach().cpu().float()
        if self.mode != "binary":
            return maxsim(queries, self._padded())
        # binary: a patch's similarity to a query token is bits - Hamming(codes), read from a table
        # over every pair of codes, for all documents at once (in chunks bounding the memory)
        bits = self.codebook.bits
        all_bits = to_bits(torch.arange(2 ** bits), bits)
        table = bits - hamming(all_bits, all_bits)  # [2^bits, 2^bits]
        q_valid = valid_rows(queries)
        per_query = table[self.codebook.encode(queries).long()]  # [Q, Lq, 2^bits]
        docs = self._padded()  # [N, Lmax], -1 = padding
        q, lq = q_valid.shape
        chunk = max(1, (1 << 24) // max(1, q * lq * docs.shape[1]))
        out = []
        for part in docs.split(chunk):
            sim = per_query[:, :, part.clamp_min(0)]  # [Q, Lq, n, Lmax]
            sim = sim.masked_fill((part < 0)[None, None], -1)
            out.append((sim.max(-1).values * q_valid[:, :, None]).sum(1))
        return torch.cat(out, dim=1).float()

    def search(self, queries: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores, ids)`` of the top ``k`` documents per query."""
        return self.scores(queries).topk(min(k, len(self)), dim=-1)

    def document_bytes(self) -> list[int]:
        """Stored bytes per document: float ``n * D * 4``; codes ``n`` (one byte each); binary
        ``ceil(n * bits / 8)`` (as packed on disk or an edge device; held here as uint8 codes). ``n``
        counts every vector a document kept: its patches and its prompt's text tokens. The shared
        codebook is :meth:`codebook_bytes`."""
        if self.mode == "float":
            return [d.numel() * 4 for d in self.docs]
        if self.mode == "codes":
            return [d.numel() for d in self.docs]
        return [math.ceil(d.numel() * self.codebook.bits / 8) for d in self.docs]

    def codebook_bytes(self) -> int:
        return 0 if self.codebook is None else self.codebook.centroids.numel() * 4

    @property
    def nbytes(self) -> int:
        """Size of the index in bytes: every document plus the codebook."""
        return sum(self.document_bytes()) + self.codebook_bytes()

    def save(self, path) -> None:
        torch.save({"mode": self.mode, "docs": self.docs,
                    "centroids": None if self.codebook is None else self.codebook.centroids}, path)

    @classmethod
    def load(cls, path) -> MultiVectorIndex:
        data = torch.load(path, weights_only=True)
        index = cls(data["mode"], None if data["centroids"] is None else Codebook(data["centroids"]))
        index.docs = list(data["docs"])
        return index
