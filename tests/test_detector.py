"""``softteacher.Detector``: a checkpoint's model from Python, on paths, PIL images, arrays and
tensors alike, its boxes in the pixels of the image given."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import softteacher
from softteacher.checkpoint import FORMAT, CheckpointError, save_checkpoint
from softteacher.config import preset_tiny
from softteacher.data.records import CategoryMap, DatasetError
from softteacher.detector import Detector, as_image
from softteacher.model import build_detector
from softteacher.predict import predict

CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny detector of two classes (ids 3 and 7) that scores every box 0.2 for each class:
    a zero class weight and a background bias b with 1 / (e^b + 2) = 0.2."""
    cfg = preset_tiny()
    torch.manual_seed(0)
    state = build_detector(cfg.model, 2).state_dict()
    cls = "roi_heads.box_predictor.cls_score"
    state[f"{cls}.weight"] = torch.zeros_like(state[f"{cls}.weight"])
    state[f"{cls}.bias"] = torch.tensor([math.log(1 / 0.2 - 2), 0.0, 0.0])
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, {"format": FORMAT, "config": json.loads(json.dumps(cfg.to_dict())),
                           "categories": CATEGORIES, "report": "student", "student": state,
                           "teacher": None})
    return path


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photos") / "a.png"
    rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def test_the_package_names_the_detector():
    assert softteacher.Detector is Detector
    assert softteacher.Detections.__name__ == "Detections"
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        softteacher.Nope


def test_detections_carry_classes_scores_and_the_training_ids(checkpoint, photo):
    detector = Detector.load(checkpoint, score_thresh=0.1)
    assert detector.classes == ["cat", "dog"] and detector.which == "student"
    dets = detector(photo)
    assert len(dets) > 0
    assert dets.scores.tolist() == pytest.approx([0.2] * len(dets), abs=1e-5)
    assert dets.names == [["cat", "dog"][k - 1] for k in dets.labels.tolist()]
    assert dets.category_ids.tolist() == [[3, 7][k - 1] for k in dets.labels.tolist()]
    assert dets.boxes.dtype == torch.float32 and dets.boxes.shape == (len(dets), 4)
    assert (dets.boxes[:, 2:] >= dets.boxes[:, :2]).all()
    assert dets.boxes[:, [0, 2]].max() <= 64 and dets.boxes[:, [1, 3]].max() <= 48
    assert len(Detector.load(checkpoint, score_thresh=0.21)(photo)) == 0  # every box scores 0.2


def test_detections_come_best_first(tmp_path, photo):
    cfg = preset_tiny()
    torch.manual_seed(1)
    path = tmp_path / "untrained.pt"
    save_checkpoint(path, {"format": FORMAT, "config": json.loads(json.dumps(cfg.to_dict())),
                           "categories": CATEGORIES, "report": "student",
                           "student": build_detector(cfg.model, 2).state_dict(), "teacher": None})
    scores = Detector.load(path, score_thresh=0.01)(photo).scores
    assert len(scores) > 1 and len(set(scores.tolist())) > 1
    assert torch.equal(scores, scores.sort(descending=True).values)


def test_on_the_cpu_a_resnet_detects_in_nhwc_memory_unless_its_config_says_false(tmp_path, photo):
    cfg = preset_tiny()
    assert cfg.model.norm == "auto" and cfg.model.channels_last == "auto"  # GroupNorm: trains NCHW
    torch.manual_seed(1)
    state = build_detector(cfg.model, 2).state_dict()
    found = {}
    for layout in ("auto", "false"):
        cfg.model.channels_last = layout
        path = tmp_path / f"{layout}.pt"
        save_checkpoint(path, {"format": FORMAT, "config": json.loads(json.dumps(cfg.to_dict())),
                               "categories": CATEGORIES, "report": "student", "student": state,
                               "teacher": None})
        detector = Detector.load(path, device="cpu", score_thresh=0.01)
        conv = detector.model.backbone.body.conv1.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) == (layout == "auto")
        assert detector.model.channels_last == (layout == "auto")
        found[layout] = detector(photo)
    assert len(found["auto"]) == len(found["false"]) > 1  # the same detections, to float rounding
    torch.testing.assert_close(found["auto"].scores, found["false"].scores, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(found["auto"].boxes, found["false"].boxes, rtol=1e-4, atol=1e-3)


def test_boxes_are_mapped_from_the_view_to_the_image_given():
    # the tiny preset's test view of a 64 x 48 image is 149 x 112 (short side 112): x by 149 / 64,
    # y by 112 / 48; a box of the view [14.9, 11.2, 74.5, 56] is [6.4, 4.8, 32, 24] in the image
    seen = []

    class Fixed(torch.nn.Module):
        roi_heads = SimpleNamespace(score_thresh=0.05)

        def forward(self, images):
            seen.append(tuple(images[0].shape))
            return [SimpleNamespace(boxes=torch.tensor([[14.9, 11.2, 74.5, 56.0], [0, 0, 149, 112]]),
                                    scores=torch.tensor([0.9, 0.4]), labels=torch.tensor([2, 1]))]

    cats = CategoryMap.from_coco(CATEGORIES)
    detector = Detector(Fixed(), preset_tiny(), cats, "teacher", torch.device("cpu"), 0.3)
    dets = detector(torch.zeros(3, 48, 64, dtype=torch.uint8))
    assert seen == [(3, 112, 149)]
    assert dets.boxes.tolist() == [pytest.approx([6.4, 4.8, 32.0, 24.0], abs=1e-4),
                                   pytest.approx([0.0, 0.0, 64.0, 48.0], abs=1e-4)]
    assert dets.names == ["dog", "cat"] and dets.category_ids.tolist() == [7, 3]
    assert len(Detector(Fixed(), preset_tiny(), cats, "teacher", torch.device("cpu"), 0.5)(
        torch.zeros(3, 48, 64, dtype=torch.uint8))) == 1
    assert detector.to_coco(dets, 5)[0] == {"image_id": 5, "category_id": 7,
                                             "bbox": [6.4, 4.8, 25.6, 19.2], "score": 0.9}


def test_a_path_a_pil_image_an_array_and_tensors_give_the_same_detections(checkpoint, photo):
    detector = Detector.load(checkpoint, score_thresh=0.1)
    rgb = np.array(Image.open(photo).convert("RGB"))
    pixels = torch.from_numpy(rgb).permute(2, 0, 1)
    inputs = [str(photo), photo, Image.open(photo), rgb, pixels, pixels.float() / 255]
    first, *rest = detector.predict(inputs)
    for dets in rest:
        assert torch.equal(dets.boxes, first.boxes) and torch.equal(dets.labels, first.labels)
        assert torch.equal(dets.scores, first.scores)


def test_predict_writes_what_the_detector_gives(checkpoint, photo, tmp_path):
    detector = Detector.load(checkpoint, score_thresh=0.1)
    predict(str(checkpoint), [str(photo)], str(tmp_path / "out"), score_thresh=0.1)
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written and written == detector.to_coco(detector(photo), 1)


def test_a_path_is_turned_upright_and_an_image_in_memory_is_taken_as_it_is(checkpoint, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    path = tmp_path / "phone.jpg"
    Image.fromarray(np.zeros((20, 40, 3), dtype=np.uint8)).save(path, exif=exif)
    detector = Detector.load(checkpoint, score_thresh=1.0)
    assert detector.draw(path).size == (20, 40)  # width x height, as a viewer shows it
    assert detector.draw(Image.open(path)).size == (40, 20)  # the pixels as stored
    assert as_image(path).shape == (3, 40, 20)


def test_gray_images_become_rgb():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert torch.equal(as_image(gray), torch.from_numpy(gray).expand(3, 3, 4))
    assert torch.equal(as_image(Image.fromarray(gray)), torch.from_numpy(gray).expand(3, 3, 4))


@pytest.mark.parametrize("image, error, match", [
    (np.zeros((4, 4, 3), dtype=np.float32), ValueError, "uint8 array.*float32; a float array's scale"),
    (np.zeros((4, 4, 3), dtype=np.uint16), ValueError, "uint16; more than 8 bits per channel"),
    (np.zeros((4, 4, 3), dtype=bool), ValueError, "got bool; convert to uint8"),
    (np.zeros((0, 0, 3), dtype=np.uint8), ValueError, r"shape \(0, 0, 3\) has no pixels"),
    (torch.zeros(3, 0, 5), ValueError, r"shape \(3, 0, 5\) has no pixels"),
    (np.zeros((4, 4, 4), dtype=np.uint8), ValueError, r"\(4, 4, 4\)"),
    (torch.full((3, 4, 4), 2.0), ValueError, r"\[0, 1\].*got \[2, 2\]"),
    (torch.zeros(4, 4, 3, dtype=torch.uint8), ValueError, r"\(3, H, W\)"),
    (torch.zeros(3, 4, 4, dtype=torch.int32), ValueError, "int32"),
    (Image.new("I;16", (4, 4)), ValueError, "more than 8 bits"),
    ([[0, 1]], TypeError, "list"),
])
def test_inputs_it_cannot_read_are_refused_with_what_they_are(image, error, match):
    with pytest.raises(error, match=match):
        as_image(image)


def test_predict_refuses_one_image_and_takes_a_batch_tensor(checkpoint, photo):
    detector = Detector.load(checkpoint, score_thresh=0.1)
    pixels = as_image(photo)
    for one in (str(photo), photo, Image.open(photo), pixels.permute(1, 2, 0).numpy(), pixels):
        with pytest.raises(TypeError, match="call the detector on one image"):
            detector.predict(one)
    both = detector.predict(torch.stack([pixels, pixels.flip(-1)]))
    assert len(both) == 2 and torch.equal(both[0].boxes, detector(pixels).boxes)
    assert torch.equal(both[1].boxes, detector(pixels.flip(-1)).boxes)


def test_a_missing_file_is_named(checkpoint, tmp_path):
    with pytest.raises(DatasetError, match="nothere.jpg"):
        Detector.load(checkpoint)(tmp_path / "nothere.jpg")


def test_load_refuses_what_it_cannot_build_and_takes_the_gpu_when_there_is_one(checkpoint):
    with pytest.raises(CheckpointError, match="no teacher weights"):
        Detector.load(checkpoint, model="teacher")
    with pytest.raises(ValueError, match="1.5"):
        Detector.load(checkpoint, score_thresh=1.5)
    with pytest.raises(ValueError, match="'gpu7'"):
        Detector.load(checkpoint, device="gpu7")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert Detector.load(checkpoint).device.type == expected
    assert next(Detector.load(checkpoint).model.parameters()).device.type == expected


def test_batches_give_each_image_its_own_detections_in_order(checkpoint, photo):
    # one batch pads its views to the largest: the largest image's detections are the same as
    # alone, wherever it stands; images of one size are padded alike and detected alike
    detector = Detector.load(checkpoint, score_thresh=0.05)
    pixels = as_image(photo)
    small = pixels[:, : pixels.shape[1] // 2, : pixels.shape[2] // 2].contiguous()
    alone = [detector(im) for im in (small, pixels, pixels.flip(-1))]
    assert len(alone[1]) > 0 and len(alone[2]) > 0
    for size in (2, 3):
        batched = detector.predict([small, pixels, pixels.flip(-1)], batch_size=size)
        assert len(batched) == 3
        for got, want in zip(batched[1:], alone[1:]):
            torch.testing.assert_close(got.boxes, want.boxes, atol=1e-3, rtol=0)
            torch.testing.assert_close(got.scores, want.scores, atol=1e-4, rtol=0)
            assert torch.equal(got.labels, want.labels)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="expected a whole number of at least 1"):
            detector.predict([pixels], batch_size=bad)
