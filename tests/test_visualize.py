"""Pictures of boxes: what a caption, a colour and an odd box look like."""

import math

import numpy as np
import torch

from softteacher.visualize import _text_color, color_of, draw_boxes, to_pil


def test_a_tensor_three_pixels_wide_stays_channels_first():
    image = torch.zeros(3, 5, 3, dtype=torch.uint8)
    image[0, 4, 2] = 255  # red, bottom right
    pil = to_pil(image)
    assert pil.size == (3, 5) and pil.getpixel((2, 4)) == (255, 0, 0)
    assert to_pil(np.zeros((5, 3, 3), dtype=np.uint8)).size == (3, 5)  # an array is channels last


def test_inverted_and_non_finite_boxes_draw_as_boxes_or_not_at_all():
    white = np.full((40, 60, 3), 255, dtype=np.uint8)
    straight = np.asarray(draw_boxes(white, [[10, 5, 30, 25]], color=(0, 0, 255)))
    inverted = np.asarray(draw_boxes(white, [[30, 25, 10, 5], [math.nan, 0, 5, 5]], color=(0, 0, 255)))
    assert np.array_equal(straight, inverted)
    assert tuple(straight[5, 10]) == (0, 0, 255) and tuple(straight[15, 20]) == (255, 255, 255)
    assert np.array_equal(np.asarray(draw_boxes(white, [[math.inf, 0, 5, 5]])), white)


def test_a_caption_at_the_right_edge_moves_inside_the_picture():
    white = np.full((40, 100, 3), 255, dtype=np.uint8)
    picture = draw_boxes(white, [[90, 20, 99, 30]], labels=[1], names=["elephant"])
    # "elephant" is wider than the 10 px right of the box: the caption ends at the right edge
    assert picture.getpixel((60, 12)) == color_of(1) and picture.getpixel((60, 35)) == (255, 255, 255)


def test_caption_text_reads_on_light_and_dark_colours_and_80_classes_differ():
    assert _text_color((255, 225, 25)) == (0, 0, 0)  # yellow: black text
    assert _text_color((145, 30, 180)) == (255, 255, 255)  # purple: white text
    assert [color_of(k) for k in range(10)][:2] == [(230, 25, 75), (60, 180, 75)]
    assert len({color_of(k) for k in range(81)}) == 81


def test_class_names_a_font_cannot_draw_are_captioned_all_the_same(monkeypatch):
    from PIL import ImageFont

    image = torch.zeros(3, 40, 60, dtype=torch.uint8)
    boxes = torch.tensor([[5.0, 20.0, 30.0, 35.0]])
    drawn = draw_boxes(image, boxes, [1], [0.9], ["cat\ndog"])  # a newline: drawn as a space
    assert np.array_equal(np.asarray(drawn), np.asarray(draw_boxes(image, boxes, [1], [0.9], ["cat dog"])))
    # Pillow's bitmap font (before 10.1, or without FreeType) holds Latin-1 alone: the label's number
    monkeypatch.setattr(ImageFont, "load_default", ImageFont.load_default_imagefont)
    drawn = draw_boxes(image, boxes, [1], [0.9], ["猫"])
    assert np.array_equal(np.asarray(drawn), np.asarray(draw_boxes(image, boxes, [1], [0.9], ["1"])))


def test_a_glyph_the_font_lacks_is_told_from_the_ones_it_has():
    from PIL import ImageFont

    from softteacher.visualize import _draws, _wide_font

    default = ImageFont.load_default()
    assert _draws(default, "cat 12") and not _draws(default, "cat \U0010FFFD")  # private use: no font
    assert _draws(ImageFont.load_default_imagefont(), "Gebäude") is True  # Latin-1 in the bitmap font
    assert _draws(ImageFont.load_default_imagefont(), "Жук") is False
    wide = _wide_font()
    if wide is not None:
        assert _draws(wide, "Gebäude Жук Ωμέγα") and not _draws(wide, "\U0010FFFD")


def test_a_name_outside_the_default_font_is_drawn_in_a_system_font_else_as_its_number(monkeypatch):
    from softteacher import visualize

    image = torch.zeros(3, 40, 80, dtype=torch.uint8)
    boxes = torch.tensor([[5.0, 20.0, 30.0, 35.0]])

    def caption(name):
        return np.asarray(draw_boxes(image, boxes, [1], None, [name]))

    # a character in no font: the label's number, not a box for each character
    assert np.array_equal(caption("\U0010FFFD"), caption("1"))
    if visualize._wide_font() is not None:  # an accented name: its letters, not the number
        assert not np.array_equal(caption("Gebäude"), caption("1"))
        assert not np.array_equal(caption("Gebäude"), caption("Geb\U0010FFFDude"))
    monkeypatch.setattr(visualize, "_wide_font", lambda: None)
    name = "Жук"
    if not visualize._draws(visualize.ImageFont.load_default(), name):  # no font draws it here
        assert np.array_equal(caption(name), caption("1"))
