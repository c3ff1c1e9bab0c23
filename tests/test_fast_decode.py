"""Fast decode paths, without Ray: torchvision.io/torch-resize backend and batched decode
against torchvision's reference transforms on PIL images (an independent implementation)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from helpers import make_cfg
from PIL import Image
from torchvision.models import ResNet50_Weights
from torchvision.transforms import functional as F

from resnet_features.core.models import Preprocessing
from resnet_features.core.samples import load_photo
from resnet_features.extract.decode import Decode, DecodeOptions, decode_image, open_image
from resnet_features.extract.gpu_decode import decode_resize_batch

WEIGHTS = ResNet50_Weights.IMAGENET1K_V2
PREP = Preprocessing.from_weights(WEIGHTS)


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def reference_uint8(img: Image.Image) -> np.ndarray:
    t = WEIGHTS.transforms()
    return np.asarray(F.center_crop(F.resize(img.convert("RGB"), t.resize_size,
                                             interpolation=t.interpolation), t.crop_size))


def test_plain_jpeg_takes_the_torchvision_decoder():
    data = jpeg(Image.fromarray(load_photo("coffee")))
    img, w, h = open_image(data, PREP, DecodeOptions())
    assert not isinstance(img, Image.Image) and tuple(img.shape) == (3, h, w)
    pil, _, _ = open_image(data, PREP, DecodeOptions(backend="pillow"))
    assert isinstance(pil, Image.Image)


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "camera", "motorcycle_left"])
@pytest.mark.parametrize("backend", ["auto", "pillow"])
def test_backends_match_reference_pixels(name, backend):
    data = jpeg(Image.fromarray(load_photo(name)).resize((500, 375)))
    ours = decode_image(data, PREP, DecodeOptions(backend=backend)).pixels.astype(int)
    ref = reference_uint8(Image.open(io.BytesIO(data))).astype(int)
    diff = np.abs(ours - ref)
    assert diff.max() <= 2 and diff.mean() < 0.1, (diff.max(), diff.mean())


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_auto_backend_keeps_exif_orientation(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = jpeg(Image.fromarray(load_photo("chelsea")), exif=exif.tobytes())
    from PIL import ImageOps
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    ours = decode_image(data, PREP, DecodeOptions()).pixels.astype(int)
    assert np.abs(ours - reference_uint8(upright).astype(int)).mean() < 0.5


def test_drafted_12mp_close_to_reference():
    big = Image.fromarray(load_photo("astronaut")).resize((4032, 3024), Image.Resampling.BICUBIC)
    data = jpeg(big)
    ref = reference_uint8(Image.open(io.BytesIO(data))).astype(np.float32)
    for factor in (2.0, 1.0):
        ours = decode_image(data, PREP, DecodeOptions(draft_factor=factor)).pixels
        assert ours.shape == (224, 224, 3)
        assert np.abs(ours.astype(np.float32) - ref).mean() < 3.0, factor


def test_grey_and_cmyk_jpegs_become_rgb():
    grey = Image.fromarray(load_photo("camera"))
    for img in (grey, grey.convert("RGB").convert("CMYK")):
        out = decode_image(jpeg(img), PREP, DecodeOptions()).pixels
        assert out.shape == (224, 224, 3) and out.std() > 5
        assert np.abs(out.astype(int) - reference_uint8(
            Image.open(io.BytesIO(jpeg(img)))).astype(int)).mean() < 0.5


def test_truncated_jpeg_is_an_error_row_on_auto_backend():
    good = jpeg(Image.fromarray(load_photo("rocket")))
    batch = {"index": np.arange(2), "uri": np.array(["a.jpg", "b.jpg"], dtype=object),
             "bytes": np.array([good, good[: len(good) // 2]], dtype=object)}
    out = Decode(PREP)(batch)
    assert list(out["error_stage"]) == ["", "decode"]
    assert "truncated" in out["error_message"][1].lower()


def test_batched_decode_matches_reference_on_cpu():
    """decode_resize_batch is the nvJPEG path; on the CPU it runs the same code on libjpeg."""
    imgs = [Image.fromarray(load_photo(n)).resize((480, 360)) for n in ("astronaut", "coffee")]
    datas = [jpeg(imgs[0]), jpeg(imgs[1].transpose(Image.Transpose.ROTATE_90))]
    out = decode_resize_batch(datas, PREP, "cpu").numpy()
    assert out.shape == (2, 224, 224, 3)
    from PIL import ImageOps
    for i, d in enumerate(datas):
        ref = reference_uint8(ImageOps.exif_transpose(Image.open(io.BytesIO(d))))
        assert np.abs(out[i].astype(int) - ref.astype(int)).mean() < 0.5, i


def test_deferred_jpegs_decode_in_the_model_stage(few_photos, resnet18_weights, tmp_path):
    """--gpu-decode's data path, run on the CPU: Decode defers JPEGs as bytes, the wrapped
    runner decodes them on its device; embeddings agree with eager torchvision."""
    import glob
    import os

    from helpers import cosine, reference_outputs

    from resnet_features.core.models import resolve_model
    from resnet_features.extract.gpu_decode import with_gpu_decode
    from resnet_features.extract.inference import InferenceOptions, ModelRunner
    from resnet_features.extract.outputs import for_task

    paths = sorted(glob.glob(os.path.join(few_photos, "*")))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(open(paths[0], "rb").read()[:-2000] if paths[0].endswith(".jpg") else b"x")
    uris = paths + [str(bad)]
    spec, state = resolve_model("resnet18", resnet18_weights)
    batch = {"index": np.arange(len(uris)), "uri": np.array(uris, dtype=object),
             "bytes": np.array([open(p, "rb").read() for p in uris], dtype=object)}
    decoded = Decode(spec.preprocessing, DecodeOptions(defer_jpeg=True))(batch)
    deferred = [i for i, d in enumerate(decoded["jpeg"]) if len(d)]
    assert deferred and all(uris[i].endswith(".jpg") for i in deferred)
    assert all(decoded["width"][i] > 0 for i in deferred)
    runner = with_gpu_decode(ModelRunner)(spec, state, InferenceOptions(), for_task(spec, "embed"))
    out = runner(decoded)
    assert "jpeg" not in out and out["error_stage"][-1] == "decode"
    assert not any(out["error_stage"][:-1])
    ref, _, _ = reference_outputs("resnet18", resnet18_weights, paths)
    cos = cosine(out["embedding"][:-1], ref)
    assert cos.min() >= 0.995, cos


def test_gpu_share_and_exif_rotated_jpegs():
    """--gpu-decode-fraction spreads the GPU's share evenly; JPEGs with an EXIF rotation are
    never deferred (nvJPEG would ignore the rotation) and decode upright on the CPU."""
    exif = Image.Exif()
    exif[0x0112] = 6
    plain = jpeg(Image.fromarray(load_photo("coffee")).resize((480, 360)))
    rotated = jpeg(Image.fromarray(load_photo("chelsea")).resize((480, 360)), exif=exif.tobytes())
    datas = [plain] * 8 + [rotated]
    batch = {"index": np.arange(9), "uri": np.array([f"{i}.jpg" for i in range(9)], dtype=object),
             "bytes": np.array(datas, dtype=object)}
    for fraction, expect in ((1.0, 8), (0.5, 4), (0.25, 2), (0.0, 0)):
        out = Decode(PREP, DecodeOptions(defer_jpeg=True, defer_fraction=fraction))(batch)
        deferred = [i for i, d in enumerate(out["jpeg"]) if len(d)]
        assert len(deferred) == expect and 8 not in deferred, (fraction, deferred)
        cpu_rows = [i for i in range(9) if i not in deferred]
        assert all(out["image"][i].std() > 5 for i in cpu_rows)
    from PIL import ImageOps
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(rotated)))
    assert (out["width"][8], out["height"][8]) == upright.size == (360, 480)
    assert np.abs(out["image"][8].astype(int) - reference_uint8(upright).astype(int)).mean() < 0.5


def cfg(*argv):
    """The job's config from extra CLI flags (input and output given)."""
    return make_cfg("--input", "i", "--output", "o", *argv)


def test_speed_flags_are_validated():
    from resnet_features.core.config import ConfigError

    assert cfg().decode_backend == "auto" and not cfg().gpu_decode
    assert cfg("--decode-backend", "pillow", "--cpu-threads", "3").cpu_threads == 3
    with pytest.raises(ConfigError, match="--gpu-decode"):
        cfg("--device", "cpu", "--gpu-decode")
    assert cfg("--gpu-decode-fraction", "0.4").gpu_decode_fraction == 0.4
    with pytest.raises(ConfigError, match="--gpu-decode-fraction"):
        cfg("--gpu-decode-fraction", "1.5")
    with pytest.raises(ConfigError, match="--cpu-threads"):
        cfg("--cpu-threads", "0")


def test_cpu_model_actor_layout():
    """CPU actors: few threads each, at most 8 per node, no more than batches or one per 128
    inputs, and together they reserve at most half the CPUs (decode tasks need the rest, or
    the job would hang)."""
    from resnet_features.extract.pipeline import _cpu_layout

    def layout(*argv, n=10_000, batch=32, node=2, cluster=2):
        return _cpu_layout(cfg(*argv), n, batch, node, cluster)
    assert layout() == (2, 1, 0.5)  # 2 cores: two 1-thread actors, one CPU left for decode
    assert layout(n=5) == (1, 2, 1.0)  # one batch: one actor on both cores
    assert layout(n=64, batch=8) == (1, 2, 1.0)  # 8 batches but a small run: one actor
    assert layout(n=129, batch=8) == (2, 1, 0.5)
    assert layout(n=300, node=32, cluster=96) == (3, 10, 5.0)  # 3 actors x 10 threads
    assert layout(node=32, cluster=96) == (24, 4, 2.0)  # 3 nodes of 32: 8 actors per node
    assert layout("--concurrency", "4") == (4, 1, 0.25)  # 4 x 0.25 = half of 2 CPUs
    assert layout("--concurrency", "1") == (1, 2, 1.0)
    assert layout("--cpu-threads", "2") == (1, 2, 1.0)
    assert layout("--num-cpus-per-worker", "0.1") == (2, 1, 0.1)
    for cpus in (1, 4, 16, 64):
        size, _, reserve = layout(node=cpus, cluster=cpus)
        assert 1 <= size <= 8 and size * reserve <= cpus / 2
