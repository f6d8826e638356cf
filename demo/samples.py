"""The demo's bundled sample images (``assets/samples/``) and how they were made.

``assets/samples/samples.json`` lists each file with a question (and the expected answer where
one is known). The files are committed; :func:`generate` rebuilds them offline, deterministically:

    python -m vlmprune.demo.samples            # writes assets/samples/

* easy-VQA test images (64x64, PNG) with one of their own test questions (``easy-vqa==1.0``, MIT);
* ``easyvqa-grid`` test mosaics (224x224, PNG: four easy-VQA test images in a 2x2 grid) with a
  question about one quadrant (:mod:`vlmprune.eval.easyvqa`);
* real photographs from ``scikit-image``'s ``skimage.data`` (public domain / CC0, see its
  documentation), resized to at most 224 px and saved as JPEG.

The embedded model only knows easy-VQA's vocabulary, so the photos come with easy-VQA-style
questions: they are there to show which tokens each method keeps on a natural image.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vlmprune.assets_dir import assets_dir

__all__ = ["generate", "samples", "samples_dir"]

#: (skimage.data function, question) for the photographs
PHOTOS = (
    ("astronaut", "what color is the shape in the top left?"),
    ("chelsea", "is there a circle?"),
    ("coffee", "what shape is in the bottom right?"),
    ("rocket", "what color is the shape?"),
)


def samples_dir() -> Path:
    """``assets/samples`` of a source checkout / editable install, or of the installed package."""
    return assets_dir("samples", "samples.json")


def samples(directory: str | Path | None = None) -> list[dict]:
    """The bundled samples: dicts with ``path`` (absolute), ``file``, ``question``, ``answer``
    (None when unknown), ``kind`` and ``source``. Empty if the directory has no samples.json."""
    d = Path(directory) if directory is not None else samples_dir()
    index = d / "samples.json"
    if not index.exists():
        return []
    rows = json.loads(index.read_text())
    return [dict(r, path=str(d / r["file"])) for r in rows if (d / r["file"]).exists()]


def generate(out: str | Path | None = None, n_easyvqa: int = 3, n_grid: int = 3) -> list[dict]:
    """Write the sample images and ``samples.json`` to ``out`` (default :func:`samples_dir`)."""
    import numpy as np
    from PIL import Image
    from skimage import data
    from vlmprune.eval.easyvqa import load_task

    out = Path(out) if out is not None else samples_dir()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    seen = set()
    def wh_first(rows):  # open questions ("what color ...") show more than yes/no ones
        return sorted(rows, key=lambda r: not r.question.startswith("what"))

    for s in wh_first(load_task("easyvqa-grid", "test", n=8 * n_grid, seed=0)):
        if s.image_id in seen or len([r for r in rows if r["kind"] == "grid"]) >= n_grid:
            continue
        seen.add(s.image_id)
        name = f"grid_{len(seen)}.png"
        s.image.save(out / name, optimize=True)
        rows.append(dict(file=name, question=s.question, answer=s.answer, kind="grid",
                         source=f"easyvqa-grid test mosaic {s.image_id} (easy-vqa 1.0 test images, MIT)"))
    count = 0
    for s in wh_first(load_task("easyvqa", "test", n=16 * n_easyvqa, seed=0)):
        if count >= n_easyvqa or s.image_id in seen or " not " in f" {s.question} ":
            continue
        seen.add(s.image_id)
        count += 1
        name = f"easyvqa_{count}.png"
        s.image.save(out / name, optimize=True)
        rows.append(dict(file=name, question=s.question, answer=s.answer, kind="easyvqa",
                         source=f"easy-VQA test image {s.image_id.split('/')[-1]} (easy-vqa 1.0, MIT)"))
    for fn, question in PHOTOS:
        arr = getattr(data, fn)()
        img = Image.fromarray(np.asarray(arr)).convert("RGB")
        img.thumbnail((224, 224), Image.LANCZOS)
        name = f"photo_{fn}.jpg"
        img.save(out / name, quality=88, optimize=True)
        rows.append(dict(file=name, question=question, answer=None, kind="photo",
                         source=f"skimage.data.{fn}() (scikit-image; see its data documentation for the licence)"))
    (out / "samples.json").write_text(json.dumps(rows, indent=1) + "\n")
    return samples(out)


if __name__ == "__main__":
    written = generate(sys.argv[1] if len(sys.argv) > 1 else None)
    total = sum(Path(r["path"]).stat().st_size for r in written)
    print(f"{len(written)} samples, {total / 1024:.0f} KiB in {samples_dir() if len(sys.argv) < 2 else sys.argv[1]}")
