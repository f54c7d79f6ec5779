"""Views: pixels and boxes move together; views are reproducible per generator seed."""

import dataclasses

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from softteacher.config import AugmentConfig
from softteacher.data.transforms import (
    PHOTOMETRIC_OPS,
    View,
    boxes_into_view,
    enhance_factor,
    erase,
    hflip,
    labeled_view,
    random_erase,
    resize,
    resize_size,
    rotate,
    shear,
    translate,
    unlabeled_views,
    warp_affine,
)
from softteacher.data.transforms import test_view as make_test_view
from softteacher.geometry import map_boxes, scale_matrix, transform_boxes, translate_matrix

H, W = 96, 128
SQUARE = (40, 30, 70, 56)  # x0, y0, x1, y1: pixels [40, 70) x [30, 56)
BILINEAR = TF.InterpolationMode.BILINEAR


def square_image(value: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    img = torch.zeros(3, H, W, dtype=torch.uint8)
    x0, y0, x1, y1 = SQUARE
    img[:, y0:y1, x0:x1] = value
    return img, torch.tensor([SQUARE], dtype=torch.float32)


def extent(img: torch.Tensor, thr: int) -> torch.Tensor:
    """xyxy extent (continuous coords) of the pixels brighter than ``thr``."""
    ys, xs = torch.nonzero(img.max(0).values > thr, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def assert_box_matches_pixels(img, box, tol):
    # both directions: the box encloses the object's pixels and is not much bigger than them;
    # any non-zero pixel (bilinear spill) and the half-intensity extent both within tol
    for thr in (0, 50):
        diff = (extent(img, thr) - box.reshape(4)).abs().max().item()
        assert diff <= tol, (thr, extent(img, thr).tolist(), box.tolist())


@pytest.mark.parametrize("op,tol", [
    (lambda im: translate(im, 7, -5), 0.0),
    (lambda im: translate(im, -12, 9), 0.0),
    (hflip, 0.0),
    (lambda im: resize(im, 72, 1000), 1.0),     # down, antialiased
    (lambda im: resize(im, 120, 1000), 1.0),    # up
    (lambda im: rotate(im, 30), 2.0),
    (lambda im: rotate(im, -20), 2.0),
    (lambda im: rotate(im, 90), 1.0),
    (lambda im: shear(im, 25, 0), 2.0),
    (lambda im: shear(im, 0, -30), 2.0),
])
def test_pixels_follow_the_matrix(op, tol):
    img, box = square_image()
    out, m = op(img)
    assert out.dtype == torch.uint8 and out.shape[0] == 3
    assert_box_matches_pixels(out, transform_boxes(box, m), tol)


def test_flip_by_hand():
    img, box = square_image()
    out, m = hflip(img)
    assert transform_boxes(box, m).tolist() == [[W - 70.0, 30.0, W - 40.0, 56.0]]
    assert torch.equal(out, img.flip(-1))


def test_warps_agree_with_torchvision():
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, 64, 80), generator=g, dtype=torch.uint8)
    # rotation about the centre, positive = counter-clockwise: torchvision's convention
    ours, _ = rotate(img, 30)
    theirs = TF.rotate(img, 30, interpolation=BILINEAR)
    assert (ours.int() - theirs.int()).abs().max() <= 1
    # integer translation: identical pixels
    ours, _ = translate(img, 5, -3)
    assert torch.equal(ours, TF.affine(img, angle=0, translate=[5, -3], scale=1, shear=[0, 0]))
    # torchvision's shear angles have the opposite sign of geometry.shear_matrix's
    ours, _ = shear(img, 20, 0)
    theirs = TF.affine(img, angle=0, translate=[0, 0], scale=1, shear=[-20, 0],
                       interpolation=BILINEAR)
    assert (ours.int() - theirs.int()).abs().max() <= 1
    # 90 degrees on a square image: pixel centres land on pixel centres
    sq = img[:, :64, :64]
    ours, _ = rotate(sq, 90)
    assert (ours.int() - torch.rot90(sq, 1, (1, 2)).int()).abs().max() <= 1


def test_warp_identity_and_output_size():
    img, _ = square_image()
    assert torch.equal(warp_affine(img, torch.eye(3, dtype=torch.float64)), img)
    out = warp_affine(img, scale_matrix(0.5, 0.5), size=(48, 64), interpolation="nearest")
    assert out.shape == (3, 48, 64)
    assert torch.equal(out, img[:, ::2, ::2])


def test_resize_sizes():
    assert resize_size((800, 1333), 800, 1333) == (800, 1333)
    assert resize_size((360, 480), 256, 427) == (256, 341)     # 480 * 256 / 360 = 341.3
    assert resize_size((100, 1000), 800, 1333) == (133, 1333)  # long side caps the scale
    assert resize_size((360, 480), 1200, 0) == (1200, 1600)    # max_size <= 0: no cap
    img, _ = square_image()
    out, m = resize(img, 72, 1000)
    assert out.shape == (3, 72, 96)
    torch.testing.assert_close(m, scale_matrix(0.75, 0.75))


def test_photometric_ops_levels():
    assert enhance_factor(5) == pytest.approx(1.0)
    assert enhance_factor(1) == pytest.approx(0.28) and enhance_factor(9) == pytest.approx(1.72)
    g = torch.Generator().manual_seed(1)
    img = torch.randint(0, 256, (3, 24, 32), generator=g, dtype=torch.uint8)
    for op in PHOTOMETRIC_OPS:
        for level in (1, 5, 9):
            out = op(img, level)
            assert out.dtype == torch.uint8 and out.shape == img.shape, op.__name__
    for op in PHOTOMETRIC_OPS[:4]:  # enhance ops: factor 1 at level 5 leaves the image
        assert (op(img, 5).int() - img.int()).abs().max() <= 1, op.__name__


def _px(*values) -> torch.Tensor:
    """A (3, 1, N) uint8 image of grey pixels of ``values``."""
    return torch.tensor(values, dtype=torch.uint8).view(1, 1, -1).repeat(3, 1, 1)


def test_photometric_levels_by_hand():
    from softteacher.data.transforms import autocontrast, brightness, color, contrast, posterize, solarize

    assert brightness(_px(100), 9)[0, 0].tolist() == [172]  # x 1.72
    assert brightness(_px(100), 1)[0, 0].tolist() == [28]  # x 0.28
    # contrast blends with the grey mean (100): 0.28 * v + 0.72 * 100
    assert contrast(_px(0, 200), 1)[0, 0].tolist() == pytest.approx([72, 128], abs=1)
    # saturation blends with the pixel's grey, 0.299 R + 0.587 G + 0.114 B = 76.2 for pure red
    red = torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1)
    assert color(red, 1).flatten().tolist() == pytest.approx([126.3, 54.9, 54.9], abs=1)
    # solarize inverts from int(256 - 25.6 * level): 230 at level 1, 25 at level 9
    assert solarize(_px(229, 230, 231), 1)[0, 0].tolist() == [229, 25, 24]
    assert solarize(_px(24, 25), 9)[0, 0].tolist() == [24, 230]
    assert solarize(_px(0, 255), 0)[0, 0].tolist() == [0, 255]  # level 0 (the config allows it): none
    # posterize keeps 8 - round(0.4 * level) bits: 4 at level 9, 8 at level 1
    assert posterize(_px(0b10110111), 9)[0, 0].tolist() == [0b10110000]
    assert posterize(_px(0b10110111), 1)[0, 0].tolist() == [0b10110111]
    # autocontrast stretches 50..150 to 0..255: 100 -> 127.5
    assert autocontrast(_px(50, 100, 150), 5)[0, 0].tolist() == pytest.approx([0, 127.5, 255], abs=1)


def test_random_erase_patches():
    aug = AugmentConfig(erase_count=(2, 4), erase_max_frac=0.2)
    img = torch.full((3, H, W), 7, dtype=torch.uint8)
    for seed in range(5):
        out, patches = random_erase(img, np.random.default_rng(seed), aug)
        assert 2 <= len(patches) <= 4
        side = patches[:, 2] - patches[:, 0]
        assert torch.equal(side, patches[:, 3] - patches[:, 1])  # square
        assert (side <= round(0.2 * H)).all()
        assert (patches[:, :2] >= 0).all() and (patches[:, 2] <= W).all() \
            and (patches[:, 3] <= H).all()
        changed = (out != img).any(0)
        inside = torch.zeros(H, W, dtype=torch.bool)
        for x0, y0, x1, y1 in patches.tolist():
            inside[y0:y1, x0:x1] = True
        assert not (changed & ~inside).any()
    assert torch.equal(erase(img, torch.zeros(0, 4, dtype=torch.long),
                             torch.zeros(0, 3, dtype=torch.uint8)), img)
    # one patch x 1..3, y 2..4 (end exclusive) filled with its colour, nothing else touched
    out = erase(img, torch.tensor([[1, 2, 4, 5]]), torch.tensor([[10, 20, 30]], dtype=torch.uint8))
    assert out[:, 2:5, 1:4].reshape(3, -1).T.tolist() == [[10, 20, 30]] * 9
    out[:, 2:5, 1:4] = 7
    assert torch.equal(out, img)
    # by default 1 to 4 patches, as the reference draws them, each count about equally often
    rng = np.random.default_rng(0)
    counts = np.bincount([len(random_erase(img, rng, AugmentConfig())[1]) for _ in range(400)], minlength=6)
    assert counts[0] == counts[5] == 0 and (counts[1:5] > 70).all(), counts


# Level 5 makes the enhance ops identities and keeps the square (value 100) under solarize's
# threshold; no erasing: so the strong view's pixels show its geometry alone.
GEOMETRY_ONLY = AugmentConfig(train_short_side=(72, 96), train_max_size=160, color_level=(5, 5),
                              erase_count=(0, 0))


def test_strong_pipeline_pixels_follow_matrices():
    img, box = square_image()
    kinds = set()
    for seed in range(12):
        weak, strong = unlabeled_views(img, np.random.default_rng(seed), GEOMETRY_ONLY)
        kinds.add(strong.ops[-2].split()[0])
        assert_box_matches_pixels(weak.image, transform_boxes(box, weak.matrix), 1.5)
        box_strong = transform_boxes(box, strong.matrix)
        assert_box_matches_pixels(strong.image, box_strong, 2.0)
        # the pseudo-label path: weak view -> strong view
        box_weak = transform_boxes(box, weak.matrix)
        mapped = map_boxes(box_weak, weak.matrix, strong.matrix, strong.size)
        # the weak view only scales and flips, so its box is exact and the two paths agree
        torch.testing.assert_close(mapped, box_strong, atol=1e-3, rtol=0)
        assert_box_matches_pixels(strong.image, mapped, 2.0)
    assert kinds == {"translate", "rotate", "shear_x", "shear_y"}


def test_views_are_reproducible_per_seed():
    g = torch.Generator().manual_seed(2)
    img = torch.randint(0, 256, (3, 60, 80), generator=g, dtype=torch.uint8)
    aug = AugmentConfig(train_short_side=(40, 70), train_max_size=100)

    def draw(seed):
        return unlabeled_views(img, np.random.default_rng([seed, 3, 7]), aug)

    (w1, s1), (w2, s2), (_, s3) = draw(0), draw(0), draw(1)
    for a, b in ((w1, w2), (s1, s2)):
        assert torch.equal(a.image, b.image) and torch.equal(a.matrix, b.matrix)
        assert a.ops == b.ops and a.size == b.size
    assert s1.ops != s3.ops or not torch.equal(s1.image, s3.image)
    boxes = torch.tensor([[5.0, 5.0, 30.0, 40.0]])
    v1, b1, k1 = labeled_view(img, boxes, np.random.default_rng(5), aug)
    v2, b2, k2 = labeled_view(img, boxes, np.random.default_rng(5), aug)
    assert torch.equal(v1.image, v2.image) and torch.equal(b1, b2) and torch.equal(k1, k2)
    with pytest.raises(TypeError):
        unlabeled_views(img, None, aug)


def test_same_or_independent_resize_and_flip():
    img, _ = square_image()
    aug = AugmentConfig(train_short_side=(40, 120), train_max_size=200)
    for seed in range(4):
        weak, strong = unlabeled_views(img, np.random.default_rng(seed), aug)
        assert strong.size == weak.size and strong.ops[:len(weak.ops)] == weak.ops
    indep = dataclasses.replace(aug, independent_views=True)
    sizes = [tuple(v.size for v in unlabeled_views(img, np.random.default_rng(s), indep))
             for s in range(4)]
    assert any(a != b for a, b in sizes)


def test_short_side_from_list():
    img, _ = square_image()
    aug = AugmentConfig(train_short_sides=(48, 64), train_max_size=1000, flip_prob=0.0)
    seen = {unlabeled_views(img, np.random.default_rng(s), aug)[0].size for s in range(8)}
    assert seen == {(48, 64), (64, 85)}


def test_labeled_view_drops_and_counts_tiny_boxes():
    img, _ = square_image()
    aug = AugmentConfig(train_short_side=(72, 72), train_max_size=1000, min_box_size=1.0)
    boxes = torch.tensor([[10.0, 10.0, 50.0, 50.0], [5.0, 5.0, 5.5, 40.0], [0.0, 0.0, 2.0, 2.0]])
    view, boxes_view, keep = labeled_view(img, boxes, np.random.default_rng(0), aug)
    assert view.size == (72, 96) and view.image.shape == (3, 72, 96)
    assert keep.tolist() == [True, False, True]  # 0.5 px * 0.75 = 0.375 px < 1
    # this draw (seed 0) resizes by 72 / 96 = 0.75 and does not flip: the boxes by hand
    torch.testing.assert_close(view.matrix, scale_matrix(0.75, 0.75))
    torch.testing.assert_close(boxes_view, torch.tensor([[7.5, 7.5, 37.5, 37.5], [0.0, 0.0, 1.5, 1.5]]))
    assert boxes_view.dtype == torch.float32
    _, none, keep0 = labeled_view(img, torch.zeros(0, 4), np.random.default_rng(0), aug)
    assert none.shape == (0, 4) and keep0.shape == (0,)


def test_boxes_into_view_clips_and_drops():
    img, _ = square_image()
    view = View(img, translate_matrix(100, 0), (H, W))
    boxes = torch.tensor([[0.0, 0.0, 20.0, 10.0], [40.0, 0.0, 60.0, 10.0]])
    out, keep = boxes_into_view(boxes, view, min_size=1.0)
    assert keep.tolist() == [True, False]
    assert out.tolist() == [[100.0, 0.0, 120.0, 10.0]]


def test_test_view_is_deterministic():
    img, _ = square_image()
    aug = AugmentConfig(test_short_side=48, test_max_size=60)
    a, b = make_test_view(img, aug), make_test_view(img, aug)
    assert a.size == (45, 60)  # 128 * 48 / 96 = 64 > 60: the long side caps it
    assert torch.equal(a.image, b.image) and torch.equal(a.matrix, b.matrix)
    torch.testing.assert_close(a.matrix, scale_matrix(60 / 128, 45 / 96))


@pytest.mark.gpu
def test_views_on_gpu_match_cpu():
    img, box = square_image()
    m = torch.tensor([[0.9, 0.2, 3.0], [-0.1, 1.1, -2.0], [0, 0, 1]], dtype=torch.float64)
    cpu = warp_affine(img, m)
    gpu = warp_affine(img.cuda(), m)
    assert gpu.device.type == "cuda" and (gpu.cpu().int() - cpu.int()).abs().max() <= 1
    weak, strong = unlabeled_views(img.cuda(), np.random.default_rng(0), AugmentConfig(
        train_short_side=(72, 96), train_max_size=160))
    assert weak.image.is_cuda and strong.image.is_cuda
    out = map_boxes(transform_boxes(box, weak.matrix).cuda(), weak.matrix, strong.matrix)
    assert out.is_cuda
