"""Image and video loaders: geometry and patches against transformers' Qwen2-VL image processor (PIL backend),
PIL modes, EXIF, animation, 1-fps video sampling on a lossless video, and a corpus of bad files."""

import dataclasses
import io
import struct
import wave
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from omni_edge.config import parse_config
from omni_edge.inputs import (InputError, MAX_DECODE_PIXELS, VisualInput, load_image, load_video, patchify,
                              sample_indices, smart_resize, tokens_for)
from omni_edge.testing import reference_config

CFG = parse_config(reference_config())
IMAGE, VIDEO = CFG.visual, CFG.video
# transformers normalises in fp32, we in fp64 then round (as the original processor): 1 fp32 ulp at |x| ~ 2
PATCH_ATOL = 5e-7


def rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(img, path, **kw):
    img.save(path, **kw)
    return str(path)


def hf_processor(cfg):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                                    image_mean=list(cfg.image_mean), image_std=list(cfg.image_std))


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(15, 4000, (300, 2))] + [(15, 2800), (3000, 3000), (56, 56)]
    for h, w in sizes:
        if max(h, w) / min(h, w) > 200:
            continue
        for lo, hi in ((IMAGE.min_pixels, IMAGE.max_pixels), (VIDEO.min_pixels, VIDEO.max_pixels)):
            assert smart_resize(h, w, 28, lo, hi) == hf_smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)
    # At <= 14 pixels on a side the two rules part: the original processor (MODEL.md §1.2, which we follow) first
    # rounds each side up to at least 28; transformers rounds such a side to 0 and rescales the whole image.
    assert smart_resize(10, 1000, 28, IMAGE.min_pixels, IMAGE.max_pixels) == (28, 1008)
    assert smart_resize(14, 2800, 28, IMAGE.min_pixels, IMAGE.max_pixels) == (28, 2800)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2010)


@pytest.mark.parametrize("size", [(97, 61), (333, 517), (29, 1000), (2001, 1999), (56, 56)])
def test_patches_match_transformers_processor(tmp_path, size):
    h, w = size
    img = Image.fromarray(rgb(h, w, seed=h))
    want = hf_processor(IMAGE)(images=[img], return_tensors="pt")
    item = load_image(save(img, tmp_path / "x.png"), IMAGE)
    assert item.grid_thw == [tuple(want["image_grid_thw"][0].tolist())]
    assert item.patches.dtype == torch.float32 and item.patches.shape == want["pixel_values"].shape
    assert (item.patches - want["pixel_values"]).abs().max().item() <= PATCH_ATOL
    gh, gw = item.grid_thw[0][1:]
    assert item.n_tokens == tokens_for(h, w, IMAGE) == gh * gw // 4


def test_video_frame_limit_matches_transformers(tmp_path):
    img = Image.fromarray(rgb(1080, 1920, seed=1))
    want = hf_processor(VIDEO)(images=[img], return_tensors="pt")
    item = load_image(save(img, tmp_path / "x.png"), VIDEO)
    assert item.grid_thw == [tuple(want["image_grid_thw"][0].tolist())]
    assert item.n_tokens <= VIDEO.max_pixels // 784
    assert (item.patches - want["pixel_values"]).abs().max().item() <= PATCH_ATOL


def test_patch_layout_is_qwen2vl_order():
    """Reference layout written out with the original's reshape/transpose, on a tiny image."""
    a = rgb(56, 84, seed=7)
    got, grid = patchify(a, IMAGE)
    mean = np.array(IMAGE.image_mean)[:, None, None]
    std = np.array(IMAGE.image_std)[:, None, None]
    x = np.tile(((a.transpose(2, 0, 1) / 255.0 - mean) / std)[None], (2, 1, 1, 1))
    x = x.reshape(1, 2, 3, 2, 2, 14, 3, 2, 14).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(4 * 6, 1176)
    assert grid == (1, 4, 6)
    assert torch.equal(got, torch.from_numpy(x.astype(np.float32)))


def test_modes_are_converted_like_the_reference(tmp_path):
    base = rgb(60, 90, seed=2)
    plain = load_image(save(Image.fromarray(base), tmp_path / "rgb.png"), IMAGE).patches
    # RGBA / LA / palette / CMYK: PIL's own conversion to RGB (alpha dropped), as the original processor
    rgba = Image.fromarray(np.dstack([base, np.full(base.shape[:2], 7, np.uint8)]), "RGBA")
    assert torch.equal(load_image(save(rgba, tmp_path / "a.png"), IMAGE).patches, plain)
    for mode, suffix in (("LA", ".png"), ("P", ".png"), ("CMYK", ".tiff"), ("L", ".png")):
        img = Image.fromarray(base).convert(mode)
        want = load_image(save(img.convert("RGB"), tmp_path / f"want_{mode}.png"), IMAGE).patches
        got = load_image(save(img, tmp_path / f"m_{mode}{suffix}"), IMAGE).patches
        assert torch.equal(got, want), mode
    # 16-bit greyscale is scaled to 8 bits (v * 257 >> 8 == v), not clipped
    grey = base[..., 0]
    g16 = Image.fromarray(grey.astype(np.uint16) * 257)
    assert g16.mode.startswith("I")
    want = load_image(save(Image.fromarray(grey, "L"), tmp_path / "g8.png"), IMAGE).patches
    assert torch.equal(load_image(save(g16, tmp_path / "g16.png"), IMAGE).patches, want)


def test_exif_orientation_and_first_frame(tmp_path):
    a = rgb(40, 100, seed=3)
    img = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    tagged = load_image(save(img, tmp_path / "tagged.png", exif=exif), IMAGE)
    upright = load_image(save(img.transpose(Image.Transpose.ROTATE_270), tmp_path / "upright.png"), IMAGE)
    assert tagged.grid_thw == upright.grid_thw and torch.equal(tagged.patches, upright.patches)
    # animated GIF: the first frame
    frames = [Image.fromarray(rgb(64, 48, seed=s)).convert("P") for s in (4, 5, 6)]
    save(frames[0], tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    first = load_image(save(frames[0], tmp_path / "first.gif"), IMAGE)
    assert torch.equal(load_image(tmp_path / "anim.gif", IMAGE).patches, first.patches)


def test_digest_depends_on_bytes_and_parameters(tmp_path):
    p = save(Image.fromarray(rgb(50, 50)), tmp_path / "d.png")
    a, b = load_image(p, IMAGE), load_image(p, IMAGE)
    assert a.digest == b.digest and len(a.digest) == 64
    assert load_image(p, VIDEO).digest != a.digest  # other max_pixels
    q = save(Image.fromarray(rgb(50, 50, seed=9)), tmp_path / "e.png")
    assert load_image(q, IMAGE).digest != a.digest


def test_sample_indices_follow_the_reference():
    assert sample_indices(23, 5, 32) == [0, 5, 10, 15, 20]
    assert sample_indices(5, 30, 32) == [0]
    assert sample_indices(0, 30, 32) == []
    n, fps = 100 * 25, 25  # 100 s at 25 fps: 100 one-second frames, 32 kept with np.linspace
    picked = list(range(0, n, fps))
    assert sample_indices(n, fps, 32) == [picked[i] for i in np.linspace(0, 99, 32, dtype=int)]


def write_video(path, frames, fps, codec="png", pix_fmt="rgb24"):
    import av
    with av.open(str(path), "w") as out:
        s = out.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = frames[0].shape[1], frames[0].shape[0], pix_fmt
        for f in frames:
            for pkt in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(pkt)
        for pkt in s.encode():
            out.mux(pkt)
    return str(path)


def test_video_one_frame_per_second_lossless(tmp_path):
    frames = [rgb(60, 80, seed=10 + i) for i in range(23)]
    path = write_video(tmp_path / "v.mov", frames, fps=5)
    item = load_video(path, VIDEO)
    assert item.kind == "video" and item.frame_seconds == [0, 1, 2, 3, 4]
    want = [patchify(np.asarray(Image.fromarray(frames[i]).resize((84, 56), Image.BICUBIC)), VIDEO)[0]
            for i in (0, 5, 10, 15, 20)]
    assert item.grid_thw == [(1, 4, 6)] * 5 and item.frame_tokens == [6] * 5
    assert torch.equal(item.patches, torch.cat(want))
    # at most max_frame_num frames, evenly spaced
    few = load_video(path, dataclasses.replace(VIDEO, max_frame_num=3))
    assert few.frame_seconds == [0, 2, 4] and len(few.grid_thw) == 3
    with pytest.raises(InputError, match=r"v\.mov.*30 visual tokens.*more than the 29"):
        load_video(path, VIDEO, max_tokens=29)


def _png_header_only(width, height):
    """A PNG whose header claims width x height (tiny body): a decompression bomb as Pillow sees it on open."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def bad_image_corpus(d):
    """(path, message fragment) for every kind of bad image input."""
    good = io.BytesIO()
    Image.fromarray(rgb(200, 200)).save(good, "PNG")
    jpg = io.BytesIO()
    Image.fromarray(rgb(200, 200)).save(jpg, "JPEG")
    files = {
        "empty.png": (b"", "empty"),
        "noise.png": (np.random.default_rng(0).bytes(4096), "not a readable image"),
        "text.jpg": (b"hello, this is not an image\n" * 20, "not a readable image"),
        "truncated.png": (good.getvalue()[: len(good.getvalue()) // 2], "truncated or corrupt"),
        "truncated.jpg": (jpg.getvalue()[: len(jpg.getvalue()) // 3], "truncated or corrupt"),
        "bomb.png": (_png_header_only(60000, 60000), "decompression bomb|decode limit"),
        "big.png": (_png_header_only(9000, 9000), "exceeds the decode limit"),
    }
    out = []
    for name, (data, msg) in files.items():
        (d / name).write_bytes(data)
        out.append((d / name, msg, {}))
    out.append((save(Image.fromarray(rgb(10, 10)), d / "tiny.png"), "too small", {}))
    out.append((save(Image.fromarray(rgb(2, 401)), d / "thin.png"), "aspect ratio", {}))
    out.append((save(Image.fromarray(rgb(300, 300)), d / "many.png"), "more than the 10", {"max_tokens": 10}))
    out.append((d / "missing.png", "no such file", {}))
    (d / "folder.png").mkdir()
    out.append((d / "folder.png", "not a regular file", {}))
    return out


def bad_video_corpus(d):
    frames = [rgb(60, 80, seed=i) for i in range(6)]
    good = write_video(d / "good.mov", frames, fps=2)
    data = open(good, "rb").read()
    (d / "empty.mp4").write_bytes(b"")
    (d / "noise.mp4").write_bytes(np.random.default_rng(1).bytes(8192))
    (d / "cut.mov").write_bytes(data[:200])
    # every frame's PNG payload broken: the container demuxes, no frame decodes
    (d / "broken.mov").write_bytes(data.replace(b"IHDR", b"XXXX").replace(b"IDAT", b"YYYY"))
    with wave.open(str(d / "audio.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(b"\0\0" * 1600)
    tiny = write_video(d / "tiny.mov", [rgb(10, 10)] * 3, fps=1)
    return [(d / "empty.mp4", "empty", {}), (d / "noise.mp4", "not a readable video", {}),
            (d / "cut.mov", "not a readable video|no decodable", {}),
            (d / "broken.mov", "no decodable video frame", {}), (d / "audio.wav", "no video stream", {}),
            (tiny, "too small", {}), (good, "more than the 5", {"max_tokens": 5}),
            (good, "decode limit", {"max_decode_pixels": 1000}), (d / "nothing.mp4", "no such file", {})]


def test_bad_inputs_give_one_clear_error_each(tmp_path):
    import re

    images = bad_image_corpus(tmp_path)
    videos = bad_video_corpus(tmp_path)
    assert (len(images), len(videos)) == (12, 9)
    for loader, cfg, corpus in ((load_image, IMAGE, images), (load_video, VIDEO, videos)):
        for path, msg, kw in corpus:
            with pytest.raises(InputError) as info:
                loader(path, cfg, **kw)
            text = str(info.value)
            assert "\n" not in text and str(path) in text, text
            assert re.search(msg, text), (path, text)
    assert issubclass(InputError, ValueError)
    assert MAX_DECODE_PIXELS < 9000 * 9000


def test_visual_input_counts():
    item = VisualInput("video", "v.mp4", torch.zeros(40, 1176), [(1, 4, 6), (1, 4, 4)], "x")
    assert item.frame_tokens == [6, 4] and item.n_tokens == 10


def test_imports_stay_light():
    import subprocess
    import sys

    code = ("import sys, omni_edge.inputs, omni_edge.vision; "
            "print(sorted(m for m in ('onnx', 'onnxruntime', 'transformers', 'av', 'PIL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
