"""Matrices and box mapping against hand-computed values."""

import math

import pytest
import torch

from softteacher.geometry import (
    box_corners,
    clip_boxes,
    filter_boxes,
    hflip_matrix,
    identity_matrix,
    keep_mask,
    map_boxes,
    map_boxes_batch,
    relative_matrix,
    rotate_matrix,
    scale_matrix,
    shear_matrix,
    transform_boxes,
    transform_points,
    translate_matrix,
)

BOX = torch.tensor([[10.0, 20.0, 30.0, 40.0]])


def test_hflip_of_100px_image():
    out = transform_boxes(BOX, hflip_matrix(100))
    assert out.tolist() == [[70.0, 20.0, 90.0, 40.0]]
    # flipping twice is the identity
    assert torch.equal(hflip_matrix(100) @ hflip_matrix(100), identity_matrix())


def test_rotate_90_about_centre():
    # corners relative to (50, 50): (-40,-30) (-20,-30) (-40,-10) (-20,-10)
    # x' = 50 + (y - 50), y' = 50 - (x - 50):  (20,90) (20,70) (40,90) (40,70)
    out = transform_boxes(BOX, rotate_matrix(90, (50, 50)))
    torch.testing.assert_close(out, torch.tensor([[20.0, 70.0, 40.0, 90.0]]))
    # a point right of the centre moves up on screen (counter-clockwise as displayed)
    p = transform_points(torch.tensor([[60.0, 50.0]]), rotate_matrix(90, (50, 50)))
    torch.testing.assert_close(p, torch.tensor([[50.0, 40.0]]))


def test_rotate_45_square_becomes_diamond_box():
    # corners of [40,40,60,60] are 10*sqrt(2) from (50,50) along the diagonals; after 45 deg
    # they lie on the axes, so the enclosing box is 50 -/+ 14.1421.
    out = transform_boxes(torch.tensor([[40.0, 40.0, 60.0, 60.0]]), rotate_matrix(45, (50, 50)))
    r = 10 * math.sqrt(2)
    torch.testing.assert_close(out, torch.tensor([[50 - r, 50 - r, 50 + r, 50 + r]]))


def test_shear_by_hand():
    # x' = x + tan(45)(y - 50): top edge (y=20) shifts -30, bottom (y=40) shifts -10
    out = transform_boxes(BOX, shear_matrix(45, 0, (50, 50)))
    torch.testing.assert_close(out, torch.tensor([[-20.0, 20.0, 20.0, 40.0]]))
    # y' = y + tan(45)(x - 50): left edge (x=10) shifts -40, right (x=30) shifts -20
    out = transform_boxes(BOX, shear_matrix(0, 45, (50, 50)))
    torch.testing.assert_close(out, torch.tensor([[10.0, -20.0, 30.0, 20.0]]))


def test_composition_order():
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    s, t = scale_matrix(2, 2), translate_matrix(10, 0)
    # scale then translate: [0,0,20,20] + (10,0)
    assert transform_boxes(box, t @ s).tolist() == [[10.0, 0.0, 30.0, 20.0]]
    # translate then scale: [10,0,20,10] * 2
    assert transform_boxes(box, s @ t).tolist() == [[20.0, 0.0, 40.0, 20.0]]


def test_scale_and_translate_values():
    out = transform_boxes(BOX, scale_matrix(0.5, 2.0))
    assert out.tolist() == [[5.0, 40.0, 15.0, 80.0]]
    out = transform_boxes(BOX, translate_matrix(-5, 7))
    assert out.tolist() == [[5.0, 27.0, 25.0, 47.0]]


def test_map_boxes_is_mb_times_ma_inverse():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(6, 2, generator=g) * 300
    boxes = torch.cat([xy, xy + 5 + torch.rand(6, 2, generator=g) * 100], 1)
    ma = translate_matrix(13, -4) @ hflip_matrix(640) @ scale_matrix(0.8, 0.8)
    mb = rotate_matrix(17, (200, 150)) @ scale_matrix(1.3, 1.25)
    expected = transform_boxes(boxes, mb @ torch.linalg.inv(ma))
    torch.testing.assert_close(map_boxes(boxes, ma, mb), expected)
    torch.testing.assert_close(relative_matrix(ma, mb), mb @ torch.linalg.inv(ma))
    # by hand: the corners through the matrix in float64
    corners = box_corners(boxes.double())
    m = mb @ torch.linalg.inv(ma)
    pts = corners @ m[:2, :2].T + m[:2, 2]
    by_hand = torch.cat([pts.amin(1), pts.amax(1)], 1).float()
    torch.testing.assert_close(map_boxes(boxes, ma, mb), by_hand)


def test_map_boxes_clips_to_size_b():
    ma, mb = identity_matrix(), translate_matrix(50, 0)
    out = map_boxes(torch.tensor([[10.0, 10.0, 80.0, 30.0]]), ma, mb, size_b=(40, 100))
    assert out.tolist() == [[60.0, 10.0, 100.0, 30.0]]


@pytest.mark.parametrize("kind", ["translate", "scale", "flip"])
def test_weak_strong_weak_round_trip(kind):
    weak = hflip_matrix(1333) @ scale_matrix(1200 / 800, 1200 / 800)
    extra = {"translate": translate_matrix(-133.0, 80.0),
             "scale": scale_matrix(0.731, 1.117),
             "flip": hflip_matrix(2000)}[kind]
    strong = extra @ weak
    boxes = torch.tensor([[10.25, 20.5, 1190.0, 777.75], [300.0, 0.0, 301.0, 1.0]])
    # strong . weak^-1 is the extra op alone: the strong view's boxes by hand
    by_hand = {"translate": [[-122.75, 100.5, 1057.0, 857.75], [167.0, 80.0, 168.0, 81.0]],
               "scale": [[10.25 * 0.731, 20.5 * 1.117, 1190.0 * 0.731, 777.75 * 1.117],
                         [300.0 * 0.731, 0.0, 301.0 * 0.731, 1.117]],
               "flip": [[810.0, 20.5, 1989.75, 777.75], [1699.0, 0.0, 1700.0, 1.0]]}[kind]
    in_strong = map_boxes(boxes, weak, strong)
    torch.testing.assert_close(in_strong, torch.tensor(by_hand), atol=1e-3, rtol=0)
    back = map_boxes(in_strong, strong, weak)
    assert (back - boxes).abs().max().item() < 1e-4


def test_dtype_and_device_follow_boxes():
    m = scale_matrix(2, 2).float()
    assert transform_boxes(BOX, m).dtype == torch.float32
    assert transform_boxes(BOX.double(), m).dtype == torch.float64
    assert transform_boxes(BOX.long(), m).dtype == torch.float32
    assert map_boxes(BOX.half(), identity_matrix(), m).dtype == torch.float16


def test_empty_boxes():
    empty = torch.zeros(0, 4)
    assert transform_boxes(empty, rotate_matrix(30, (5, 5))).shape == (0, 4)
    assert transform_boxes(empty, torch.zeros(0, 3, 3)).shape == (0, 4)
    assert map_boxes(empty, identity_matrix(), hflip_matrix(10), (5, 10)).shape == (0, 4)
    assert clip_boxes(empty, (5, 5)).shape == (0, 4)
    kept, keep = filter_boxes(empty)
    assert kept.shape == (0, 4) and keep.shape == (0,) and keep.dtype == torch.bool
    assert map_boxes_batch([], [], []) == []
    assert map_boxes_batch([empty], [identity_matrix()], [scale_matrix(2, 2)])[0].shape == (0, 4)


def test_batched_matrices_per_box():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 5.0, 5.0], [1.0, 2.0, 3.0, 4.0]])
    mats = torch.stack([hflip_matrix(100), scale_matrix(2, 3), rotate_matrix(90, (50, 50))])
    out = transform_boxes(boxes, mats)
    for i in range(3):
        torch.testing.assert_close(out[i:i + 1], transform_boxes(boxes[i:i + 1], mats[i]))
    assert out[0].tolist() == [70.0, 20.0, 90.0, 40.0]
    assert out[1].tolist() == [0.0, 0.0, 10.0, 15.0]
    with pytest.raises(ValueError):
        transform_boxes(boxes, mats[:2])


def test_map_boxes_batch_matches_single():
    boxes = [BOX, torch.tensor([[1.0, 1.0, 9.0, 9.0], [2.0, 3.0, 4.0, 5.0]]), torch.zeros(0, 4)]
    ma = [scale_matrix(2, 2), hflip_matrix(10), identity_matrix()]
    mb = [translate_matrix(3, 4), rotate_matrix(30, (5, 5)), scale_matrix(3, 3)]
    sizes = [(50, 60), (10, 10), (7, 7)]
    for as_tensor in (False, True):
        a = torch.stack(ma) if as_tensor else ma
        b = torch.stack(mb) if as_tensor else mb
        out = map_boxes_batch(boxes, a, b, sizes)
        for o, bx, x, y, s in zip(out, boxes, ma, mb, sizes):
            torch.testing.assert_close(o, map_boxes(bx, x, y, s))
    # the ellipse rule as map_boxes takes it: through the 30-degree rotation, tighter than corners
    ellipse = map_boxes_batch(boxes, ma, mb, sizes, mode="ellipse")
    torch.testing.assert_close(ellipse[1], map_boxes(boxes[1], ma[1], mb[1], sizes[1], mode="ellipse"))
    assert (ellipse[1][:, 2:] - ellipse[1][:, :2]).prod(1).lt((out[1][:, 2:] - out[1][:, :2]).prod(1)).all()


def test_clip_and_keep_mask_at_edges():
    boxes = torch.tensor([[-5.0, -5.0, 5.0, 5.0],     # partly outside: clipped, kept
                          [20.0, 0.0, 30.0, 5.0],     # fully right of a 10-px image: width 0
                          [2.0, 2.0, 3.0, 3.0],       # exactly 1 px: kept at min_size 1
                          [2.0, 2.0, 2.5, 8.0]])      # 0.5 px wide: dropped at min_size 1
    clipped = clip_boxes(boxes, (10, 10))
    assert clipped.tolist() == [[0.0, 0.0, 5.0, 5.0], [10.0, 0.0, 10.0, 5.0],
                                [2.0, 2.0, 3.0, 3.0], [2.0, 2.0, 2.5, 8.0]]
    assert keep_mask(clipped, 1.0).tolist() == [True, False, True, False]
    # min_size 0 still drops zero-area boxes (torchvision rejects them as targets)
    assert keep_mask(clipped, 0.0).tolist() == [True, False, True, True]
    kept, keep = filter_boxes(clipped, 1.0)
    assert kept.shape == (2, 4) and int((~keep).sum()) == 2


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        transform_boxes(torch.zeros(4), identity_matrix())
    with pytest.raises(ValueError):
        transform_boxes(BOX, torch.eye(2))
    with pytest.raises(ValueError):
        map_boxes(BOX, torch.stack([identity_matrix()] * 1), identity_matrix())


@pytest.mark.gpu
def test_gpu_boxes_with_cpu_matrices():
    boxes = BOX.cuda()
    out = map_boxes(boxes, scale_matrix(2, 2), hflip_matrix(100), (100, 100))
    assert out.device.type == "cuda" and out.dtype == torch.float32
    assert out.cpu().tolist() == [[85.0, 10.0, 95.0, 20.0]]
    mats = torch.stack([hflip_matrix(100)]).cuda()
    assert transform_boxes(boxes, mats).cpu().tolist() == [[70.0, 20.0, 90.0, 40.0]]
    out = map_boxes_batch([boxes], mats, [identity_matrix()], [(100, 100)])
    assert out[0].cpu().tolist() == [[70.0, 20.0, 90.0, 40.0]]


def test_ellipse_mapping_by_hand():
    square = torch.tensor([[-1.0, -1.0, 1.0, 1.0]])
    # the inscribed disc keeps its box under any rotation; the corners grow to sqrt(2) at 45
    torch.testing.assert_close(transform_boxes(square, rotate_matrix(45, (0, 0)), "ellipse"), square)
    r = math.sqrt(2.0)
    torch.testing.assert_close(transform_boxes(square, rotate_matrix(45, (0, 0))),
                               torch.tensor([[-r, -r, r, r]]))
    # [0, 0, 4, 2] rotated by 45 about the origin: centre (2, 1) -> (c*2 - s*1, s*2 + c*1) with
    # c = s = 1/sqrt(2), whichever way the matrix turns; half extents sqrt((2c)^2 + (1s)^2) =
    # sqrt(2.5) on both axes
    box = torch.tensor([[0.0, 0.0, 4.0, 2.0]])
    m = rotate_matrix(45, (0, 0))
    centre = transform_points(torch.tensor([[2.0, 1.0]]), m)[0]
    half = math.sqrt(2.5)
    expected = torch.stack([centre - half, centre + half]).reshape(1, 4)
    torch.testing.assert_close(transform_boxes(box, m, "ellipse"), expected)
    # shear x by tan = 0.5 of the unit square: x half extent sqrt(1 + 0.25), y unchanged;
    # the corners give 1.5
    sh = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    h = math.sqrt(1.25)
    torch.testing.assert_close(transform_boxes(square, sh, "ellipse"), torch.tensor([[-h, -1.0, h, 1.0]]))
    torch.testing.assert_close(transform_boxes(square, sh), torch.tensor([[-1.5, -1.0, 1.5, 1.0]]))


def test_ellipse_equals_corners_for_scale_flip_translate():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(20, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 1 + torch.rand(20, 2, generator=g) * 50], dim=1)
    m = translate_matrix(7.5, -3.0) @ hflip_matrix(200) @ scale_matrix(0.6, 1.7)
    torch.testing.assert_close(transform_boxes(boxes, m, "ellipse"), transform_boxes(boxes, m))
    # per-box matrices, integer boxes, the empty case and map_boxes take the mode too
    per_box = torch.stack([scale_matrix(1.0 + i, 2.0) for i in range(3)])
    int_boxes = torch.tensor([[0, 0, 2, 2], [1, 1, 3, 5], [2, 0, 4, 4]])
    out = transform_boxes(int_boxes, per_box, "ellipse")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, transform_boxes(int_boxes, per_box))
    assert transform_boxes(torch.zeros(0, 4), m, "ellipse").shape == (0, 4)
    rot = rotate_matrix(30, (50, 50))
    torch.testing.assert_close(map_boxes(boxes, identity_matrix(), rot, mode="ellipse"),
                               transform_boxes(boxes, rot, "ellipse"))
    with pytest.raises(ValueError, match="mode"):
        transform_boxes(boxes, m, "hull")
