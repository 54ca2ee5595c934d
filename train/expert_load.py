"""Expert load as users look at it: per-layer imbalance figures, and one picture per logging window
(MoE layers x experts, colour = each expert's share of its layer's routed tokens against the fair
share 1/E), written to TensorBoard as plain PNG image summaries.

The picture is drawn with numpy and encoded with zlib (no imaging library): cells sized so that 16
experts x 32 layers and 128 experts both fit about 560 pixels across, tick labels and a colour bar
in a small embedded 5x7 bitmap font. Colour encodes r = share / fair share on a log2 scale, blue
below the fair share, white at it, red above it, clipped at 1/4 and 4x; an expert that received no
tokens is black.

Imbalance of one layer's counts c_e (E experts):
    load_max = max_e c_e / mean(c)      load_min = min_e c_e / mean(c)
    load_cv  = std(c) / mean(c)         (coefficient of variation, population std; 0 = balanced)
    experts_under_half = #{e : c_e < mean(c) / 2} / E
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import torch

DESCRIPTIONS = {
    "load_max": "Busiest expert's routed tokens / the fair share (mean over experts). "
                "1 = balanced; E / top_k = every token's top-k experts are the same.",
    "load_min": "Least used expert's routed tokens / the fair share. "
                "1 = balanced, 0 = an expert got no tokens.",
    "load_cv": "Coefficient of variation of tokens per expert: std / mean over experts. "
               "0 = balanced.",
    "experts_under_half": "Fraction of experts that received less than half their fair share "
                          "of tokens.",
    "dropped_fraction": "Share of this layer's routed slots dropped by the capacity limit "
                        "(model.capacity_factor), mean over the step's micro-batches and "
                        "data-parallel ranks.",
}


def load_stats(counts: torch.Tensor) -> dict[str, float]:
    """The imbalance figures of one layer's tokens-per-expert counts [E] (module docstring)."""
    c = counts.double()
    mean = c.mean().clamp(min=1e-9)
    return {"load_max": float(c.max() / mean), "load_min": float(c.min() / mean),
            "load_cv": float(c.std(unbiased=False) / mean),
            "experts_under_half": float((c < mean / 2).double().mean())}


# ---------------------------------------------------------------------------------------------
# A 5x7 bitmap font: each glyph is 7 rows of 5 pixels ('#' on)
# ---------------------------------------------------------------------------------------------
_GLYPHS = {
    "a": ".....|.....|.###.|....#|.####|#...#|.####",
    "b": "#....|#....|#.##.|##..#|#...#|#...#|####.",
    "c": ".....|.....|.###.|#....|#....|#...#|.###.",
    "d": "....#|....#|.##.#|#..##|#...#|#...#|.####",
    "e": ".....|.....|.###.|#...#|#####|#....|.###.",
    "f": "..##.|.#..#|.#...|###..|.#...|.#...|.#...",
    "g": ".....|.####|#...#|#...#|.####|....#|.###.",
    "h": "#....|#....|#.##.|##..#|#...#|#...#|#...#",
    "i": "..#..|.....|.##..|..#..|..#..|..#..|.###.",
    "j": "...#.|.....|..##.|...#.|...#.|#..#.|.##..",
    "k": "#....|#....|#..#.|#.#..|##...|#.#..|#..#.",
    "l": ".##..|..#..|..#..|..#..|..#..|..#..|.###.",
    "m": ".....|.....|##.#.|#.#.#|#.#.#|#...#|#...#",
    "n": ".....|.....|#.##.|##..#|#...#|#...#|#...#",
    "o": ".....|.....|.###.|#...#|#...#|#...#|.###.",
    "p": ".....|.....|####.|#...#|####.|#....|#....",
    "q": ".....|.....|.##.#|#..##|.####|....#|....#",
    "r": ".....|.....|#.##.|##..#|#....|#....|#....",
    "s": ".....|.....|.###.|#....|.###.|....#|####.",
    "t": ".#...|.#...|###..|.#...|.#...|.#..#|..##.",
    "u": ".....|.....|#...#|#...#|#...#|#..##|.##.#",
    "v": ".....|.....|#...#|#...#|#...#|.#.#.|..#..",
    "w": ".....|.....|#...#|#...#|#.#.#|#.#.#|.#.#.",
    "x": ".....|.....|#...#|.#.#.|..#..|.#.#.|#...#",
    "y": ".....|.....|#...#|#...#|.####|....#|.###.",
    "z": ".....|.....|#####|...#.|..#..|.#...|#####",
    "0": ".###.|#...#|#..##|#.#.#|##..#|#...#|.###.",
    "1": "..#..|.##..|..#..|..#..|..#..|..#..|.###.",
    "2": ".###.|#...#|....#|...#.|..#..|.#...|#####",
    "3": "#####|...#.|..#..|...#.|....#|#...#|.###.",
    "4": "...#.|..##.|.#.#.|#..#.|#####|...#.|...#.",
    "5": "#####|#....|####.|....#|....#|#...#|.###.",
    "6": "..##.|.#...|#....|####.|#...#|#...#|.###.",
    "7": "#####|....#|...#.|..#..|.#...|.#...|.#...",
    "8": ".###.|#...#|#...#|.###.|#...#|#...#|.###.",
    "9": ".###.|#...#|#...#|.####|....#|...#.|.##..",
    " ": ".....|.....|.....|.....|.....|.....|.....",
    ".": ".....|.....|.....|.....|.....|.##..|.##..",
    ",": ".....|.....|.....|.....|.##..|..#..|.#...",
    ":": ".....|.##..|.##..|.....|.##..|.##..|.....",
    "/": ".....|....#|...#.|..#..|.#...|#....|.....",
    "%": "##...|##..#|...#.|..#..|.#...|#..##|...##",
    "(": "...#.|..#..|.#...|.#...|.#...|..#..|...#.",
    ")": ".#...|..#..|...#.|...#.|...#.|..#..|.#...",
    "-": ".....|.....|.....|#####|.....|.....|.....",
    "+": ".....|..#..|..#..|#####|..#..|..#..|.....",
    "=": ".....|.....|#####|.....|#####|.....|.....",
    "<": "...#.|..#..|.#...|#....|.#...|..#..|...#.",
    ">": ".#...|..#..|...#.|....#|...#.|..#..|.#...",
}
_FONT = {ch: np.array([[c == "#" for c in row] for row in rows.split("|")])
         for ch, rows in _GLYPHS.items()}
GLYPH_W, GLYPH_H = 5, 7


def text_width(text: str, scale: int) -> int:
    return len(text) * (GLYPH_W + 1) * scale - scale


def draw_text(img: np.ndarray, x: int, y: int, text: str, scale: int = 2, color=(0, 0, 0)) -> None:
    """Write `text` (lower case, digits, punctuation above) with its top-left corner at (x, y)."""
    for i, ch in enumerate(text.lower()):
        glyph = np.kron(_FONT.get(ch, _FONT[" "]), np.ones((scale, scale), dtype=bool))  # [7s, 5s]
        x0 = x + i * (GLYPH_W + 1) * scale
        region = img[y:y + glyph.shape[0], x0:x0 + glyph.shape[1]]
        region[glyph[:region.shape[0], :region.shape[1]]] = color


# ---------------------------------------------------------------------------------------------
# Colours
# ---------------------------------------------------------------------------------------------
# log2(share / fair share) -> RGB, a diverging blue-white-red scale (ColorBrewer RdBu anchors)
_ANCHORS = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
_COLORS = np.array([[33, 102, 172], [146, 197, 222], [247, 247, 247], [244, 165, 130],
                    [178, 24, 43]], dtype=float)
LIMIT = 4.0  # the scale's ends: 1/4 and 4x the fair share
NO_TOKENS = (0, 0, 0)


def ratio_colors(ratio: np.ndarray) -> np.ndarray:
    """[...] share / fair share -> [..., 3] uint8 (black where ratio is 0)."""
    x = np.log2(np.clip(ratio, 1 / LIMIT, LIMIT))
    rgb = np.stack([np.interp(x, _ANCHORS, _COLORS[:, c]) for c in range(3)], axis=-1)
    rgb[ratio <= 0] = NO_TOKENS
    return rgb.round().astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# The picture
# ---------------------------------------------------------------------------------------------
SCALE, MARGIN, GAP_COLOR = 2, 12, (190, 190, 190)
_CHAR, _LINE = (GLYPH_W + 1) * SCALE, (GLYPH_H + 3) * SCALE  # advance of one character / text line


def map_geometry(layers: list[int], n_experts: int) -> tuple[int, int, int, int]:
    """(top, left, cell height, cell width) of the layers x experts map in the picture: cells of 3
    to 32 px so that the map fits about 480 x 380 px; row r, expert e is the cell whose top-left
    pixel is (top + r * cell height, left + e * cell width)."""
    ch, cw = max(4, min(24, 380 // len(layers))), max(3, min(32, 480 // n_experts))
    return MARGIN + 3 * _LINE + 4, MARGIN + _CHAR * len(str(max(layers))) + 8, ch, cw


def _tick_every(n: int, cell: int, label_px: int) -> int:
    """Label every k-th row/column so labels of label_px never overlap."""
    k = 1
    while k * cell < label_px and k < n:
        k *= 2
    return k


SUBTITLE = "colour: share of routed tokens / fair share"


def load_image(loads: dict[int, torch.Tensor], step: int, top_k: int | None = None) -> np.ndarray:
    """The picture of one window's tokens per expert, {layer: counts [E]} -> RGB [H, W, 3] uint8:
    title, the layers x experts map with layer and expert indices, each labelled layer's busiest
    expert (max share / fair share) on the right, and the colour bar with the fair share marked."""
    layers = sorted(loads)
    counts = np.stack([loads[i].double().cpu().numpy() for i in layers])  # [L, E]
    n_layers, n_experts = counts.shape
    totals = np.maximum(counts.sum(axis=1, keepdims=True), 1e-9)  # [L, 1]
    ratio = counts * n_experts / totals  # [L, E]: share / fair share
    top, left, ch, cw = map_geometry(layers, n_experts)
    map_w, map_h = n_experts * cw, n_layers * ch
    title = _title(step, n_experts, top_k)
    text_w = text_width(max(title, SUBTITLE, key=len), SCALE)
    width = max(left + map_w + 8 + 5 * _CHAR, text_w, 460) + MARGIN
    img = np.full((top + map_h + 2 * _LINE + 72, width, 3), 255, dtype=np.uint8)
    draw_text(img, MARGIN, MARGIN, title, SCALE)
    draw_text(img, MARGIN, MARGIN + _LINE, SUBTITLE, SCALE, (80, 80, 80))
    draw_text(img, MARGIN, top - _LINE - 2, "layer", SCALE)
    draw_text(img, left + map_w + 8, top - _LINE - 2, "max", SCALE)
    _draw_cells(img, ratio_colors(ratio), top, left, ch, cw)
    _draw_ticks(img, layers, ratio, top, left, ch, cw)
    _draw_colour_bar(img, top + map_h + 2 * _LINE + 14)
    return img


def _title(step: int, n_experts: int, top_k: int | None) -> str:
    routing = f", top-{top_k}" if top_k else ""
    return f"expert load, step {step}: {n_experts} experts{routing}"


def _draw_cells(img: np.ndarray, colors: np.ndarray, top: int, left: int, ch: int, cw: int) -> None:
    """One ch x cw block per (layer, expert), 1-px grey gaps when the cells are big enough."""
    n_layers, n_experts = colors.shape[:2]
    block = np.repeat(np.repeat(colors, ch, axis=0), cw, axis=1)  # [L ch, E cw, 3]
    if cw >= 6:
        block[:, cw - 1::cw] = GAP_COLOR
    if ch >= 6:
        block[ch - 1::ch] = GAP_COLOR
    img[top:top + n_layers * ch, left:left + n_experts * cw] = block


def _draw_ticks(img: np.ndarray, layers: list[int], ratio: np.ndarray, top: int, left: int, ch: int,
                cw: int) -> None:
    """Layer indices down the left side (each labelled row's busiest expert, max share / fair
    share, on the right), expert indices along the bottom, axis names. ratio: [L, E]."""
    n_experts, glyph_h, max_ratio = ratio.shape[1], GLYPH_H * SCALE, ratio.max(axis=1)
    right = left + n_experts * cw + 8
    row_every = _tick_every(len(layers), ch, glyph_h + 6)
    for r in range(0, len(layers), row_every):
        label = str(layers[r])
        y = max(top + r * ch + (ch - glyph_h) // 2, top - 2)
        draw_text(img, left - 6 - text_width(label, SCALE), y, label, SCALE)
        draw_text(img, right, y, f"{max_ratio[r]:.1f}x", SCALE)
    col_every = _tick_every(n_experts, cw, text_width(str(n_experts - 1), SCALE) + 8)
    y = top + len(layers) * ch + 4
    for e in range(0, n_experts, col_every):
        label = str(e)
        x = left + e * cw + (cw - text_width(label, SCALE)) // 2
        draw_text(img, max(x, left - 4), y, label, SCALE)
    draw_text(img, left + n_experts * cw - text_width("expert", SCALE), y + _LINE, "expert", SCALE)


def _draw_colour_bar(img: np.ndarray, y: int, width: int = 320, height: int = 14) -> None:
    """The scale from 1/4 to 4x the fair share, the fair share marked, and the no-token colour."""
    x0 = MARGIN + 12
    ratios = LIMIT ** np.linspace(-1.0, 1.0, width)
    img[y:y + height, x0:x0 + width] = ratio_colors(ratios)[None]
    for ratio, label in ((0.25, "1/4"), (0.5, "1/2"), (1.0, "fair"), (2.0, "2x"), (4.0, "4x")):
        x = x0 + int(round((np.log2(ratio) / np.log2(LIMIT) + 1) / 2 * (width - 1)))
        thick = 3 if ratio == 1.0 else 1
        img[y - 4:y + height + 4, max(x - thick // 2, 0):x + thick // 2 + 1] = 0
        label_w = text_width(label, SCALE)
        text_x = min(max(x - label_w // 2, 0), x0 + width - label_w)
        draw_text(img, text_x, y + height + 6, label, SCALE)
    sx = x0 + width + 24
    if sx + height + 8 + text_width("no tokens", SCALE) < img.shape[1]:
        img[y:y + height, sx:sx + height] = NO_TOKENS
        draw_text(img, sx + height + 6, y, "no tokens", SCALE)


# ---------------------------------------------------------------------------------------------
# PNG and TensorBoard summaries
# ---------------------------------------------------------------------------------------------
def png_bytes(rgb: np.ndarray) -> bytes:
    """8-bit RGB PNG of [H, W, 3] uint8: signature, IHDR, one zlib IDAT (filter 0 rows), IEND."""
    h, w, _ = rgb.shape
    rows = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit, colour type 2 (RGB), progressive
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
    return b"\x89PNG\r\n\x1a\n" + body + chunk(b"IEND", b"")


def image_summary(tag: str, rgb: np.ndarray):
    """A TensorBoard Summary holding the PNG of `rgb` (what SummaryWriter.add_image writes)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    image = Summary.Image(height=rgb.shape[0], width=rgb.shape[1], colorspace=3,
                          encoded_image_string=png_bytes(rgb))
    return Summary(value=[Summary.Value(tag=tag, image=image)])


def scalar_summary(tag: str, value: float, description: str | None = None):
    """A scalar Summary; with a description, the scalars-plugin metadata TensorBoard shows on the
    card (TensorBoard keeps the first metadata it sees for a tag, so send it once)."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata

    v = Summary.Value(tag=tag, simple_value=float(value))
    if description is not None:
        v.metadata.CopyFrom(SummaryMetadata(
            display_name=tag, summary_description=description,
            plugin_data=SummaryMetadata.PluginData(plugin_name="scalars")))
    return Summary(value=[v])
