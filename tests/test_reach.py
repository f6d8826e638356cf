"""easyvqa-reach (issue 16): the simulator, the task data, the expert, and the benchmark command on
a tiny policy built from a config (no training)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("easy_vqa")

from vlmprune.embedded import reach


def _key(spec):
    return (spec.scene.split, spec.scene.image_ids, spec.target, spec.start)


def test_episodes_are_seeded_and_deterministic():
    a, b = reach.episodes("test", 6, 0), reach.episodes("test", 6, 0)
    assert [_key(s) for s in a] == [_key(s) for s in b]
    assert [_key(s) for s in a] != [_key(s) for s in reach.episodes("test", 6, 1)]
    assert all(s.scene.split == "test" for s in a) and reach.scenes("train", 2, 0)[0].split == "train"
    f1, f2 = reach.render(a[0].scene, a[0].start), reach.render(b[0].scene, b[0].start)
    assert np.array_equal(np.asarray(f1), np.asarray(f2)) and f1.size == (224, 224)
    # an episode replayed gives the same cells and actions
    t1 = reach.run_episode(a[1], reach.expert_policy(a[1]))
    t2 = reach.run_episode(a[1], reach.expert_policy(a[1]))
    assert (t1.cells, t1.actions) == (t2.cells, t2.actions)


def test_camera_follows_the_agent():
    from PIL import Image
    from vlmprune.eval import easyvqa

    scene = reach.scenes("test", 1, 0)[0]
    half = np.asarray(scene.image().resize((112, 112), Image.BILINEAR))
    p, (ax, ay) = reach.VIEW_CELL, reach.AGENT_VIEW_CELL
    # by hand: the reticle runs along the edges of the agent's column and row of cells
    reticle = np.zeros((224, 224), bool)
    reticle[:, [ax * p, (ax + 1) * p - 1]] = True
    reticle[[ay * p, (ay + 1) * p - 1], :] = True
    assert np.array_equal(reach.reticle_mask(), reticle)
    for cell in [(c, r) for c in range(reach.GRID) for r in range(reach.GRID)]:
        frame = np.asarray(reach.render(scene, cell))
        assert reach.marker_cell(frame) == cell and reach.view_cell(cell, cell) == reach.AGENT_VIEW_CELL
        magenta = (np.abs(frame.astype(int) - np.array(reach.MARKER_RGB)).sum(-1) < 30)
        assert magenta[reticle].all()
        ys, xs = np.nonzero(magenta & ~reticle)  # the ring, inside the agent's cell
        assert ax * p <= xs.min() and xs.max() < (ax + 1) * p and ay * p <= ys.min() and ys.max() < (ay + 1) * p
        # the half-scale world with the agent's cell at AGENT_VIEW_CELL, the outside elsewhere
        ox, oy = (ax - cell[0]) * p, (ay - cell[1]) * p
        inside = np.zeros((224, 224), bool)
        inside[oy:oy + 112, ox:ox + 112] = True
        keep = ~magenta[oy:oy + 112, ox:ox + 112]
        assert np.array_equal(frame[oy:oy + 112, ox:ox + 112][keep], half[keep])
        assert (frame[~inside & ~reticle] == np.array(reach.OUTSIDE_RGB)).all()
        # every shape's centroid lies on its colour, in the frame cell view_cell names
        for k, (gx, gy) in enumerate(scene.centroids):
            col, row = reach.view_cell(reach.cell_of((gx, gy)), cell)
            x, y = reach.world_to_frame((gx, gy), cell)
            assert (x, y) == (ox + gx / 2, oy + gy / 2) and (col, row) == (int(x) // p, int(y) // p)
            rgb = half[int(gy / 2), int(gx / 2)].astype(int)
            assert min(easyvqa.PALETTE, key=lambda c: np.abs(rgb - easyvqa.PALETTE[c]).sum()) == scene.attrs[k][0]
    with pytest.raises(ValueError, match="no agent marker"):
        reach.marker_cell(np.full((224, 224, 3), 255, np.uint8))


def test_instruction_and_target_are_planted():
    from vlmprune.eval import easyvqa

    for spec in reach.episodes("test", 8, 3):
        scene = spec.scene
        assert len(set(scene.attrs)) == 4  # the instruction names exactly one shape
        colour, shape = scene.attrs[spec.target]
        assert spec.instruction == f"go to the {colour} {shape}"
        assert easyvqa.attributes("test")[scene.image_ids[spec.target]] == (colour, shape)
        # by hand: the target colour's pixels in the target's tile of the mosaic
        x = np.asarray(scene.image(), dtype=np.int32)
        r, c = divmod(spec.target, 2)
        tile = x[r * 112:(r + 1) * 112, c * 112:(c + 1) * 112]
        near = np.abs(tile - np.array(easyvqa.PALETTE[colour])).sum(-1) < 60
        ys, xs = np.nonzero(near)
        gx, gy = spec.goal
        assert abs(gx - (xs.mean() + 0.5 + c * 112)) < 2.0 and abs(gy - (ys.mean() + 0.5 + r * 112)) < 2.0
        assert not reach.is_success(spec.start, spec.goal)


def test_expert_takes_the_fewest_steps_and_always_succeeds():
    # planted: from cell (0, 0) to a goal in cell (3, 1): diagonal, then straight
    goal = reach.cell_centre((3, 1))
    cell, path = (0, 0), []
    while (a := reach.expert_action(cell, goal)) != (0, 0):
        path.append(a)
        cell = reach.move(cell, a)
    assert path == [(1, 1), (1, 0), (1, 0)] and cell == (3, 1)
    traces = [reach.run_episode(s, reach.expert_policy(s)) for s in reach.episodes("test", 40, 0)]
    assert all(t.success for t in traces)
    assert all(t.actions[-1] == (0, 0) and len(t.actions) <= reach.GRID for t in traces)
    assert all(max(map(abs, a)) <= reach.MAX_MOVE for t in traces for a in t.actions)


def test_simulator_clips_and_rejects_bad_actions():
    assert reach.move((0, 3), (-1, 1)) == (0, 3)
    assert reach.move((1, 1), (1, -1)) == (2, 0)
    with pytest.raises(ValueError, match=r"action components must be in \(-1, 0, 1\)"):
        reach.move((1, 1), (2, 0))
    # a policy that never stops runs MAX_STEPS steps; a batch equals the episodes one by one
    specs = reach.episodes("test", 3, 0)
    spin = reach.run_episode(specs[0], lambda f, t: (1, 0))
    assert len(spin.actions) == reach.MAX_STEPS and spin.cells[-1][0] == reach.GRID - 1
    experts = {s.instruction: s for s in specs}
    batch = reach.run_batch(specs, lambda fs, ts: [reach.expert_action(reach.marker_cell(f), experts[t].goal)
                                                  for f, t in zip(fs, ts)])
    one = [reach.run_episode(s, reach.expert_policy(s)) for s in specs]
    assert [(t.cells, t.actions, t.success) for t in batch] == [(t.cells, t.actions, t.success) for t in one]


def test_action_ids_follow_the_vla_policy_convention():
    torch = pytest.importorskip("torch")
    from vlmprune.vla import VLAPolicy

    policy = VLAPolicy(_tiny_llava(), action_dim=2, bins=reach.N_BINS, values=reach.ACTION_VALUES)
    vocab = policy.vocab_size
    for v in reach.ACTION_VALUES:
        ids = torch.tensor([[reach.action_id(v, vocab), reach.action_id(-v, vocab)]])
        assert policy.tokens_to_actions(ids).tolist() == [[v, -v]]
        assert reach.ids_to_action(ids[0].tolist(), vocab) == (v, -v)


# ----------------------------------------------------------------------------- the benchmark


def _tokenizer_and_processor():
    from vlmprune.embedded import reach_training, training

    tok = training.build_tokenizer()
    reach_training.extend_tokenizer(tok)
    return tok, training.build_processor(tok)


def _tiny_llava(tok=None, tower_layers=2):
    import torch
    from transformers import (
        Dinov2Config,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    tok = tok or _tokenizer_and_processor()[0]
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<pad>", "<s>", "</s>", "<image>")}
    vision = Dinov2Config(hidden_size=32, num_hidden_layers=tower_layers, num_attention_heads=2, intermediate_size=64,
                          patch_size=14, image_size=224, layerscale_value=1.0)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                       pad_token_id=ids["<pad>"], bos_token_id=ids["<s>"], eos_token_id=ids["</s>"])
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=ids["<image>"], vision_feature_layer=-2,
                         vision_feature_select_strategy="default", image_seq_length=256)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


@pytest.mark.parametrize("tuned", [1, 3])
def test_tuned_tower_layers_on_cached_states_equal_the_tower(tuned):
    """Training with ``--tune-tower N`` caches the states entering the top N tower layers LLaVA
    reads and runs those layers itself: the same image features as the whole tower."""
    import torch

    from vlmprune.embedded import reach_training, training

    llava = _tiny_llava(tower_layers=4)
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        whole = llava.model.get_image_features(pixel_values=pixels)
        whole = whole.pooler_output if hasattr(whole, "pooler_output") else whole
        whole = torch.stack(list(whole)) if isinstance(whole, (list, tuple)) else whole
        layers = reach_training.tuned_tower_layers(llava, tuned)
        assert layers == list(range(3 - tuned, 3))  # a 4-layer tower read at hidden_states[-2]
        cut = training.truncated_vision_tower(llava.model.vision_tower, llava.config.vision_feature_layer - tuned)
        states = training.tower_states(cut, pixels)
        assert states.shape == (2, 257, 32)  # CLS kept for the layers still to run
        mine = llava.model.multi_modal_projector(reach_training.run_tower_top(llava, states, layers))
    torch.testing.assert_close(mine.reshape(whole.shape), whole, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="--tune-tower must be in 0..3"):
        reach_training.tuned_tower_layers(llava, 4)


def test_grown_layers_start_as_the_identity_and_join_the_cache(tmp_path):
    """``--grow-layers``: the new decoder layers change nothing until trained, sit before the
    routing layer, carry their own cache slots (greedy decoding with the KV cache equals
    recomputing from scratch once they do change the output) and survive a save and reload."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from vlmprune.embedded import reach_training

    llava = _tiny_llava()
    old = list(llava.model.language_model.layers)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        before = llava(input_ids=ids).logits
        reach_training.grow_layers(llava, 2, 1)
        layers = llava.model.language_model.layers
        assert [layers[i] for i in (0, 3, 4, 5)] == old and llava.config.text_config.num_hidden_layers == 6
        assert [layer.self_attn.layer_idx for layer in layers] == list(range(6))
        torch.testing.assert_close(llava(input_ids=ids).logits, before, rtol=0, atol=0)
        for layer in layers[1:3]:
            layer.self_attn.o_proj.weight.normal_(0, 0.5)
            layer.mlp.down_proj.weight.normal_(0, 0.5)
        grown = llava(input_ids=ids).logits
        assert (grown - before).abs().max() > 1e-3
        out = llava.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        seq = ids
        for _ in range(4):  # no cache: each step recomputes the whole sequence
            seq = torch.cat([seq, llava(input_ids=seq).logits[:, -1:].argmax(-1)], 1)
        assert out.tolist() == seq.tolist()
    llava.save_pretrained(tmp_path)
    with torch.no_grad():
        reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()(input_ids=ids).logits
    torch.testing.assert_close(reloaded, grown)
    with pytest.raises(ValueError, match="--route-layer must be in 0..6"):
        reach_training.grow_layers(llava, 1, 7)


def test_binding_loss_labels_the_patches_that_show_the_named_shape():
    """``--bind-weight``: the visual tokens labelled as the target are the frame patches that show
    the named shape, found here afresh (the shape's colour in its tile of the half-scale world,
    placed by the world-to-frame map, where the frame shows that tile); a probe that reads exactly those tokens has a
    loss near 0, four patches off a large one."""
    import torch

    from vlmprune.embedded import reach_training
    from vlmprune.embedded.vit import shape_mask

    tok, _ = _tokenizer_and_processor()
    scene = reach.scenes("train", 1, 0)[0]
    frames = [(scene, (0, 0)), (scene, (3, 1)), (scene, (2, 3))]
    units = reach_training.frame_units(frames, tok)
    ids, slots, _, _, _, aux, shows, frame_of = reach_training.batch_rows(
        units, 4, np.random.default_rng(0), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id)
    planted = torch.zeros(len(ids), ids.shape[1], 1)
    P = reach.PATCH
    for r in range(len(ids)):
        prompt = ids[r, :int(aux[r, 1]) + 1].tolist()
        k = next(j for j, qa in enumerate(units[int(frame_of[r])]) if qa[0] == prompt)
        agent = frames[int(frame_of[r])][1]
        x0, y0 = (int(v) for v in reach.world_to_frame(((k % 2) * reach.FRAME / 2, (k // 2) * reach.FRAME / 2), agent))
        left, top = (k % 2) * 4 * P, (k // 2) * 4 * P  # the tile in the half-scale world
        tile = reach._half_world(scene.split, scene.image_ids).crop((left, top, left + 4 * P, top + 4 * P))
        cover = shape_mask(tile, scene.attrs[k][0]).reshape(4, P, 4, P).mean((1, 3))
        label = shows[r].view(16, 16)[y0 // P:y0 // P + 4, x0 // P:x0 // P + 4].numpy()
        assert shows[r].sum() == label.sum() > 0  # nothing labelled outside the tile
        assert (cover[label == 1] >= 0.05).all() and (label[cover >= 0.2] == 1).all()
        planted[r, slots[r].nonzero()[:, 0], 0] = shows[r]
    probe = torch.nn.Linear(1, 1)
    with torch.no_grad():
        probe.weight.fill_(40.0)
        probe.bias.fill_(-20.0)
        assert reach_training.binding_loss(probe, planted, slots, aux, shows) < 1e-6
        shifted = torch.roll(planted, 4, dims=1)  # four patches along: off the shape
        assert reach_training.binding_loss(probe, shifted, slots, aux, shows) > 0.5


def test_training_rows_are_the_sequences_the_processor_and_generate_give():
    """Behaviour cloning trains on exactly what a control step computes: each row is the
    processor's prompt for one (frame, instruction) (the instruction before the image slots),
    then dx, dy; its logits at the two action positions equal the assembled model's."""
    import torch

    from vlmprune.embedded import reach_training, training

    tok, processor = _tokenizer_and_processor()
    llava = _tiny_llava(tok)
    scene = reach.scenes("train", 1, 0)[0]
    frames = [(scene, (0, 0)), (scene, (2, 3))]
    units = reach_training.frame_units(frames, tok)
    ids, slots, mask, pos, targets, aux, _, frame_of = reach_training.batch_rows(
        units, 2, np.random.default_rng(0), llava.config.image_token_id, tok.pad_token_id)
    assert frame_of.tolist() == [0, 0, 1, 1] and slots.sum(1).tolist() == [256] * 4
    images = [reach.render(*f) for f in frames]
    cut = training.truncated_vision_tower(llava.model.vision_tower, llava.config.vision_feature_layer)
    feats = training.vision_features(cut, processor.image_processor(images, return_tensors="pt")["pixel_values"])
    with torch.no_grad():
        h, _ = reach_training.forward(llava, ids, slots, mask, pos, feats[frame_of], 1)
        mine = llava.lm_head(h[targets[:, 0], targets[:, 1]])
    vocab = len(tok)
    for r in range(len(ids)):
        n = int(targets[2 * r, 1]) + 1  # the prompt's length
        f = int(frame_of[r])
        k = next(j for j, qa in enumerate(units[f]) if qa[0] == ids[r, :n].tolist())
        text = reach.instruction(*scene.attrs[k])
        inputs = processor(images=[images[f]], text=[reach.prompt(text)], return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == ids[r, :n].tolist()
        assert tok.decode(ids[r, 1:6]) == text  # the instruction comes before the image
        dx, dy = reach.expert_action(frames[f][1], scene.centroids[k])
        assert targets[2 * r:2 * r + 2, 2].tolist() == [reach.action_id(dx, vocab), reach.action_id(dy, vocab)]
        assert aux[r, 1:].tolist() == [n - 1, *reach.view_cell(reach.cell_of(scene.centroids[k]), frames[f][1])]
        with torch.no_grad():
            logits = llava(input_ids=ids[r:r + 1, :n + 1], pixel_values=inputs["pixel_values"]).logits[0]
        torch.testing.assert_close(mine[2 * r:2 * r + 2], logits[n - 1:n + 1], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def tiny_policy_dir(tmp_path_factory):
    tok, processor = _tokenizer_and_processor()
    d = tmp_path_factory.mktemp("tiny_reach_policy")
    _tiny_llava(tok).save_pretrained(d)
    processor.save_pretrained(d)
    return d


def test_eval_command_runs_the_benchmark_on_a_tiny_policy(tiny_policy_dir, tmp_path):
    from vlmprune import cli
    from vlmprune.tools import eval_reach

    out = tmp_path / "bench"
    cli.main(["eval", "--task", "easyvqa-reach", "--model", str(tiny_policy_dir), "--episodes", "2",
              "--methods", "uniform,vla_pruner,vla_pruner (no temporal)", "--budgets", "0.25", "--out", str(out)])
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["method"], r["budget"]) for r in rows] == [
        ("none", 1.0), ("vla_pruner", 0.25), ("vla_pruner (no temporal)", 0.25), ("uniform", 0.25)]
    by = {r["method"]: r for r in rows}
    assert all(r["episodes"] == 2 and 0 <= r["success_rate"] <= 1 and r["prefill_ms"] > 0 for r in rows)
    assert by["uniform"]["tokens_final"] == 64.0 and by["none"]["tokens_final"] == 256.0
    # the unwrapped row is the policy's own closed loop, episode by episode
    policy, processor = eval_reach.load_policy(tiny_policy_dir)
    specs = reach.episodes("test", 2, 0)
    act = eval_reach.actor(policy, processor)
    by_hand = [reach.run_episode(s, act) for s in specs]
    assert by["none"]["success_rate"] == sum(t.success for t in by_hand) / 2
    assert by["none"]["mean_steps"] == sum(len(t.actions) for t in by_hand) / 2
    assert by["none"]["steps_timed"] == sum(len(t.actions) for t in by_hand)
    for name in ("results.csv", "table.md", "success_vs_keep.png"):
        assert (out / name).stat().st_size > 0
    assert "| uniform |" in (out / "table.md").read_text()


def test_vision_memo_returns_the_same_features(tiny_policy_dir):
    import torch

    from vlmprune.tools import eval_reach

    policy, processor = eval_reach.load_policy(tiny_policy_dir)
    spec = reach.episodes("test", 1, 0)[0]
    inputs = processor(images=[reach.render(spec.scene, spec.start)], text=[reach.prompt(spec.instruction)],
                       return_tensors="pt")
    with torch.no_grad():
        plain = policy.llava(**inputs).logits
        memo = eval_reach.VisionMemo(policy.llava)
        with memo:
            first, again = policy.llava(**inputs).logits, policy.llava(**inputs).logits
    assert len(memo.cache) == 1
    assert torch.equal(plain, first) and torch.equal(plain, again)
    assert "forward" not in vars(policy.llava.model.vision_tower)  # restored


def test_eval_command_refuses_bad_arguments(tiny_policy_dir, tmp_path):
    from vlmprune.tools import eval_reach

    with pytest.raises(SystemExit, match="unknown"):
        eval_reach.main(["--methods", "fastvv", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"fractions in \(0, 1\]"):
        eval_reach.main(["--budgets", "2", "--out", str(tmp_path)])
