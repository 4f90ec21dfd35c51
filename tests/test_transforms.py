"""Batched eval/train transforms: normalisation, resize + centre crop, random crops and flips."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vitplasticity import transforms

CPU = torch.device("cpu")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics, as torchvision publishes them


def _constant(count, height, width, rgb=(51, 102, 204)):
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (count, height, width, 3)).copy()


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def test_eval_transform_of_a_constant_image_is_the_normalised_constant():
    out = transforms.eval_batch(_constant(2, 24, 40), 16, CPU)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
    for channel, value in enumerate((51, 102, 204)):
        expected = (value / 255 - MEAN[channel]) / STD[channel]
        torch.testing.assert_close(out[:, channel], torch.full((2, 16, 16), expected), rtol=0, atol=1e-5)


def test_eval_transform_with_custom_mean_std():
    out = transforms.eval_batch(_constant(1, 8, 8, (255, 0, 127)), 8, CPU, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 1.0))
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([1.0, -2.0, 127 / 255 - 0.5]))


def test_to_tensor_layout_and_range():
    images = np.zeros((1, 2, 3, 3), dtype=np.uint8)
    images[0, 1, 2] = (255, 0, 51)
    batch = transforms.to_tensor(images, CPU)
    assert batch.shape == (1, 3, 2, 3)
    assert batch[0, :, 1, 2].tolist() == pytest.approx([1.0, 0.0, 0.2])
    assert batch.sum().item() == pytest.approx(1.2)


@pytest.mark.parametrize(("height", "width"), [(20, 30), (30, 20), (16, 16), (64, 48), (9, 12)])
def test_resize_center_crop_shape(height, width):
    assert transforms.resize_center_crop(torch.rand(2, 3, height, width), 16).shape == (2, 3, 16, 16)


@pytest.mark.parametrize(("height", "width"), [(20, 30), (30, 20), (64, 48), (9, 12), (100, 100)])
def test_resize_center_crop_matches_torch_antialiased_interpolate(height, width):
    batch = torch.rand(2, 3, height, width, generator=_generator(0))
    scale = 16 / min(height, width)
    new_h, new_w = max(16, round(height * scale)), max(16, round(width * scale))
    resized = F.interpolate(batch, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - 16) // 2, (new_w - 16) // 2
    expected = resized[..., top : top + 16, left : left + 16]
    torch.testing.assert_close(transforms.resize_center_crop(batch, 16), expected, rtol=0, atol=1e-5)


def test_resize_center_crop_keeps_the_centre():
    """16 x 32 to 16: the shorter side already fits, so it only crops columns 8..23."""
    batch = torch.arange(32.0).expand(1, 3, 16, 32).clone()
    out = transforms.resize_center_crop(batch, 16)
    torch.testing.assert_close(out[0, 0, 0], torch.arange(8.0, 24.0))


def test_resize_center_crop_same_size_is_identity():
    batch = torch.rand(2, 3, 16, 16)
    assert torch.equal(transforms.resize_center_crop(batch, 16), batch)


def test_random_crop_flip_deterministic_for_a_seed():
    batch = torch.rand(4, 3, 20, 24)
    first = transforms.random_resized_crop_flip(batch, 16, _generator(3))
    again = transforms.random_resized_crop_flip(batch, 16, _generator(3))
    other = transforms.random_resized_crop_flip(batch, 16, _generator(4))
    assert first.shape == (4, 3, 16, 16)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_crop_boxes_stay_inside_the_image():
    for height, width in ((32, 32), (20, 50), (50, 20), (3, 3)):
        boxes = transforms.sample_crop_boxes(2000, height, width, _generator(0))
        x1, y1, x2, y2 = boxes.unbind(1)
        assert (x1 >= 0).all() and (y1 >= 0).all()
        assert (x2 <= width).all() and (y2 <= height).all()
        assert (x2 > x1).all() and (y2 > y1).all()
        assert torch.equal(boxes, boxes.round())  # whole pixels, as torchvision


def test_crop_boxes_follow_scale_and_ratio():
    boxes = transforms.sample_crop_boxes(4000, 100, 100, _generator(1))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    area = w * h / 10000
    assert area.min() >= 0.07 and area.max() <= 1.0
    aspect = w / h
    assert aspect.min() >= 0.6 and aspect.max() <= 1.6  # small crops: whole-pixel rounding widens the range
    large = (w >= 50) & (h >= 50)
    assert aspect[large].min() >= 0.74 and aspect[large].max() <= 1.35
    assert area.mean() > 0.3  # uniform in [0.08, 1] (less the rejected draws)


def test_crop_boxes_full_image_when_scale_and_ratio_are_one():
    boxes = transforms.sample_crop_boxes(5, 16, 16, _generator(0), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert boxes.tolist() == [[0.0, 0.0, 16.0, 16.0]] * 5


def test_crop_boxes_fallback_is_the_centred_image_clamped_to_the_ratio():
    # No draw can fit (crops larger than the image): torchvision's fallback, the whole image clamped to
    # the ratio range and centred. A 10 x 40 (h x w) image is wider than 4/3: round(10 * 4/3) = 13 columns.
    boxes = transforms.sample_crop_boxes(3, 10, 40, _generator(0), scale=(2.0, 3.0))
    assert boxes.tolist() == [[13.0, 0.0, 26.0, 10.0]] * 3


def test_flip_flips():
    """A left-to-right ramp stays increasing in the crops that are not flipped, and decreases in those that are."""
    count = 64
    batch = torch.linspace(0, 1, 32).expand(count, 3, 32, 32).clone()
    out = transforms.random_resized_crop_flip(batch, 16, _generator(5))
    replay = _generator(5)
    transforms.sample_crop_boxes(count, 32, 32, replay)
    flips = torch.rand(count, generator=replay) < 0.5
    slope = out[:, 0, :, -1].mean(1) - out[:, 0, :, 0].mean(1)
    assert 0 < flips.sum() < count
    assert torch.equal(slope < 0, flips)
    # A flipped crop is the mirror image of the same crop unflipped: its columns are a permutation of a ramp.
    assert (slope.abs() > 0).all()


def test_train_transform_of_a_constant_image_is_the_normalised_constant():
    out = transforms.train_batch(_constant(8, 24, 24), 16, CPU, _generator(0))
    assert out.shape == (8, 3, 16, 16)
    for channel, value in enumerate((51, 102, 204)):
        expected = (value / 255 - MEAN[channel]) / STD[channel]
        torch.testing.assert_close(out[:, channel], torch.full((8, 16, 16), expected), rtol=0, atol=1e-5)


def test_crop_takes_the_pixels_of_its_box(monkeypatch):
    """On an image linear in x and y, bilinear sampling of an interior whole-pixel box the size of the output
    returns exactly the box's pixels (flipped when its flip is drawn)."""
    ramp = torch.arange(24.0)[None, :] + 100.0 * torch.arange(24.0)[:, None]  # value = x + 100 y
    batch = ramp.expand(3, 3, 24, 24).clone()
    boxes = torch.tensor([[4.0, 4.0, 12.0, 12.0], [12.0, 6.0, 20.0, 14.0], [8.0, 12.0, 16.0, 20.0]])
    monkeypatch.setattr(transforms, "sample_crop_boxes", lambda count, height, width, generator, **options: boxes)
    out = transforms.random_resized_crop_flip(batch, 8, _generator(2))
    flips = torch.rand(3, generator=_generator(2)) < 0.5
    assert 0 < flips.sum() < 3
    for i, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
        crop = batch[i, :, y1:y2, x1:x2]
        torch.testing.assert_close(out[i], crop.flip(-1) if flips[i] else crop, rtol=0, atol=1e-3)


def test_train_batch_with_whole_batch_draws_is_split_invariant():
    """Draws made once for a batch give the same images however the batch is cut into micro-batches."""
    images = np.random.default_rng(1).integers(0, 256, (10, 20, 20, 3), dtype=np.uint8)
    whole = transforms.train_batch(images, 16, CPU, _generator(9))
    draws = transforms.sample_crop_flip(10, 20, 20, _generator(9))
    parts = [transforms.train_batch(images[a:b], 16, CPU, None, draws=(draws[0][a:b], draws[1][a:b]))
             for a, b in ((0, 3), (3, 7), (7, 10))]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=1e-6)


def _interpolated_crops(batch, size, boxes, flips):
    """Each crop resized on its own by torch's antialiased bilinear interpolate, and flipped where drawn."""
    out = []
    for image, (x1, y1, x2, y2), flip in zip(batch, boxes.long().tolist(), flips.tolist(), strict=True):
        crop = F.interpolate(image[None, :, y1:y2, x1:x2], size=(size, size), mode="bilinear", antialias=True,
                             align_corners=False)[0]
        out.append(crop.flip(-1) if flip else crop)
    return torch.stack(out)


@pytest.mark.parametrize(("height", "width", "size"), [(12, 12, 32), (40, 40, 16), (20, 36, 24), (36, 20, 24)])
def test_crop_flip_matches_torch_antialiased_interpolate_of_each_crop(height, width, size):
    """Upsampling (two taps per output pixel), downsampling (wider filters) and non-square sources."""
    batch = torch.rand(64, 3, height, width, generator=_generator(0))
    boxes, flips = transforms.sample_crop_flip(64, height, width, _generator(1))
    out = transforms.crop_flip(batch, size, boxes, flips)
    torch.testing.assert_close(out, _interpolated_crops(batch, size, boxes, flips), rtol=0, atol=1e-5)


def test_train_batch_matches_the_per_sample_pil_pipeline_within_one_level():
    """PIL's crop + bilinear resize + flip of the same boxes; PIL rounds to uint8 after each axis."""
    images = np.random.default_rng(3).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    boxes, flips = transforms.sample_crop_flip(16, 32, 32, _generator(4))
    out = transforms.train_batch(images, 48, CPU, None, draws=(boxes, flips))
    expected = []
    for image, box, flip in zip(images, boxes.long().tolist(), flips.tolist(), strict=True):
        crop = Image.fromarray(image).crop(box).resize((48, 48), Image.BILINEAR)
        expected.append(np.asarray(crop.transpose(Image.FLIP_LEFT_RIGHT) if flip else crop))
    pixels = torch.from_numpy(np.stack(expected)).permute(0, 3, 1, 2).float() / 255
    expected = (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    level = 1 / 255 / min(STD)
    assert (out - expected).abs().max() <= level + 1e-5
    assert (out - expected).abs().mean() < level / 2
