import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import PreprocessConfig
from pipeline.errors import ImageRejected
from pipeline.preprocessing import (decode_batch, decode_image, draft_decode, open_image, plan_geometry, prepare_bytes,
                                    prepare_pixels, to_rgb)

SIZES = [(341, 256), (256, 341), (333, 257), (100, 40)]
GEOMETRIES = ["squash", "pad", "center_crop"]


def ramp_image(w, h) -> Image.Image:
    """R encodes the original x coordinate, G the y coordinate (scaled to 0..255)."""
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8))


def assert_patches_show_their_boxes(pixels, geom, cfg, w, h, tol_levels=1.0):
    """Each patch square's centre shows (by the ramp's colour) an original pixel inside its box."""
    assert pixels.shape == (224, 224, 3) and (geom.orig_w, geom.orig_h) == (w, h)
    tol_x, tol_y = 1.5 + tol_levels * w / 255, 1.5 + tol_levels * h / 255  # ramp quantisation in original pixels
    checked = 0
    for r in range(16):
        for c in range(16):
            x0, y0, x1, y1 = geom.patch_box(r, c)
            centre = pixels[r * 14 + 7, c * 14 + 7].astype(float)
            in_image = (geom.offset_x <= c * 14 + 7 < geom.offset_x + w * geom.scale_x
                        and geom.offset_y <= r * 14 + 7 < geom.offset_y + h * geom.scale_y)
            if x1 <= x0 or y1 <= y0 or not in_image:  # centre (or all) in letterbox padding
                assert cfg.geometry == "pad" and abs(centre[2] - cfg.pad_value) <= tol_levels
                continue
            u = centre[0] / 255 * (w - 1)  # original x the model sees at the square's centre
            v = centre[1] / 255 * (h - 1)
            assert x0 - tol_x <= u <= x1 - 1 + tol_x, (r, c, x0, x1, u)
            assert y0 - tol_y <= v <= y1 - 1 + tol_y, (r, c, y0, y1, v)
            # and the square's centre pixel lies well inside the box, not at its edge
            assert abs(u - (x0 + x1 - 1) / 2) <= (x1 - x0) / 2 + tol_x
            checked += 1
    assert checked >= (256 if cfg.geometry != "pad" else 16 * 6)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("size", SIZES)
def test_every_patch_maps_back_to_the_original_pixels_it_shows(geometry, size):
    w, h = size
    cfg = PreprocessConfig(geometry=geometry)
    pixels, geom = prepare_pixels(ramp_image(w, h), cfg)
    assert_patches_show_their_boxes(pixels, geom, cfg, w, h)


# JPEGs that Pillow decodes at 1/2, 1/4 or 1/8 scale for a 224 squash input, sides multiples of 8 or not.
DRAFTED = [((500, 460), 2), ((1000, 900), 4), ((1003, 901), 4), ((1900, 1800), 8), ((1795, 1799), 8), ((2000, 700), 2)]


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("size,squash_scale", DRAFTED)
def test_a_jpeg_decoded_at_a_draft_scale_keeps_every_patch_on_its_original_pixels(geometry, size, squash_scale):
    w, h = size
    cfg = PreprocessConfig(geometry=geometry)
    data = encode(ramp_image(w, h), "JPEG", quality=95)
    _, plan = plan_geometry(geometry, w, h, cfg)
    rgb, box = draft_decode(open_image(data, cfg), plan, len(data))
    scale = w / box[2]
    assert scale == h / box[3] and rgb.size == (-(-w // scale), -(-h // scale))
    assert scale == squash_scale if geometry == "squash" else scale in (1, 2, 4, 8)
    assert rgb.width >= plan[0] and rgb.height >= plan[1]  # never fewer pixels than the input needs
    pixels, geom = prepare_bytes(data, cfg)
    assert geom == prepare_pixels(ramp_image(w, h), cfg)[1]
    assert_patches_show_their_boxes(pixels, geom, cfg, w, h, tol_levels=3.0)


def texture(w, h, seed=1) -> Image.Image:
    """Smooth random colour everywhere: any misplaced resample shows as a difference."""
    coarse = np.random.default_rng(seed).integers(0, 255, (h // 24 + 2, w // 24 + 2, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((w, h), Image.BICUBIC)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("size", [s for s, _ in DRAFTED])
def test_a_drafted_jpeg_shows_what_the_full_decode_shows(geometry, size):
    """Against the whole image decoded and resized: about one grey level. A resample that took
    the decoded pixels for the original's extent (the partial last pixel of a side that is not a
    multiple of the scale) is 2-8 levels off."""
    cfg = PreprocessConfig(geometry=geometry)
    data = encode(texture(*size), "JPEG", quality=95)
    fast, geom = prepare_bytes(data, cfg)
    full, full_geom = prepare_pixels(decode_image(data, cfg), cfg)
    assert geom == full_geom and fast.dtype == np.uint8
    assert np.abs(fast.astype(int) - full).mean() < 1.5


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("size,fmt", [((256, 334), "JPEG"), ((224, 224), "JPEG"), ((300, 200), "JPEG"),
                                      ((447, 447), "JPEG"), ((1024, 768), "PNG"), ((341, 256), "WEBP")])
def test_an_image_that_needs_no_draft_gives_the_bytes_it_always_gave(geometry, size, fmt):
    """Below twice the input size a JPEG is decoded whole and resized by Pillow as before the
    draft decode existed (a demo build's tables stay the same); other formats are never drafted."""
    cfg = PreprocessConfig(geometry=geometry)
    data = encode(texture(*size), fmt)
    img = decode_image(data, cfg)
    geom, plan = plan_geometry(geometry, *size, cfg)
    before = img.resize(plan, Image.BICUBIC)
    if geometry != "squash":
        canvas = Image.new("RGB", (224, 224), (cfg.pad_value,) * 3)
        canvas.paste(before, (int(geom.offset_x), int(geom.offset_y)))
        before = canvas
    pixels, _ = prepare_bytes(data, cfg)
    if fmt == "PNG":  # 1024x768: an integer reduction first (Image.reduce), then the same resample
        assert np.abs(pixels.astype(int) - np.asarray(before)).mean() < 1.0
    else:
        assert np.array_equal(pixels, np.asarray(before))


def test_the_device_resample_in_float_matches_the_cpu_one():
    """The float path (what a GPU runs) and the uint8 one (a CPU) agree to a few grey levels."""
    from pipeline.preprocessing import resample_tensor

    cfg = PreprocessConfig(geometry="pad")
    img = texture(401, 351)  # under twice the input: Pillow resamples it directly, no reduction first
    geom, plan = plan_geometry("pad", 401, 351, cfg)
    chw = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    as_uint8 = resample_tensor(chw, (401, 351), geom, plan, cfg).numpy().astype(int)
    in_float = resample_tensor(chw, (401, 351), geom, plan, cfg, in_float=True).numpy().astype(int)
    pil = prepare_pixels(img, cfg)[0].astype(int)
    assert np.abs(as_uint8 - pil).mean() < 0.1 and np.abs(as_uint8 - pil).max() <= 2
    assert np.abs(in_float - pil).mean() < 0.5 and np.abs(in_float - pil).max() <= 4


@pytest.mark.parametrize("size", SIZES)
def test_squash_squares_tile_the_whole_original_exactly(size):
    w, h = size
    _, geom = prepare_pixels(ramp_image(w, h), PreprocessConfig(geometry="squash"))
    cols = [geom.patch_box(0, c) for c in range(16)]
    rows = [geom.patch_box(r, 0) for r in range(16)]
    assert cols[0][0] == 0 and cols[-1][2] == w and rows[0][1] == 0 and rows[-1][3] == h
    assert all(a[2] == b[0] for a, b in zip(cols, cols[1:]))  # no gap, no overlap
    assert all(a[3] == b[1] for a, b in zip(rows, rows[1:]))


def test_center_crop_drops_the_ends_of_a_wide_image_as_the_paper_did():
    _, geom = prepare_pixels(ramp_image(341, 256), PreprocessConfig(geometry="center_crop"))
    assert geom.patch_box(0, 0)[0] == 58 and geom.patch_box(0, 15)[2] == 341 - 59


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


@pytest.mark.parametrize("mode,fmt,value,expected", [
    ("L", "PNG", 200, (200, 200, 200)),
    ("LA", "PNG", (50, 0), (255, 255, 255)),          # fully transparent → white background
    ("RGBA", "PNG", (10, 20, 30, 255), (10, 20, 30)),
    ("CMYK", "JPEG", (0, 0, 0, 0), (255, 255, 255)),
    ("I;16", "PNG", 65535, (255, 255, 255)),
    ("I;16", "PNG", 32896, (128, 128, 128)),
    ("P", "PNG", 3, None),
])
def test_every_mode_becomes_rgb(mode, fmt, value, expected):
    img = Image.new(mode, (30, 20), value)
    if mode == "P":
        img.putpalette([0, 0, 0, 10, 10, 10, 20, 20, 20, 90, 140, 210] + [0] * 756)
        expected = (90, 140, 210)
    out = decode_image(encode(img, fmt), PreprocessConfig())
    assert out.mode == "RGB"
    got = np.asarray(out)[10, 15]
    assert np.abs(got.astype(int) - expected).max() <= 3, (got, expected)


def test_to_rgb_composites_partial_alpha_on_white():
    img = Image.new("RGBA", (2, 2), (0, 0, 0, 128))
    assert np.asarray(to_rgb(img))[0, 0].tolist() == [127, 127, 127]


def good_jpeg(size=(60, 40)) -> bytes:
    rng = np.random.default_rng(0)
    return encode(Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)), "JPEG")


@pytest.mark.parametrize("data,reason", [
    (b"", "empty_file"),
    (good_jpeg()[: len(good_jpeg()) * 2 // 3], "truncated"),
    (b"this is a text file, not a jpeg" * 10, "not_an_image"),
    (encode(Image.new("RGB", (10, 40)), "PNG"), "too_small"),
    (encode(Image.new("1", (9000, 9000)), "PNG"), "too_many_pixels"),
])
def test_bad_images_are_rejected_with_a_reason(data, reason):
    with pytest.raises(ImageRejected) as err:
        decode_image(data, PreprocessConfig(max_pixels=40_000_000))
    assert err.value.reason == reason


def test_bomb_is_refused_from_the_header_without_decoding(monkeypatch):
    data = encode(Image.new("1", (9000, 9000)), "PNG")
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded a bomb"))
    with pytest.raises(ImageRejected, match="too_many_pixels"):
        decode_image(data, PreprocessConfig(max_pixels=40_000_000))


class DictReader:
    def __init__(self, files):
        self.files = files

    def read(self, path, source_file=None, source_row=None):
        if path not in self.files:
            raise FileNotFoundError(path)
        return self.files[path]


def test_decode_batch_keeps_good_rows_and_rejects_bad_ones_individually():
    files = {"a": good_jpeg(), "b": b"", "c": good_jpeg((80, 50))}
    ids = ["a", "b", "c", "d"]
    batch = {"image_id": np.array(ids, dtype=object), "path": np.array(ids, dtype=object),
             **{k: np.array([None] * 4, dtype=object) for k in ("species", "genus", "family", "split", "source_file", "source_row")}}
    good, rejected = decode_batch(batch, PreprocessConfig(), DictReader(files))
    assert list(good["image_id"]) == ["a", "c"]
    assert good["pixels"].shape == (2, 224, 224, 3) and good["pixels"].dtype == np.uint8
    assert good["orig_w"].tolist() == [60, 80]
    assert {(r.image_id, r.reason) for r in rejected} == {("b", "empty_file"), ("d", "missing_file")}
    assert all(r.stage == "decode" for r in rejected)


def test_rejection_details_are_stable_and_say_what_the_bytes_were():
    data = b"this is a text file, not a jpeg" * 10
    details = []
    for _ in range(2):
        with pytest.raises(ImageRejected) as err:
            decode_image(data, PreprocessConfig())
        details.append(err.value.detail)
    assert details[0] == details[1] and "0x" not in details[0] and "BytesIO" not in details[0]
    assert details[0] == f"{len(data)} bytes in no image format Pillow reads (they start {data[:16]!r})"
    cut = good_jpeg()[: len(good_jpeg()) * 2 // 3]
    bomb = encode(Image.new("1", (9000, 9000)), "PNG")
    for data, says in ((cut, f"JPEG of 60x40 (its header says) in {len(cut)} bytes: OSError: image file is truncated"),
                       (bomb, "9000x9000 = 81000000 > preprocess.max_pixels=40000000")):
        seen = set()
        for _ in range(2):
            with pytest.raises(ImageRejected) as err:
                decode_image(data, PreprocessConfig(max_pixels=40_000_000))
            seen.add(err.value.detail)
        assert len(seen) == 1 and seen.pop().startswith(says)


def test_only_the_accepted_formats_are_decoded_told_apart_by_their_bytes():
    cfg = PreprocessConfig(formats=["JPEG", "PNG", "WEBP", "TIFF"])
    for fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
        assert decode_image(encode(Image.new("RGB", (32, 32), "red"), fmt), cfg).size == (32, 32)
    gif = encode(Image.new("RGB", (32, 32), "red"), "GIF")
    assert decode_image(gif, PreprocessConfig()).size == (32, 32)  # builds: every format Pillow reads
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n" + b"0 0 moveto\n" * 20
    for data in (gif, eps, encode(Image.new("RGB", (32, 32)), "BMP")):
        with pytest.raises(ImageRejected) as err:
            decode_image(data, cfg)
        assert err.value.reason == "not_an_image" and "no JPEG/PNG/WEBP/TIFF format" in err.value.detail


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow, on the cut TIFF
@pytest.mark.parametrize("fmt,suffix", [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("GIF", "gif"),
                                        ("TIFF", "tif")])
def test_a_format_is_told_by_its_bytes_whole_or_cut_short(fmt, suffix):
    """One table of signatures (contract.IMAGE_FORMATS) tells the format to the decoder, the LLM's
    MIME type, the caption shards and the exports' file names."""
    from pipeline.contract import image_format
    from pipeline.export import image_suffix

    data = encode(Image.new("RGB", (32, 32), "red"), fmt)
    assert image_format(data).pillow == fmt and image_suffix(data) == suffix
    with pytest.raises(ImageRejected) as err:  # cut inside its header: a photo cut short, not some other file
        decode_image(data[:20], PreprocessConfig())
    assert err.value.reason == "truncated" and err.value.detail.startswith(f"{fmt} of 20 bytes")
    assert image_format(b"BM" + data[2:]) is None and image_suffix(b"BM" + data[2:]) == "bin"


def test_error_detail_drops_object_addresses():
    from pipeline.errors import error_detail

    detail = error_detail(ValueError("cannot read <_io.BytesIO object at 0x7f6cf5e35620>"))
    assert detail == "ValueError: cannot read <_io.BytesIO object>"


def no_scan_jpeg() -> bytes:
    """A JPEG header and end marker with no image data: it opens, and fails only when decoded."""
    data = good_jpeg((64, 64))
    return data[:data.index(b"\xff\xda")] + b"\xff\xd9"


def test_decode_gpu_checks_headers_in_the_task_and_decodes_in_the_actor_to_the_same_geometry():
    """preprocess.decode: gpu — the decode task passes checked bytes (a cut JPEG is still refused
    there, by the CPU decoder); the actor's DeviceDecoder gives the model input the CPU path gives
    (to a grey level or two: its resample runs in torch, the GPU's way) and the same geometry; an
    image that fails only when decoded becomes a rejection there. On this CPU the JPEGs are decoded
    by Pillow where a GPU uses nvJPEG."""
    from pipeline.preprocessing import IMAGE_BYTES, DeviceDecoder

    cfg = PreprocessConfig(decode="gpu")
    big = encode(texture(1003, 901), "JPEG", quality=95)
    cut = big[: len(big) // 2]
    cmyk = encode(texture(300, 200).convert("CMYK"), "JPEG")
    files = {"big": big, "small": encode(texture(256, 334), "JPEG"), "png": encode(texture(640, 480), "PNG"),
             "cmyk": cmyk, "trailing": encode(texture(400, 300), "JPEG") + b"\0garbage", "cut": cut,
             "noscan": no_scan_jpeg()}
    ids = list(files)
    batch = {"image_id": np.array(ids, dtype=object), "path": np.array(ids, dtype=object),
             **{k: np.array([None] * len(ids), dtype=object)
                for k in ("species", "genus", "family", "split", "source_file", "source_row")}}
    checked, rejected = decode_batch(batch, cfg, DictReader(files))
    assert "pixels" not in checked and list(checked["image_id"]) == [i for i in ids if i != "cut"]
    assert [(r.image_id, r.reason) for r in rejected] == [("cut", "truncated")]
    assert [bytes(b) for b in checked[IMAGE_BYTES]] == [files[i] for i in checked["image_id"]]

    decoded, failed = DeviceDecoder(cfg, 14, "cpu")(checked)
    assert [(r.image_id, r.reason, r.stage) for r in failed] == [("noscan", "decode_failed", "decode")]
    assert IMAGE_BYTES not in decoded and list(decoded["image_id"]) == ["big", "small", "png", "cmyk", "trailing"]
    on_cpu, _ = decode_batch({k: v[:-2] for k, v in batch.items()},
                             PreprocessConfig(), DictReader(files))
    assert decoded["pixels"].shape == (5, 224, 224, 3) and decoded["pixels"].dtype == torch.uint8
    for k in ("orig_w", "orig_h", "scale_x", "scale_y", "offset_x", "offset_y"):
        assert decoded[k].tolist() == on_cpu[k].tolist()
    diff = np.abs(decoded["pixels"].numpy().astype(int) - on_cpu["pixels"])
    assert diff.reshape(5, -1).mean(1).max() < 1.5, diff.reshape(5, -1).mean(1)
    for i, image_id in enumerate(decoded["image_id"]):  # what nvJPEG does not take goes through prepare_bytes
        if image_id in ("png", "cmyk"):
            assert np.array_equal(decoded["pixels"][i].numpy(), on_cpu["pixels"][i])
