"""The conformance kit's multi-vector retriever cases (adapters/retrieval.py): transformers'
``ColPaliForRetrieval`` and ``ColQwen2ForRetrieval`` built tiny from configs, eager attention
(the ``attention`` signal HPC-ColPali reads), token ids built by hand (their processors'
tokenizers come from the hub). :class:`RetrievalCase` is hooked into tests/cases.py ``CASES``."""

from __future__ import annotations

from typing import ClassVar

import torch

from tests.cases import PixelCase

IMAGE, START, END = 60, 62, 63
#: ColQwen2: 16 x 16 images of 4-px patches, merged 2 x 2 into a 4 x 4 grid of 16 tokens
QWEN_PATCHES, QWEN_PATCH_DIM = 64, 3 * 2 * 4 * 4
PROMPT = [2, 5, 6, 7]


def tiny_colpali(seed: int = 0):
    """ColPali: a 2-layer SigLIP tower on 32 x 32 images of 8-px patches (16 image tokens), a
    2-layer Gemma (64-token vocabulary), 16-d embeddings."""
    from transformers import ColPaliConfig, ColPaliForRetrieval, PaliGemmaConfig

    torch.manual_seed(seed)
    vlm = PaliGemmaConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8, "projection_dim": 32},
        text_config={"model_type": "gemma", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 8},
        image_token_id=IMAGE, projection_dim=32, vocab_size=64)
    model = ColPaliForRetrieval(ColPaliConfig(vlm_config=vlm, embedding_dim=16)).eval()
    model.set_attn_implementation("eager")
    return model


def tiny_colqwen2(seed: int = 0):
    """ColQwen2: a 2-block Qwen2-VL tower (4-px patches, 2 x 2 merge), a 2-layer Qwen2 LLM with
    M-RoPE, 16-d embeddings."""
    from transformers import ColQwen2Config, ColQwen2ForRetrieval, Qwen2VLConfig

    torch.manual_seed(seed)
    vlm = Qwen2VLConfig(
        text_config={"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "bos_token_id": 1, "eos_token_id": 2,
                     "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}},
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 4, "in_channels": 3, "patch_size": 4,
                       "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=IMAGE, video_token_id=61, vision_start_token_id=START, vision_end_token_id=END, vocab_size=64)
    model = ColQwen2ForRetrieval(ColQwen2Config(vlm_config=vlm, embedding_dim=16)).eval()
    model.set_attn_implementation("eager")
    return model


def documents(kind: str, n: int, seed: int) -> dict:
    """``n`` document pages as the processors lay them out: ColPali the 16 image tokens then the
    prompt; ColQwen2 vision start, 16 image tokens, vision end, the prompt (``image_grid_thw``
    1 x 8 x 8 each)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "colpali":
        ids = torch.tensor([[IMAGE] * 16 + PROMPT] * n)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(n, 3, 32, 32, generator=gen)}
    ids = torch.tensor([[START] + [IMAGE] * 16 + [END] + PROMPT] * n)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "image_grid_thw": torch.tensor([[1, 8, 8]] * n),
            "pixel_values": torch.randn(n, QWEN_PATCHES, QWEN_PATCH_DIM, generator=gen)}


def image_positions(kind: str) -> torch.Tensor:
    """Where the image tokens sit in :func:`documents`' rows."""
    return torch.arange(16) if kind == "colpali" else torch.arange(1, 17)


class RetrievalCase(PixelCase):
    """A tiny retriever on document pages (:func:`documents`); the output is the embeddings, so
    equal outputs mean equal MaxSim scores. Methods act at ``output`` (16 patches per page, 4 x 4)."""

    N = 16
    full_budget = 1.0
    full_counts: ClassVar[list[int]] = [N, N]
    budget = unwrap_budget = 0.5
    has_generate = False
    has_cls = False
    #: the boundary methods reading the tokens only, and HPC-ColPali
    served = frozenset({"divprune", "uniform", "random", "hpc_colpali"})

    def __init__(self, kind: str = "colpali"):
        self.kind = self.id = kind
        self.family = "retrieval"
        self.variant = kind != "colpali"

    def build(self):
        return tiny_colpali() if self.kind == "colpali" else tiny_colqwen2()

    def inputs(self, n, seed):
        return documents(self.kind, n, seed)

    def single(self, inputs, i, seed):
        return {key: value[i : i + 1] for key, value in inputs.items()}

    def forward(self, model, inputs):
        with torch.no_grad():
            return model(**inputs).embeddings

    def visual_counts(self, handle):
        points = handle.stats["points"]
        return list(points[-1]["out"]) if points else self.full_counts

    def assert_unpatched(self, model):
        assert not hasattr(model, "_vlmprune_handle")

    def restriction(self, row, oracle):
        from tests.cases import EXPECT

        if oracle == "cache":
            return "a retriever has no generate() and no cache"
        if EXPECT[row].method not in self.served:
            return ("acts on a retriever only through signals or stages it lacks (a projector, an LLM, a vision "
                    "tower's CLS); the retriever serves DivPrune, uniform, random and HPC-ColPali at its output")
        return super().restriction(row, oracle)

    def manual(self, model, inputs, handle, seen, pruned):
        """The unwrapped model's embeddings, each row's prompt tokens and recorded kept patches
        (merged values in their place) by plain indexing, in sequence order, zero-padded."""
        ((_, _, sel),) = seen
        with torch.no_grad():
            full = model(**inputs).embeddings
        where = image_positions(self.kind)
        rows = []
        for i, (keep, merged, _) in enumerate(sel.per_image()):
            row = full[i].clone()
            if merged is not None:
                row[where[keep]] = merged
            gone = set(where.tolist()) - set(where[keep].tolist())
            rows.append(row[[t for t in range(row.shape[0]) if t not in gone]])
        longest = max(r.shape[0] for r in rows)
        ref = torch.stack([torch.cat([r, r.new_zeros(longest - r.shape[0], r.shape[1])]) for r in rows])
        torch.testing.assert_close(pruned, ref, atol=1e-6, rtol=0)
