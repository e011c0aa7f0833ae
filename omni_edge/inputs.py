"""Image and video input: files -> prepared visual items (ViT patches) for the vision stage.

MODEL.md §1.2 / §1.3 give the reference processing (`OmniImageProcessor.image_transform`):

    RGB -> smart_resize (multiples of 28, aspect ratio <= 200, pixels within [min_pixels, max_pixels])
        -> PIL bicubic resize -> /255 -> CLIP mean/std -> tiled to 2 temporal frames
        -> patches in Qwen2-VL order, 3*2*14*14 = 1176 values each; grid (1, H/14, W/14)

Video (decode_way "1fps"): frames 0, fps, 2*fps, ... with fps = round(average fps), at most `max_frame_num`
(32) of them kept evenly spaced (np.linspace, as the reference), each frame an image with t = 1 and the video
section's max_pixels (602,112).

Where we differ from the reference, on purpose:
- EXIF orientation is applied (the reference shows the camera's raw orientation).
- 16-bit greyscale is scaled to 8 bits (PIL's plain conversion clips it, which whitens most such images).
- Images of <= 256 pixels are refused with an error instead of being dropped silently.
- Video frames go straight from the decoder to the resize; the reference writes them as JPEG files first.
Palette / RGBA / LA / CMYK images use PIL's own conversion to RGB, as the reference (alpha is dropped, not
composited), and animated files give their first frame.

Every bad input raises `InputError` (a ValueError) naming the file and the limit: missing, empty, unreadable
or truncated files, files that are not images, decompression bombs (refused from the header, BEFORE any pixel
is decoded), videos with no decodable frame, and more visual tokens than `max_tokens`.

Pillow and numpy are imported here; PyAV only inside `load_video`.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from omni_edge.config import VideoConfig, VisualConfig

MAX_RATIO = 200  # longest / shortest side, as the reference's smart_resize
MIN_SOURCE_PIXELS = 257  # the reference drops images of <= 16*16 pixels
# Refuse images whose header claims more pixels than this before decoding them (a 64-Mpx RGB image is 192 MB
# decoded); Pillow's own bomb limit (about 179 Mpx) is higher.
MAX_DECODE_PIXELS = 64 * 1024 * 1024
PATCH_VALUES = 3 * 2 * 14 * 14  # 1176 values per patch for the real config
PROCESSING_VERSION = "1"  # part of every digest: bump when the pixels a file gives can change


class InputError(ValueError):
    """A media file that cannot be used; the message names the file and the limit or the problem."""


@dataclass
class VisualInput:
    """One prepared image or video: what `VisionStage.embed` takes and the prompt renderer counts."""
    kind: str  # "image" | "video"
    source: str  # the file it came from (for messages)
    patches: torch.Tensor  # (P, C*T*p*p = 1176) fp32, Qwen2-VL order, every image / frame concatenated
    grid_thw: List[Tuple[int, int, int]]  # per image or video frame: (t = 1, h/14, w/14)
    digest: str  # sha256 hex of the file bytes and the processing parameters (KV-cache reuse key)
    merge_size: int = 2  # spatial_merge_size: 2x2 patches make one token
    frame_seconds: List[int] = field(default_factory=list)  # video: the second each frame was taken at

    @property
    def frame_tokens(self) -> List[int]:
        """Tokens of each image / frame: t*h*w // merge_size**2."""
        m2 = self.merge_size ** 2
        return [t * h * w // m2 for t, h, w in self.grid_thw]

    @property
    def n_tokens(self) -> int:
        return sum(self.frame_tokens)


# ------------------------------------------------------------------------------------------------
# The reference's geometry
# ------------------------------------------------------------------------------------------------

def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 3136,
                 max_pixels: int = 3211264) -> Tuple[int, int]:
    """(height, width) rounded to multiples of `factor`, scaled into [min_pixels, max_pixels] keeping the aspect
    ratio as far as possible (the reference's rule, MODEL.md §1.2). ValueError when the aspect ratio > 200."""
    if height <= 0 or width <= 0:
        raise ValueError(f"smart_resize: height and width must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} exceeds the limit {MAX_RATIO}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _factor(cfg: VisualConfig) -> int:
    return cfg.patch_size * cfg.spatial_merge_size


def tokens_for(height: int, width: int, cfg: VisualConfig) -> int:
    """Visual tokens one image / frame of this size gives (no pixels needed)."""
    h, w = smart_resize(height, width, _factor(cfg), cfg.min_pixels, cfg.max_pixels)
    return (h // cfg.patch_size) * (w // cfg.patch_size) // cfg.merge_size ** 2


def patchify(rgb: np.ndarray, cfg: VisualConfig) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
    """One RGB uint8 image (H, W, 3), already resized to multiples of 28 -> (patches (h*w, 1176) fp32, (1, h, w)).

    Normalisation runs in float64 like the reference (x / 255.0 - mean) / std, then rounds to fp32. The still
    image is tiled to `temporal_patch_size` identical frames; the order of the 1176 values is (channel,
    frame, row, column) and the patches run over 2x2 merge groups (Qwen2-VL's transpose (0,3,6,4,7,2,1,5,8))."""
    p, m, tp = cfg.patch_size, cfg.spatial_merge_size, cfg.temporal_patch_size
    hh, ww, c = rgb.shape
    gh, gw = hh // p, ww // p
    mean = np.asarray(cfg.image_mean, dtype=np.float64)[:, None, None]
    std = np.asarray(cfg.image_std, dtype=np.float64)[:, None, None]
    x = ((rgb.transpose(2, 0, 1) / 255.0 - mean) / std).astype(np.float32)  # (C, H, W)
    # (C, gh/m, m, p, gw/m, m, p) -> (gh/m, gw/m, m, m, C, p, p): one row per patch, merge groups contiguous
    x = x.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    # tile the frame in time: (..., C, tp, p, p)
    x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (tp, p, p))
    out = np.ascontiguousarray(x).reshape(gh * gw, c * tp * p * p)
    return torch.from_numpy(out), (1, gh, gw)


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------

def _read_bytes(path, what: str) -> Tuple[str, bytes]:
    src = os.fspath(path)
    if not os.path.exists(src):
        raise InputError(f"{what} {src}: no such file")
    if not os.path.isfile(src):
        raise InputError(f"{what} {src}: not a regular file")
    try:
        with open(src, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"{what} {src}: cannot read the file ({e.strerror or e})") from None
    if not data:
        raise InputError(f"{what} {src}: the file is empty (0 bytes)")
    return src, data


def _digest(data: bytes, kind: str, cfg: VisualConfig, extra: str = "") -> str:
    h = hashlib.sha256(data)
    params = (f"|omni-edge-visual-v{PROCESSING_VERSION}|{kind}|{cfg.patch_size}|{cfg.temporal_patch_size}|"
              f"{cfg.spatial_merge_size}|{cfg.min_pixels}|{cfg.max_pixels}|{list(cfg.image_mean)}|"
              f"{list(cfg.image_std)}|{extra}")
    h.update(params.encode())
    return h.hexdigest()


def _to_rgb(img, src: str):
    """Any PIL mode -> "RGB" (see the module docstring for the rules)."""
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(img)
        if mode == "F":
            a8 = np.clip(a, 0, 255).astype(np.uint8)
        else:
            a = a.astype(np.int64)
            a8 = np.clip(a >> 8 if (mode.startswith("I;16") or a.max() > 255) else a, 0, 255).astype(np.uint8)
        return Image.fromarray(a8, mode="L").convert("RGB")
    try:
        return img.convert("RGB")
    except (OSError, ValueError) as e:
        raise InputError(f"image {src}: cannot convert mode {mode} to RGB ({e})") from None


def _check_size(src: str, what: str, width: int, height: int, cfg: VisualConfig, max_decode_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise InputError(f"{what} {src}: invalid size {width}x{height}")
    if width * height > max_decode_pixels:
        raise InputError(f"{what} {src}: {width}x{height} = {width * height:,} pixels exceeds the decode limit of "
                         f"{max_decode_pixels:,} pixels (refused before decoding)")
    if width * height < MIN_SOURCE_PIXELS:
        raise InputError(f"{what} {src}: {width}x{height} is too small (at least {MIN_SOURCE_PIXELS} pixels; "
                         f"the model drops images of <= 256 pixels)")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_RATIO:
        raise InputError(f"{what} {src}: aspect ratio {ratio:.1f} ({width}x{height}) exceeds the limit {MAX_RATIO}")


def _check_tokens(src: str, what: str, n: int, max_tokens: Optional[int]) -> None:
    if max_tokens is not None and n > max_tokens:
        raise InputError(f"{what} {src}: needs {n} visual tokens, more than the {max_tokens} the context can hold")


def _resize_patchify(img, cfg: VisualConfig):
    """PIL RGB image -> (patches, grid) with the reference's smart_resize + bicubic resize."""
    from PIL import Image

    w, h = img.size
    rh, rw = smart_resize(h, w, _factor(cfg), cfg.min_pixels, cfg.max_pixels)
    if (rw, rh) != (w, h):
        img = img.resize((rw, rh), resample=Image.BICUBIC, reducing_gap=None)
    return patchify(np.asarray(img, dtype=np.uint8), cfg)


def load_image(path, cfg: VisualConfig, *, max_tokens: Optional[int] = None,
               max_decode_pixels: int = MAX_DECODE_PIXELS) -> VisualInput:
    """An image file -> VisualInput (one grid entry). InputError for any bad input (see the module docstring)."""
    from PIL import Image, ImageOps

    src, data = _read_bytes(path, "image")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))  # reads the header only
        except Image.DecompressionBombError as e:
            raise InputError(f"image {src}: refused as a decompression bomb ({e})") from None
        except (Image.UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise InputError(f"image {src}: not a readable image file ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:120]})") from None
        width, height = img.size
        _check_size(src, "image", width, height, cfg, max_decode_pixels)
        # orientation from EXIF swaps the sides for 90-degree rotations; the token count does not change
        _check_tokens(src, "image", tokens_for(height, width, cfg), max_tokens)
        try:
            img.seek(0)  # animated files: the first frame
            img.load()
            img = ImageOps.exif_transpose(img)
            rgb = _to_rgb(img, src)
        except InputError:
            raise
        except Exception as e:  # Pillow raises OSError / SyntaxError / struct.error / ... on corrupt data
            msg = " ".join(str(e).split())[:120]
            what = "truncated or corrupt" if "truncat" in msg.lower() else "corrupt"
            raise InputError(f"image {src}: {what} image data ({type(e).__name__}: {msg})") from None
    patches, grid = _resize_patchify(rgb, cfg)
    return VisualInput(kind="image", source=src, patches=patches, grid_thw=[grid], digest=_digest(data, "image", cfg),
                       merge_size=cfg.merge_size)


# ------------------------------------------------------------------------------------------------
# Video
# ------------------------------------------------------------------------------------------------

def sample_indices(n_frames: int, fps: int, max_frames: int) -> List[int]:
    """Indices of the frames kept from a video of `n_frames` decoded frames: 0, fps, 2*fps, ... (1 per second),
    then at most `max_frames` of those, evenly spaced as np.linspace(0, n - 1, max_frames, dtype=int) picks."""
    fps = max(1, int(fps))
    picked = list(range(0, n_frames, fps))
    if max_frames > 0 and len(picked) > max_frames:
        sel = np.linspace(0, len(picked) - 1, max_frames, dtype=int)
        picked = [picked[i] for i in sel]
    return picked


def load_video(path, cfg: VideoConfig, *, max_tokens: Optional[int] = None,
               max_decode_pixels: int = MAX_DECODE_PIXELS) -> VisualInput:
    """A video file -> VisualInput with one (1, h, w) grid entry per kept frame (1 frame/s, at most
    cfg.max_frame_num). InputError for unreadable files, no video stream, no decodable frame, frames over the
    pixel limits, or more visual tokens than `max_tokens`."""
    src, data = _read_bytes(path, "video")
    if cfg.decode_way != "1fps":
        raise InputError(f"video {src}: decode_way {cfg.decode_way!r} is not supported (only '1fps')")
    try:
        import av
    except ImportError as e:
        raise InputError(f"video {src}: reading video needs PyAV (pip install av): {e}") from None

    def open_stream():
        try:
            container = av.open(io.BytesIO(data))
        except Exception as e:  # av.error.* (InvalidDataError, ...) are OSError / ValueError subclasses
            raise InputError(f"video {src}: not a readable video file ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:120]})") from None
        if not container.streams.video:
            container.close()
            raise InputError(f"video {src}: the file has no video stream")
        return container, container.streams.video[0]

    # Pass 1: count the frames (demux only, no decoding) and read the rate and size from the headers.
    container, stream = open_stream()
    try:
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = round(float(rate)) if rate else 0
        width, height = stream.codec_context.width, stream.codec_context.height
        if width and height:
            _check_size(src, "video frame of", width, height, cfg, max_decode_pixels)
        try:
            n_packets = sum(1 for pkt in container.demux(stream) if pkt.size)
        except Exception:
            n_packets = 0  # counted from decoding below
    finally:
        container.close()
    if fps <= 0:
        raise InputError(f"video {src}: the stream has no usable frame rate")

    def decode(wanted: Optional[set]):
        """Decode the stream; keep frames whose index is in `wanted` (all when None). -> (kept, n_decoded)."""
        kept, n = {}, 0
        container, stream = open_stream()
        try:
            for frame in container.decode(stream):
                if wanted is None or n in wanted:
                    if frame.width * frame.height > max_decode_pixels:
                        raise InputError(f"video {src}: frame {frame.width}x{frame.height} exceeds the decode "
                                         f"limit of {max_decode_pixels:,} pixels")
                    kept[n] = frame.to_image()  # PIL RGB
                n += 1
        except InputError:
            raise
        except Exception:
            pass  # a corrupt tail: keep what decoded
        finally:
            container.close()
        return kept, n

    picked = sample_indices(n_packets, fps, cfg.max_frame_num)
    if width and height and picked:  # refuse an over-long video from its headers, before decoding it
        _check_tokens(src, f"video ({len(picked)} frames)", len(picked) * tokens_for(height, width, cfg), max_tokens)
    kept, n_decoded = decode(set(picked))
    if n_decoded != n_packets:
        # the packet count was not the frame count (a damaged tail, ...): sample from the decoded count
        picked = sample_indices(n_decoded, fps, cfg.max_frame_num)
        if any(i not in kept for i in picked):
            kept, _ = decode(set(picked))
        picked = [i for i in picked if i in kept]
    if not picked:
        raise InputError(f"video {src}: no decodable video frame")

    frames = [kept[i] for i in picked]
    w0, h0 = frames[0].size
    _check_size(src, "video frame of", w0, h0, cfg, max_decode_pixels)
    total = sum(tokens_for(f.size[1], f.size[0], cfg) for f in frames)
    _check_tokens(src, f"video ({len(frames)} frames)", total, max_tokens)
    patches, grids = [], []
    for f in frames:
        p, g = _resize_patchify(f if f.mode == "RGB" else f.convert("RGB"), cfg)
        patches.append(p)
        grids.append(g)
    extra = f"{cfg.decode_way}|{cfg.max_frame_num}"
    return VisualInput(kind="video", source=src, patches=torch.cat(patches), grid_thw=grids,
                       digest=_digest(data, "video", cfg, extra), merge_size=cfg.merge_size,
                       frame_seconds=[i // fps for i in picked])


def load_visual(path, cfg_image: VisualConfig, cfg_video: VideoConfig, *, max_tokens: Optional[int] = None):
    """Image or video by file extension (video: .mp4 .mov .mkv .avi .webm .m4v); otherwise an image."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext in VIDEO_EXTENSIONS:
        return load_video(path, cfg_video, max_tokens=max_tokens)
    return load_image(path, cfg_image, max_tokens=max_tokens)


VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")


def concat_patches(items: Sequence[VisualInput]) -> Tuple[torch.Tensor, List[Tuple[int, int, int]]]:
    """All items' patches as one (P, 1176) tensor and their grids, in order."""
    if not items:
        return torch.zeros(0, PATCH_VALUES), []
    return torch.cat([it.patches for it in items]), [g for it in items for g in it.grid_thw]
