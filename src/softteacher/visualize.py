"""Pictures of boxes: predictions, pseudo labels, ground truth."""

from __future__ import annotations

import colorsys
import functools
import unicodedata
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128),
]


def color_of(label: int) -> tuple[int, int, int]:
    """The palette's ten colours for labels 0-9; past them a hue per label (golden-ratio steps
    round the colour wheel), so that the 80 classes of COCO do not share colours eight ways."""
    label = int(label)
    if 0 <= label < len(_PALETTE):
        return _PALETTE[label]
    h = (label * 0.618033988749895) % 1.0
    v = 0.95 if label % 2 else 0.75
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, 0.85, v))


def _text_color(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on a light fill, white on a dark one (relative luminance)."""
    r, g, b = fill
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def to_pil(image) -> Image.Image:
    """A PIL RGB image from a PIL image, an (H, W, 3) uint8 array or a (3, H, W) tensor
    (uint8, or float in [0, 1])."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    tensor = hasattr(image, "detach")
    arr = image.detach().cpu().numpy() if tensor else np.asarray(image)
    if tensor and arr.ndim == 3:  # a tensor is channels first, even 3 pixels wide
        arr = arr.transpose(1, 2, 0)
    if arr.dtype != np.uint8:
        arr = np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


# Fonts that draw more scripts than Pillow's default FreeType font (Aileron: ASCII alone), the
# first of them found among the system's fonts draws a name the default cannot.
_WIDE_FONTS = ("DejaVuSans.ttf", "NotoSans-Regular.ttf", "LiberationSans-Regular.ttf", "Arial Unicode.ttf",
               "arialuni.ttf", "arial.ttf", "Arial.ttf")
_FONT_SIZE = 10
_SPACED = {"Cc", "Cf", "Cs", "Zl", "Zp"}  # control and format characters, line separators
_HAS_GLYPH: dict[tuple, dict[str, bool]] = {}  # (font name, size) -> character -> drawn
_NOTDEF: dict[tuple, tuple] = {}  # (font name, size) -> the shape of a character it lacks


@functools.lru_cache(maxsize=1)
def _wide_font() -> ImageFont.FreeTypeFont | None:
    for name in _WIDE_FONTS:
        try:
            return ImageFont.truetype(name, _FONT_SIZE)
        except OSError:
            continue
    return None


def _draws(font, text: str) -> bool:
    """Whether ``font`` holds a glyph for every character of ``text``. FreeType draws a character
    its font lacks as the font's .notdef box, as it draws U+10FFFD (private use, in no font);
    Pillow's bitmap font (before 10.1, or without FreeType) holds Latin-1 alone."""
    if not isinstance(font, ImageFont.FreeTypeFont):
        return all(ord(ch) < 256 for ch in text)
    key = (font.getname(), font.size)
    known = _HAS_GLYPH.setdefault(key, {})

    def shape(ch: str) -> tuple:
        mask = font.getmask(ch)
        return mask.size, bytes(mask)

    for ch in set(text):
        if ch.isspace():
            continue
        if ch not in known:
            if key not in _NOTDEF:
                _NOTDEF[key] = shape("\U0010FFFD")
            known[ch] = shape(ch) != _NOTDEF[key]
        if not known[ch]:
            return False
    return True


def _font_for(text: str, font) -> ImageFont.ImageFont | ImageFont.FreeTypeFont | None:
    """``font`` where it draws ``text``, else the first system font of ``_WIDE_FONTS`` where that
    does, else None."""
    if _draws(font, text):
        return font
    wide = _wide_font()
    return wide if wide is not None and _draws(wide, text) else None


def _caption(name: str, font, label: int) -> tuple[str, ImageFont.ImageFont | ImageFont.FreeTypeFont]:
    """A class name and the font that draws it: control characters (a newline) as spaces; a name
    neither ``font`` nor a system font of ``_WIDE_FONTS`` draws as its label number."""
    name = "".join(" " if unicodedata.category(ch) in _SPACED else ch for ch in name)
    chosen = _font_for(name, font)
    return (name, chosen) if chosen is not None else (str(label), font)


def draw_boxes(image, boxes, labels: Sequence[int] | None = None,
               scores: Sequence[float] | None = None, names: Sequence[str] | None = None,
               color: tuple[int, int, int] | None = None, width: int = 2) -> Image.Image:
    """Draw xyxy pixel boxes with "name score" captions on a copy of ``image``.

    Args:
        boxes: (N, 4) xyxy pixels in the image's frame; N == 0 draws nothing.
        labels: (N,) contiguous labels 1..C; ``names[label - 1]`` captions them.
        scores: (N,) optional confidences in [0, 1].
        color: one colour for all boxes; by default a colour per label.
    """
    img = to_pil(image).copy()
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    boxes = np.asarray(boxes.detach().cpu() if hasattr(boxes, "detach") else boxes,
                       dtype=np.float64).reshape(-1, 4)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        if not np.isfinite([x0, y0, x1, y1]).all():
            continue
        x0, x1 = min(x0, x1), max(x0, x1)
        y0, y1 = min(y0, y1), max(y0, y1)
        label = int(labels[i]) if labels is not None else 0
        c = color or color_of(label)
        draw.rectangle([x0, y0, x1, y1], outline=c, width=width)
        parts, caption_font = [], font
        if labels is not None:
            if names and 1 <= label <= len(names):
                name, caption_font = _caption(names[label - 1], font, label)
                parts.append(name)
            else:
                parts.append(str(label))
        if scores is not None:
            parts.append(f"{float(scores[i]):.2f}")
        if parts:
            text = " ".join(parts)
            tw = draw.textlength(text, font=caption_font)
            tx, ty = max(0.0, min(x0, img.width - tw)), max(0.0, y0 - 11)  # inside the picture
            bbox = draw.textbbox((tx, ty), text, font=caption_font)
            draw.rectangle(bbox, fill=c)
            draw.text((tx, ty), text, fill=_text_color(c), font=caption_font)
    return img


def side_by_side(images: Sequence[Image.Image], gap: int = 4) -> Image.Image:
    """Concatenate pictures horizontally on a white canvas."""
    w = sum(im.width for im in images) + gap * (len(images) - 1)
    h = max(im.height for im in images)
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    x = 0
    for im in images:
        canvas.paste(im, (x, 0))
        x += im.width + gap
    return canvas


def titled(image: Image.Image, title: str) -> Image.Image:
    """``image`` under a white strip that holds ``title`` (in a system font of ``_WIDE_FONTS``
    where Pillow's default font lacks one of its characters)."""
    font = ImageFont.load_default()
    font = _font_for(title, font) or _wide_font() or font
    probe = ImageDraw.Draw(image)
    left, top, right, bottom = probe.textbbox((0, 0), title, font=font)
    strip = bottom - top + 6
    canvas = Image.new("RGB", (max(image.width, int(right - left) + 6), image.height + strip),
                       (255, 255, 255))
    ImageDraw.Draw(canvas).text((3, 3 - top), title, fill=(0, 0, 0), font=font)
    canvas.paste(image, (0, strip))
    return canvas
