"""Hostile and unusual inputs through the job: every input ends as a row or an error row.

The corpus is generated here: broken files (each with the stage it must fail in), valid but
unusual images (each with a reference picture built independently of the job's decoder, run
through eager torchvision), a decompression bomb and an object deleted after listing. What each
file gives (its error row and stage, or its numbers) is checked on the job's stages without Ray
(`helpers.run_stages`); one Ray job over the corpus proves the counts, the failure budget and
that the job writes what the stages compute; one proves a device fault fails the run.
"""

from __future__ import annotations

import glob
import io
import json
import os
import struct
import subprocess
import sys
import zlib

import helpers
import numpy as np
import pyarrow.dataset as pads
import pytest
import ray.cloudpickle
import torch
from helpers import ROOT, cosine, make_cfg, run_stages
from PIL import Image

from resnet_features.core.errors import ConfigError
from resnet_features.core.models import resolve_model
from resnet_features.core.samples import load_photo
from resnet_features.extract import pipeline
from resnet_features.extract.inference import (
    DEVICE_RETRIES,
    InferenceOptions,
    ModelRunner,
    ModelStageError,
)
from resnet_features.extract.inputs import ReadBytes, list_inputs
from resnet_features.extract.outputs import for_task

# Ray workers cannot import this test module: ship its runner classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

#: --max-image-bytes for the corpus runs: the bomb file fits, "oversize.png" does not.
MAX_IMAGE_BYTES = 6_000_000
MISSING = "missing.jpg"  # listed, then deleted before it is read


# ---------------------------------------------------------------- corpus generation


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_bomb(width: int, height: int, rows_per_block: int = 16) -> bytes:
    """A valid RGB PNG of zeros that needs width*height*3 bytes to decode, built in ~0.1 s.

    Each block of rows is deflated after a full flush, so every block but the first compresses
    to the same bytes and the stream is that repeated; the Adler-32 of n zero bytes is
    (n mod 65521) << 16 | 1.
    """
    row = width * 3 + 1  # filter byte + pixels
    block = bytes(row * rows_per_block)
    co = zlib.compressobj(9)
    first = co.compress(block) + co.flush(zlib.Z_FULL_FLUSH)
    repeat = co.compress(block) + co.flush(zlib.Z_FULL_FLUSH)
    blocks = height // rows_per_block
    n = row * rows_per_block * blocks
    stream = (first + repeat * (blocks - 1) + b"\x03\x00"  # empty final fixed-Huffman block
              + struct.pack(">I", ((n % 65521) << 16) | 1))
    ihdr = struct.pack(">IIBBBBB", width, blocks * rows_per_block, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", stream)
            + png_chunk(b"IEND", b""))


def composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> Image.Image:
    """Alpha compositing done by hand (not by Pillow), as the reference for RGBA/LA/tRNS."""
    a = alpha.astype(np.float64)[..., None] / 255.0
    out = rgb.astype(np.float64) * a + 255.0 * (1.0 - a)
    return Image.fromarray(np.rint(out).astype(np.uint8), "RGB")


def _bad_files(photo: Image.Image) -> dict[str, tuple[bytes, str, str]]:
    """name -> (content, expected stage, expected error_type or a substring of the message)."""
    jpeg = encode(photo, "JPEG", quality=90)
    png = encode(photo, "PNG")
    idat = png.index(b"IDAT")
    (idat_len,) = struct.unpack(">I", png[idat - 4:idat])
    bad_crc = bytearray(png)
    bad_crc[idat + 4 + idat_len] ^= 0xFF  # IDAT's CRC: the pixels themselves decode fine
    bad_ihdr = bytearray(png)
    bad_ihdr[29] ^= 0xFF  # IHDR's CRC
    bmp = bytearray(encode(photo, "BMP"))
    bmp[18:26] = struct.pack("<ii", 200_000, 200_000)  # header claims 40 gigapixels
    noise = np.random.default_rng(0).integers(0, 256, (1500, 1500, 3), dtype=np.uint8)
    gif = encode(photo.convert("P"), "GIF")
    webp = encode(photo, "WEBP", quality=80)
    tiff = encode(photo, "TIFF")
    return {
        "empty.jpg": (b"", "decode", "ValueError"),
        "text.jpg": (b"this is a text file, not a photo\n" * 20, "decode",
                     "UnidentifiedImageError"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "decode", "truncated"),
        "truncated.png": (png[: len(png) // 2], "decode", "truncated"),
        "bad_crc.png": (bytes(bad_crc), "decode", "CRC"),
        "bad_ihdr_crc.png": (bytes(bad_ihdr), "decode", "UnidentifiedImageError"),
        "bomb.png": (png_bomb(40_000, 40_000), "decode", "DecompressionBombError"),
        "bomb_header.bmp": (bytes(bmp), "decode", "DecompressionBombError"),
        "tga_named.jpg": (encode(photo, "TGA"), "decode", "UnidentifiedImageError"),
        "ppm_named.png": (encode(photo, "PPM"), "decode", "UnidentifiedImageError"),
        "jpeg_magic_then_noise.jpg": (jpeg[:20] + noise.tobytes()[:5000], "decode",
                                      "UnidentifiedImageError"),
        "truncated.gif": (gif[: len(gif) // 2], "decode", "truncated"),
        "truncated.webp": (webp[: len(webp) // 2], "decode", "OSError"),
        "truncated.tiff": (tiff[:200], "decode", "truncated"),
        "oversize.png": (encode(Image.fromarray(noise), "PNG", compress_level=1), "decode",
                         "--max-image-bytes"),
        MISSING: (jpeg, "read", "FileNotFoundError"),
    }


def _valid_files(folder: str) -> dict[str, Image.Image]:
    """Write the valid-but-unusual files; name -> the RGB picture the job must see."""
    cat = load_photo("chelsea")  # 451 x 300 colour
    coffee = load_photo("coffee")  # 600 x 400 colour
    grey = np.asarray(Image.fromarray(load_photo("camera")).resize((400, 400)))
    rocket = np.asarray(Image.fromarray(load_photo("rocket")).resize((300, 450)))
    refs: dict[str, Image.Image] = {}

    def path(name):
        return os.path.join(folder, name)

    def opened_rgb(name):  # plain Pillow decode: for lossy files whose exact pixels we cannot know
        with Image.open(path(name)) as im:
            return im.convert("RGB")

    Image.fromarray(grey).save(path("grey.png"))
    refs["grey.png"] = Image.fromarray(grey).convert("RGB")
    Image.fromarray(grey).save(path("grey.jpg"), quality=92)
    refs["grey.jpg"] = opened_rgb("grey.jpg")
    Image.fromarray(grey.astype(np.uint16) * 257).save(path("grey16.png"))  # mode I;16
    refs["grey16.png"] = Image.fromarray(grey).convert("RGB")

    pal = Image.fromarray(cat).quantize(64)
    idx = np.asarray(pal)
    transparent = int(idx[0, 0])
    pal.save(path("palette_transparency.png"), transparency=transparent)
    lut = np.array(pal.getpalette()[: 3 * 256] + [0] * (768 - len(pal.getpalette()[:768])),
                   dtype=np.uint8).reshape(256, 3)
    refs["palette_transparency.png"] = composite_on_white(
        lut[idx], np.where(idx == transparent, 0, 255))

    h, w = coffee.shape[:2]
    alpha = np.tile(np.linspace(0, 255, w), (h, 1)).astype(np.uint8)  # clear -> opaque
    Image.fromarray(np.dstack([coffee, alpha]), "RGBA").save(path("rgba.png"))
    refs["rgba.png"] = composite_on_white(coffee, alpha)
    ga = np.tile(np.linspace(255, 40, 400), (400, 1)).astype(np.uint8)
    Image.fromarray(np.dstack([grey, ga]), "LA").save(path("la.png"))
    refs["la.png"] = composite_on_white(np.dstack([grey] * 3), ga)

    Image.fromarray(cat).convert("CMYK").save(path("cmyk.jpg"), quality=95)
    refs["cmyk.jpg"] = opened_rgb("cmyk.jpg")
    Image.fromarray(coffee).save(path("progressive.jpg"), quality=90, progressive=True)
    refs["progressive.jpg"] = opened_rgb("progressive.jpg")
    for name, orientation, rotate in (("exif_rot6.jpg", 6, Image.Transpose.ROTATE_270),
                                      ("exif_rot3.jpg", 3, Image.Transpose.ROTATE_180),
                                      ("exif_rot8.jpg", 8, Image.Transpose.ROTATE_90)):
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(cat).save(path(name), quality=92, exif=exif.tobytes())
        refs[name] = opened_rgb(name).transpose(rotate)  # the rotation, by hand

    frames = [Image.fromarray(cat), Image.fromarray(coffee).resize((451, 300))]
    frames[0].save(path("animated.gif"), save_all=True, append_images=frames[1:], duration=100)
    refs["animated.gif"] = opened_rgb("animated.gif")  # Pillow opens on frame 0
    frames[0].save(path("animated.webp"), save_all=True, append_images=frames[1:],
                   lossless=True, duration=100)
    refs["animated.webp"] = frames[0]
    Image.fromarray(rocket).save(path("multipage.tif"), save_all=True,
                                 append_images=[Image.fromarray(cat)])
    refs["multipage.tif"] = Image.fromarray(rocket)

    Image.new("RGB", (1, 1), (200, 30, 60)).save(path("one_pixel.png"))
    refs["one_pixel.png"] = Image.new("RGB", (1, 1), (200, 30, 60))
    wide = Image.fromarray(coffee).resize((5000, 8))
    wide.save(path("wide_5000x8.png"))
    refs["wide_5000x8.png"] = wide
    tall = Image.fromarray(cat).resize((8, 5000))
    tall.save(path("tall_8x5000.png"))
    refs["tall_8x5000.png"] = tall
    bilevel = Image.fromarray(grey).convert("1")
    bilevel.save(path("bilevel.png"))
    refs["bilevel.png"] = Image.fromarray(np.asarray(bilevel).astype(np.uint8) * 255).convert(
        "RGB")
    Image.fromarray(rocket).save(path("plain.bmp"))
    refs["plain.bmp"] = Image.fromarray(rocket)
    Image.fromarray(coffee).save(path("UPPER_CASE.JPG"), quality=90)
    refs["UPPER_CASE.JPG"] = opened_rgb("UPPER_CASE.JPG")
    return refs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(folder, bad: name -> (bytes, stage, expected), valid: name -> reference RGB image)."""
    folder = str(tmp_path_factory.mktemp("hostile"))
    photo = Image.fromarray(load_photo("astronaut")).resize((320, 320))
    bad = _bad_files(photo)
    for name, (content, _, _) in bad.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(content)
    valid = _valid_files(folder)
    with open(os.path.join(folder, "notes.txt"), "w") as f:  # not an image extension: skipped
        f.write("ignored\n")
    return folder, bad, valid


# ---------------------------------------------------------------- references


def reference_from_images(model_name: str, weights: str, images: list[Image.Image]):
    """Eager torchvision on given RGB pictures: embeddings, top-1 ids, top-1 probabilities."""
    emb, ids, probs = helpers.reference_from_images(model_name, weights, images)
    return emb, ids[:, 0], probs[:, 0]


RUN = "run=t"  # every run here uses --run-id t: its files land in OUTPUT/run=t/


def corpus_args(folder: str, out: str, weights: str, max_error_rate: str) -> list[str]:
    return ["--input", folder, "--output", out, "--model", "resnet18", "--weights", weights,
            "--max-error-rate", max_error_rate, "--max-image-bytes", str(MAX_IMAGE_BYTES),
            "--rows-per-file", "16", "--batch-size", "8"]


def _missing_listed_then_deleted(folder: str):
    """(before, after): write MISSING so that the listing sees it, then delete it so that
    reading it fails."""
    missing = os.path.join(folder, MISSING)
    content = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")

    def before():
        with open(missing, "wb") as f:
            f.write(content)

    def after():
        os.remove(missing)
    return before, after


@pytest.fixture(scope="module")
def corpus_stages(corpus, resnet18_weights, tmp_path_factory):
    """The corpus through the job's stages, without Ray; MISSING is deleted after listing."""
    folder, _, _ = corpus
    before, after = _missing_listed_then_deleted(folder)
    before()
    return run_stages(make_cfg(*corpus_args(folder, "unused", resnet18_weights, "0.5")),
                      str(tmp_path_factory.mktemp("stages")), after_listing=after)


@pytest.fixture(scope="module")
def corpus_job(corpus, resnet18_weights, ray_local, tmp_path_factory):
    """The real Ray job over the corpus with a 1% failure budget (exceeded); MISSING is
    deleted right after the driver lists it."""
    folder, _, _ = corpus
    before, after = _missing_listed_then_deleted(folder)
    out = str(tmp_path_factory.mktemp("out") / "rate-0.01")

    def list_then_delete(uri, spec=None, storage_options=None):
        before()
        listing = list_inputs(uri, spec, storage_options)
        after()
        return listing

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "list_inputs", list_then_delete)
        result = pipeline.run(make_cfg(*corpus_args(folder, out, resnet18_weights, "0.01"),
                                       run_id="t"))
    return out, result


def read_rows(out: str):
    return pads.dataset(out, format="parquet", exclude_invalid_files=True).to_table()


def read_errors(out: str):
    return pads.dataset(os.path.join(out, RUN, "_errors"), format="parquet").to_table()


# ---------------------------------------------------------------- end-to-end tests


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_corpus_job_counts_add_up(corpus, corpus_job):
    """The Ray job over the corpus: every input is a row or an error row, and the summary's
    counts (per stage, skipped, lost) add up."""
    folder, bad, valid = corpus
    assert len(bad) + len(valid) >= 25
    out, _ = corpus_job
    s = json.load(open(os.path.join(out, RUN, "_summary.json")))
    assert s["inputs"] == len(bad) + len(valid)
    assert s["succeeded"] == len(valid) and s["failed"] == len(bad)
    assert s["succeeded"] + s["failed"] == s["inputs"] and s["lost"] == 0
    assert s["failed_by_stage"] == {"decode": len(bad) - 1, "read": 1}
    assert s["skipped_non_image"] == 1
    rows, errors = read_rows(out), read_errors(out)
    uris = rows.column("uri").to_pylist() + errors.column("uri").to_pylist()
    assert sorted(uris) == sorted(os.path.join(folder, n) for n in list(bad) + list(valid))


@pytest.mark.timeout(300)
def test_each_bad_file_is_an_error_row_with_its_stage(corpus, corpus_stages):
    folder, bad, valid = corpus
    assert corpus_stages.listing.skipped_non_image == 1
    assert (corpus_stages.stats.succeeded, corpus_stages.stats.failed) == (len(valid), len(bad))
    errors = {r["uri"]: r for r in corpus_stages.errors.to_pylist()}
    assert set(errors) == {os.path.join(folder, n) for n in bad}
    for name, (content, stage, expected) in bad.items():
        row = errors[os.path.join(folder, name)]
        assert row["stage"] == stage, (name, row)
        assert expected in (row["error_type"], ) or expected in row["message"], (name, row)
        assert row["message"] and " at 0x" not in row["message"], (name, row)
        if name == MISSING:
            assert row["size_bytes"] > 0  # its size when it was listed
        else:
            assert row["size_bytes"] == len(content), name


@pytest.mark.timeout(300)
def test_each_valid_unusual_file_matches_torchvision(corpus, corpus_stages, resnet18_weights):
    folder, _, valid = corpus
    rows = {r["uri"]: r for r in corpus_stages.rows.to_pylist()}
    names = sorted(valid)
    got = [rows[os.path.join(folder, n)] for n in names]
    for name, row in zip(names, got):  # size after EXIF orientation, before resizing
        assert (row["width"], row["height"]) == valid[name].size, name
    ref_emb, ref_top1, ref_p1 = reference_from_images(
        "resnet18", resnet18_weights, [valid[n] for n in names])
    emb = np.stack([np.asarray(r["embedding"]) for r in got])
    cos = cosine(emb, ref_emb)
    report = dict(zip(names, np.round(cos, 5)))
    assert cos.min() >= 0.99, report
    top1 = np.array([r["topk_ids"][0] for r in got])
    assert (top1 == ref_top1).all(), dict(zip(names, zip(top1, ref_top1)))
    np.testing.assert_allclose([r["topk_scores"][0] for r in got], ref_p1, atol=0.02)


@pytest.mark.timeout(300)
def test_alpha_is_composited_on_white_and_frames_are_the_first(corpus, corpus_stages,
                                                               resnet18_weights):
    """The documented choices, checked against the alternatives (black, the second frame)."""
    folder, _, valid = corpus
    rows = {r["uri"]: r for r in corpus_stages.rows.to_pylist()}
    coffee = load_photo("coffee")
    h, w = coffee.shape[:2]
    alpha = np.tile(np.linspace(0, 255, w), (h, 1))[..., None] / 255.0
    on_black = Image.fromarray(np.rint(coffee * alpha).astype(np.uint8))
    cat = Image.fromarray(load_photo("chelsea"))
    second = Image.fromarray(coffee).resize((451, 300))
    ref, _, _ = reference_from_images("resnet18", resnet18_weights,
                                      [valid["rgba.png"], on_black, cat, second])
    for name, right, wrong in (("rgba.png", 0, 1), ("animated.webp", 2, 3)):
        emb = np.asarray(rows[os.path.join(folder, name)]["embedding"])[None]
        assert cosine(emb, ref[right:right + 1])[0] > cosine(emb, ref[wrong:wrong + 1])[0] + 0.01


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_over_the_error_budget_exits_nonzero_but_writes_everything(corpus, corpus_job,
                                                                   corpus_stages):
    """Over --max-error-rate: exit 3 with a reason, no _SUCCESS, a failed summary, and still
    every row and error row, equal to what the stages compute."""
    _, bad, valid = corpus
    out, result = corpus_job
    assert result.exit_code == 3
    assert f"{len(bad)} of {len(bad) + len(valid)}" in result.reason
    assert "0.01" in result.reason
    assert not os.path.exists(os.path.join(out, RUN, "_SUCCESS"))
    s = json.load(open(os.path.join(out, RUN, "_summary.json")))
    assert s["status"] == "failed" and s["failed"] == len(bad) and s["succeeded"] == len(valid)
    rows, expected = read_rows(out).sort_by("uri"), corpus_stages.rows
    assert rows.column("uri").equals(expected.column("uri"))
    for name in ("width", "height"):
        assert rows.column(name).equals(expected.column(name))
    np.testing.assert_allclose(np.stack(rows.column("embedding").to_numpy(zero_copy_only=False)),
                               np.stack(expected.column("embedding").to_numpy(
                                   zero_copy_only=False)), rtol=1e-4, atol=1e-5)
    errors = read_errors(out).sort_by("uri")
    for name in ("uri", "stage", "error_type", "message", "size_bytes"):
        assert errors.column(name).equals(corpus_stages.errors.column(name)), name


class _PoisonedRunner(ModelRunner):
    """A ModelRunner whose forward raises whenever the poisoned image is in its input."""

    poison_uri = ""

    def __call__(self, batch):
        hit = [i for i, u in enumerate(batch["uri"]) if str(u).endswith(self.poison_uri)]
        self._poison = batch["image"][hit[0]].copy() if hit else None
        return super().__call__(batch)

    def forward(self, images):
        if self._poison is not None and any(np.array_equal(im, self._poison) for im in images):
            raise ValueError("poisoned image")
        return super().forward(images)


@pytest.mark.timeout(300)
def test_model_failure_on_one_image_errors_only_that_image(few_photos, resnet18_weights,
                                                           tmp_path):
    """A model that fails on one image (in a batch of 8) errors only that image, in the infer
    stage, with its size; every other image has its row (the job's stages, no Ray)."""
    names = sorted(os.listdir(few_photos))
    poison = names[2]
    runner = type("Poisoned", (_PoisonedRunner,), {"poison_uri": poison})
    stages = run_stages(make_cfg("--input", few_photos, "--output", "unused",
                                 "--model", "resnet18", "--weights", resnet18_weights,
                                 "--batch-size", "8", "--max-error-rate", "0.5"),
                        str(tmp_path / "out"), runner_cls=runner)
    errors = stages.errors.to_pylist()
    assert [(e["uri"], e["stage"], e["error_type"]) for e in errors] == [
        (os.path.join(few_photos, poison), "infer", "ValueError")]
    assert errors[0]["size_bytes"] == os.path.getsize(os.path.join(few_photos, poison))
    rows = stages.rows.column("uri").to_pylist()
    assert rows == [os.path.join(few_photos, n) for n in names if n != poison]


class _OutOfMemoryRunner(ModelRunner):
    def forward(self, images):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_device_fault_fails_the_run_and_records_no_bad_images(few_photos, resnet18_weights,
                                                              ray_local, tmp_path):
    """A device fault in the Ray model actors (retried, then raised) fails the whole run: no
    _SUCCESS, no error rows blaming the images."""
    out = str(tmp_path / "out")
    with pytest.raises(Exception, match="OutOfMemoryError|out of memory"):
        pipeline.run(make_cfg("--input", few_photos, "--output", out, "--model", "resnet18",
                              "--weights", resnet18_weights, "--max-error-rate", "1",
                              run_id="t"), runner_cls=_OutOfMemoryRunner)
    assert not os.path.exists(os.path.join(out, RUN, "_SUCCESS"))
    assert not glob.glob(os.path.join(out, "**", "_errors", "*.parquet"), recursive=True)


# ---------------------------------------------------------------- decode memory on the bomb

_MEASURE = r"""
import sys
import numpy as np
from torchvision.models import ResNet18_Weights
from resnet_features.extract.decode import Decode
from resnet_features.core.models import Preprocessing
decode = Decode(Preprocessing.from_weights(ResNet18_Weights.DEFAULT))
def rss_mb():  # peak RSS of this process (VmHWM; unlike ru_maxrss, not inherited over exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
def run(path):
    data = open(path, "rb").read()
    out = decode({"index": np.arange(1), "uri": np.array([path], dtype=object),
                  "bytes": np.array([data], dtype=object)})
    return out["error_type"][0] or "ok"
print("normal", run(sys.argv[1]), rss_mb())
print("bomb", run(sys.argv[2]), rss_mb())
"""


def test_decode_worker_memory_stays_bounded_on_the_bomb(tmp_path):
    """A decode worker's peak RSS on a 4.8 GB-when-decoded PNG, against the same worker's peak
    after decoding an ordinary photo: the bomb may add its file size, never its pixels."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb(40_000, 40_000))
    normal = tmp_path / "normal.jpg"
    normal.write_bytes(encode(Image.fromarray(load_photo("coffee")), "JPEG"))
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(normal), str(bomb)], env=env,
                          capture_output=True, text=True, timeout=120, check=True)
    lines = dict((line.split()[0], line.split()[1:]) for line in proc.stdout.splitlines())
    (normal_err, normal_mb), (bomb_err, bomb_mb) = lines["normal"], lines["bomb"]
    print(f"decode worker peak RSS: {float(normal_mb):.0f} MB after a photo, "
          f"{float(bomb_mb):.0f} MB after the bomb ({bomb.stat().st_size / 1e6:.1f} MB file, "
          f"{40_000 * 40_000 * 3 / 1e9:.1f} GB decoded)")
    assert normal_err == "ok" and bomb_err == "DecompressionBombError"
    assert float(bomb_mb) - float(normal_mb) < 64
    assert float(bomb_mb) < 1024  # a whole decode worker, torch imported, under 1 GB


# ---------------------------------------------------------------- model and storage faults, no Ray


def test_failure_budget_defaults_to_five_percent():
    assert make_cfg("--input", "in", "--output", "out", run_id="t").max_error_rate == 0.05
    with pytest.raises(ConfigError, match="--max-error-rate must be within"):
        make_cfg("--input", "i", "--output", "o", "--max-error-rate", "1.5")



@pytest.fixture(scope="module")
def resnet18_spec(resnet18_weights):
    return resolve_model("resnet18", resnet18_weights)


def _images_batch(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"index": np.arange(n), "uri": np.array([f"{i}.jpg" for i in range(n)], dtype=object),
            "image": rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)}


def test_model_failing_every_image_is_a_stage_fault(resnet18_spec):
    class Broken(ModelRunner):
        def forward(self, images):
            raise RuntimeError("weights do not fit this model")

    spec, state = resnet18_spec
    with pytest.raises(ModelStageError, match="not of the images"):
        Broken(spec, state, InferenceOptions(), for_task(spec, "embed"))(_images_batch(3))


def test_device_fault_is_retried_then_raised(resnet18_spec):
    spec, state = resnet18_spec

    class Flaky(ModelRunner):
        fail_times = 0
        calls = 0

        def forward(self, images):
            type(self).calls += 1
            if type(self).calls <= self.fail_times:
                raise torch.OutOfMemoryError("out of memory (simulated)")
            return super().forward(images)

    batch = _images_batch(2)
    expected = ModelRunner(spec, state, InferenceOptions(), for_task(spec, "embed"))(dict(batch))
    Flaky.fail_times = DEVICE_RETRIES  # fails, then succeeds within its retries
    got = Flaky(spec, state, InferenceOptions(), for_task(spec, "embed"))(dict(batch))
    assert not any(got["error_stage"])
    np.testing.assert_allclose(got["embedding"], expected["embedding"], rtol=1e-5, atol=1e-5)
    Flaky.calls, Flaky.fail_times = 0, DEVICE_RETRIES + 1  # persists: raised, not an error row
    with pytest.raises(torch.OutOfMemoryError):
        Flaky(spec, state, InferenceOptions(), for_task(spec, "embed"))(dict(batch))
    assert Flaky.calls == DEVICE_RETRIES + 1


class _FlakyStore:
    """An fsspec-like filesystem over real files whose first `failures` fetches of a path fail."""

    def __init__(self, failures: int):
        self.failures = failures
        self.seen: dict[str, int] = {}

    def _strip_protocol(self, uri):
        return uri

    def cat_ranges(self, paths, starts, ends, on_error="return"):
        out = []
        for p in paths:
            self.seen[p] = self.seen.get(p, 0) + 1
            if self.seen[p] <= self.failures:
                out.append(ConnectionError("connection reset by peer"))
            elif not os.path.exists(p):
                out.append(FileNotFoundError(p))
            else:
                out.append(open(p, "rb").read())
        return out


def test_storage_faults_are_retried_then_fail_the_run(tmp_path):
    good = tmp_path / "a.jpg"
    good.write_bytes(b"some bytes")
    batch = {"index": np.arange(2),
             "uri": np.array([str(good), str(tmp_path / "gone.jpg")], dtype=object)}
    reader = ReadBytes(retries=2, backoff_s=0.0)
    reader._fs = _FlakyStore(failures=2)
    out = reader(dict(batch))
    assert out["bytes"][0] == b"some bytes" and out["error_stage"][0] == ""
    assert out["error_stage"][1] == "read" and out["error_type"][1] == "FileNotFoundError"
    reader = ReadBytes(retries=2, backoff_s=0.0)
    reader._fs = _FlakyStore(failures=3)
    with pytest.raises(OSError, match="failed 3 times.*ConnectionError"):
        reader(dict(batch))


def test_read_only_batches_put_no_warning_in_the_log():
    """Ray hands the model actor read-only batches (zero-copy from the object store): torch's
    warning about non-writable arrays would land in every job's log. A fresh process, as torch
    warns only once per process."""
    code = ("import numpy as np\n"
            "from resnet_features.core.models import resolve_model\n"
            "from resnet_features.extract.inference import ModelRunner\n"
            "spec, state = resolve_model('resnet18', 'random')\n"
            "a = np.zeros((1, 32, 32, 3), np.uint8)\n"
            "a.flags.writeable = False\n"
            "x = ModelRunner(spec, state).to_device(a)\n"
            "assert x.shape == (1, 32, 32, 3)\n")
    res = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], cwd=ROOT,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode == 0, res.stderr[-2000:]
