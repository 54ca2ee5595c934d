"""train/expert_load.py: imbalance figures against numpy, the expert-load picture (decoded by a PNG
reader written here, sampled at each cell) against counts whose colours are known, its size at 16
experts x 32 layers and at 128 experts, and the summaries read back by TensorBoard's own reader.
The trainer's end-to-end run (images per logging window, descriptions, dropped fractions) is in
tests/test_trainer.py."""
import struct
import zlib

import numpy as np
import pytest
import torch

from train.expert_load import (DESCRIPTIONS, image_summary, load_image, load_stats, map_geometry,
                               png_bytes, scalar_summary)


def decode_png(data: bytes) -> np.ndarray:
    """A minimal PNG reader (8-bit RGB, no interlace, any of the five row filters): [H, W, 3]."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body)
        header = body if kind == b"IHDR" else header
        idat += body if kind == b"IDAT" else b""
        pos += 12 + length
    w, h, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert (depth, color, interlace) == (8, 2, 0)
    raw, stride = zlib.decompress(idat), 3 * w
    out, prev = np.zeros((h, stride), np.int64), np.zeros(stride, np.int64)
    for y in range(h):
        start = y * (stride + 1)
        kind, row = raw[start], np.frombuffer(raw, np.uint8, stride, start + 1).astype(np.int64)
        if kind == 0:  # no filter: the row as it is
            out[y], prev = row, row
            continue
        for x in range(stride):
            a, b = (out[y, x - 3] if x >= 3 else 0), prev[x]
            c = prev[x - 3] if x >= 3 else 0
            pred = [0, a, b, (a + b) // 2, _paeth(a, b, c)][kind]
            out[y, x] = (row[x] + pred) % 256
        prev = out[y]
    return out.reshape(h, w, 3).astype(np.uint8)


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def cell_colors(img: np.ndarray, layers: list[int], n_experts: int) -> np.ndarray:
    """The colour at the centre of every (layer, expert) cell: [L, E, 3] int."""
    top, left, ch, cw = map_geometry(layers, n_experts)
    rows = top + np.arange(len(layers)) * ch + (ch - 1) // 2
    cols = left + np.arange(n_experts) * cw + (cw - 1) // 2
    return img[rows][:, cols].astype(int)


def test_load_stats_match_numpy():
    counts = torch.tensor([0, 10, 30, 80])
    c = counts.numpy().astype(float)
    stats = load_stats(counts)
    assert stats == pytest.approx({"load_max": c.max() / c.mean(), "load_min": 0.0,
                                   "load_cv": c.std() / c.mean(), "experts_under_half": 0.5})
    assert load_stats(torch.full((8,), 5)) == {"load_max": 1.0, "load_min": 1.0, "load_cv": 0.0,
                                               "experts_under_half": 0.0}
    assert set(DESCRIPTIONS) == set(stats) | {"dropped_fraction"}


def test_picture_colours_follow_the_share_of_each_layer():
    """Rows are layers (normalised on their own), columns experts: equal counts are white, an
    expert with no tokens black, 4x its share deep red, 1/4 deep blue, and redness grows with the
    count along a row."""
    E = 8
    loads = {1: torch.full((E,), 50), 3: torch.tensor([0, 400, 100, 100, 25, 100, 75, 0]),
             5: torch.arange(1, E + 1) * 1000}
    img = decode_png(png_bytes(load_image(loads, step=7, top_k=2)))
    colors = cell_colors(img, [1, 3, 5], E)
    white = (colors[0] >= 235).all() and (colors[0].max(-1) - colors[0].min(-1) <= 8).all()
    assert white  # the fair share
    assert (colors[1, [0, 7]] == 0).all()                                     # no tokens: black
    hot, cold = colors[1, 1], colors[1, 4]  # 400 = 4x, 25 = 1/4 of the mean 100
    assert hot[0] - hot[2] > 100 and cold[2] - cold[0] > 100
    redness = colors[2, :, 0] - colors[2, :, 2]
    assert (np.diff(redness) > 0).all(), redness  # 1..8 x 1000: shares 1/36..8/36 along the row
    assert redness[0] < 0 < redness[-1]  # 2/9 of the fair share is blue, 16/9 red


@pytest.mark.parametrize("n_experts, n_layers", [(16, 32), (128, 32), (8, 4)])
def test_picture_fits_a_card_at_the_sizes_users_run(n_experts, n_layers):
    """Readable in a TensorBoard card: at most 640 px wide, every expert and layer a cell of at
    least 3 x 4 px, each expert's colour where the geometry says (a lone hot expert per row)."""
    layers = list(range(1, 2 * n_layers, 2))
    loads = {}
    for r, layer in enumerate(layers):
        counts = torch.full((n_experts,), 10)
        counts[(5 * r) % n_experts] = 40
        loads[layer] = counts
    img = decode_png(png_bytes(load_image(loads, step=100)))
    _, _, ch, cw = map_geometry(layers, n_experts)
    assert img.shape[1] <= 640 and img.shape[0] <= 640 and ch >= 4 and cw >= 3
    colors = cell_colors(img, layers, n_experts)
    hottest = (colors[..., 0] - colors[..., 2]).argmax(axis=1)
    assert hottest.tolist() == [(5 * r) % n_experts for r in range(n_layers)]


def test_summaries_read_back_by_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    rgb = load_image({0: torch.tensor([1, 2, 3, 4])}, step=3)
    writer = SummaryWriter(str(tmp_path))
    writer._get_file_writer().add_summary(image_summary("moe/expert_load", rgb), 3)
    described = scalar_summary("moe/layer0/load_cv", 0.5, DESCRIPTIONS["load_cv"])
    writer._get_file_writer().add_summary(described, 3)
    writer._get_file_writer().add_summary(scalar_summary("moe/layer0/load_cv", 0.25), 4)
    writer.close()
    ea = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    (event,) = ea.Images("moe/expert_load")
    assert (event.step, event.height, event.width) == (3, *rgb.shape[:2])
    assert np.array_equal(decode_png(event.encoded_image_string), rgb)
    assert [(e.step, e.value) for e in ea.Scalars("moe/layer0/load_cv")] == [(3, 0.5), (4, 0.25)]
    assert ea.SummaryMetadata("moe/layer0/load_cv").summary_description == DESCRIPTIONS["load_cv"]


def test_only_per_layer_tags_carry_the_per_layer_descriptions(tmp_path):
    """The step's overall train/dropped_fraction is not the per-layer figure the description
    explains: only moe/layerN/<figure> tags get DESCRIPTIONS."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from train.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, enabled=True, histograms=False)
    logger.log(1, {"dropped_fraction": 0.1}, dropped={0: 0.2})
    logger.close()
    ea = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    assert ea.SummaryMetadata("moe/layer0/dropped_fraction").summary_description == \
        DESCRIPTIONS["dropped_fraction"]
    assert "train/dropped_fraction" in ea.Tags()["scalars"]
    plain = ea.summary_metadata.get("train/dropped_fraction")  # a plain add_scalar has none
    assert plain is None or plain.summary_description == ""
