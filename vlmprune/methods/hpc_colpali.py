"""HPC-ColPali (Bach, arXiv 2506.21601): attention-guided top-p % patch pruning of a multi-vector
retriever's document patches, then K-means codes (one byte per patch) and optional binary codes.

Implemented from the paper's method description (its released code indexes text chunks with
FAISS PQ and has no binary path; its reported numbers are estimates, so none is a target here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..context import Selection, TokenContext
from ..method import Method, option
from ..registry import register


@register
@dataclass
class HPCColPali(Method):
    """At the retriever's ``output`` stage, keep the ``budget`` document patches with the highest
    salience (``wrap(budget=0.4)`` keeps 40 %; the paper keeps ``ceil(M * p)``, the fraction
    budget rounds), in raster order. Salience: the attention each patch receives in the last
    decoder layer from the document prompt's text tokens after the image, mean over heads and
    those tokens (the paper says "VLM attention" without a layer, head or query; the card
    suggests attention received or attention from the query tokens; [unverified]). A mean over
    every position favoured the first patches under a causal mask. The paper prunes the
    document patches in its method text and the query in its pipeline list; the query side is
    never pruned here.

    ``codebook`` (K, default 256: the paper's main setting; 0: no quantisation) and ``binary``
    are read by :meth:`vlmprune.retrieval.MultiVectorIndex.from_handle`, which fits scikit-learn's
    K-means over the corpus's kept patches and stores one code per patch (or its bits)."""

    name = "hpc_colpali"
    stages = ("output",)
    roles = ("output",)
    needs = frozenset({"received_attention"})
    paper = {"title": "Hierarchical Patch Compression for ColPali: Efficient Multi-Vector Document Retrieval "
             "with Dynamic Pruning and Quantization", "arxiv": "2506.21601"}

    codebook: int = option(256, "K-means codebook size K in [1, 256] (paper: K = 256 main); 0: keep floats")
    binary: bool = option(False, "store the codes' ceil(log2 K) bits and score by Hamming distance (paper's optional path)")

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.codebook <= 256:
            raise ValueError(f"option 'codebook' of method 'hpc_colpali' must be an int in [1, 256], or 0 (floats), got {self.codebook!r}")
        if self.binary and not self.codebook:
            raise ValueError("option 'binary' of method 'hpc_colpali' needs a codebook (an int K in [1, 256])")

    def select(self, ctx: TokenContext) -> Selection:
        salience = ctx.signals.get("received_attention").float()
        keep = torch.sort(salience.topk(ctx.budget, dim=-1).indices, dim=-1).values
        return Selection(keep=keep, scores=salience)
