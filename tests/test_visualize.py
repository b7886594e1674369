"""Overlay pictures (openseed.visualize): what each pixel becomes."""

import numpy as np

from openseed.visualize import colour, draw_overlay, grid


def _scene():
    image = np.full((20, 30, 3), 100, np.uint8)
    masks = np.zeros((2, 20, 30), bool)
    masks[0, 2:10, 2:10] = True
    masks[1, 5:15, 5:15] = True
    return image, masks


def test_masks_blend_in_order_and_ignore_is_greyed():
    image, masks = _scene()
    ignore = np.zeros((20, 30), bool)
    ignore[18:] = True
    picture = np.asarray(draw_overlay(image, masks, ignore=ignore, alpha=0.5))
    first, second = np.array(colour(0)), np.array(colour(1))
    assert np.abs(picture[3, 3] - (100 * 0.5 + first * 0.5)).max() <= 0.5
    # the overlap blends the second colour over the first (not blacked out)
    assert np.abs(picture[7, 7] - ((100 * 0.5 + first * 0.5) * 0.5 + second * 0.5)).max() <= 1
    assert np.abs(picture[12, 12] - (100 * 0.5 + second * 0.5)).max() <= 0.5
    assert (picture[19, 20] == [120, 120, 120]).all() and (picture[0, 29] == 100).all()


def test_boxes_outline_the_exclusive_max_pixel_box():
    image, _ = _scene()
    picture = np.asarray(draw_overlay(image, boxes=np.array([[2.0, 3.0, 12.0, 9.0]])))
    edge = np.array(colour(0))
    assert (picture[3, 2] == edge).all() and (picture[8, 11] == edge).all()  # inclusive corners (x1 - 1, y1 - 1)
    assert (picture[9, 12] == 100).all() and (picture[6, 6] == 100).all()  # outside, and inside the outline


def test_labels_are_written_and_grid_tiles_pictures():
    image, masks = _scene()
    plain = np.asarray(draw_overlay(image, masks))
    labelled = np.asarray(draw_overlay(image, masks, labels=["a", "b"]))
    changed = (labelled != plain).any(axis=-1)
    assert changed[:12, :12].any() and not changed[16:].any()  # near the masks' first pixels only
    # white text (anti-aliased): every changed pixel got brighter
    assert (labelled[changed].astype(int).sum(-1) > plain[changed].astype(int).sum(-1)).all()
    sheet = grid([draw_overlay(image)] * 3, columns=2)
    assert sheet.size == (60, 40)
