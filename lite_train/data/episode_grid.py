"""Episodes in, one labelled picture out: per class a row of support images, then its query images.

A researcher looks at this before training: are the classes right, are support and query disjoint, do the
pixels look like the source (orientation, colours, range)?
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from lite_train.data.loader import Episode

_PAD = 4
_LABEL_W = 240
_GAP = 18  # between the support and the query block of a row
_TITLE_H = 22
_BG = (255, 255, 255)
_INK = (20, 20, 20)
_QUERY_TINT = (40, 110, 200)


def _to_uint8(images) -> np.ndarray:
    """(n, 3, H, W) float in [-1, 1] -> (n, H, W, 3) uint8."""
    x = (images.numpy() + 1.0) * 127.5
    return np.clip(np.rint(x), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def render_episodes(episodes: Sequence[Episode], class_names: dict[int, str], *, thumb: int = 56,
                    max_shots: int = 8) -> Image.Image:
    """Draw episodes one under the other.

    Args:
        episodes: as yielded by the episode loader.
        class_names: absolute class id -> name, for the row labels.
        thumb: thumbnail edge in pixels.
        max_shots: at most this many support and this many query images per row ("+k" notes the rest).
    """
    cell = thumb + _PAD
    width = _LABEL_W + 2 * max_shots * cell + _GAP + 60
    blocks = []
    for ep in episodes:
        ways = int(ep["support_labels"].max()) + 1
        blocks.append((ep, ways))
    height = sum(_TITLE_H + ways * cell + _PAD for _, ways in blocks) + _PAD
    canvas = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(canvas)
    y = _PAD
    for ep, ways in blocks:
        support, query = _to_uint8(ep["support_images"]), _to_uint8(ep["query_images"])
        s_labels, q_labels = ep["support_labels"].numpy(), ep["query_labels"].numpy()
        title = (f"episode {ep['index']} - {ep['source']}: {ways} ways, {len(s_labels)} support, "
                 f"{len(q_labels)} query   (support left | query right, blue)")
        draw.text((_PAD, y + 4), title, fill=_INK)
        y += _TITLE_H
        for label in range(ways):
            class_id = int(ep["support_class_ids"][s_labels == label][0])
            name = class_names.get(class_id, "?")
            draw.text((_PAD, y + thumb // 2 - 12), f"{label}: {name[:34]}", fill=_INK)
            draw.text((_PAD, y + thumb // 2 + 2), f"class {class_id}", fill=_INK)
            x = _LABEL_W
            for images, labels, tint in ((support, s_labels, None), (query, q_labels, _QUERY_TINT)):
                picked = np.flatnonzero(labels == label)
                for i in picked[:max_shots]:
                    tile = Image.fromarray(images[i]).resize((thumb, thumb), Image.Resampling.BILINEAR)
                    canvas.paste(tile, (x, y))
                    if tint is not None:
                        draw.rectangle([x - 1, y - 1, x + thumb, y + thumb], outline=tint)
                    x += cell
                if len(picked) > max_shots:
                    draw.text((x, y + thumb // 2 - 6), f"+{len(picked) - max_shots}", fill=_INK)
                x = _LABEL_W + max_shots * cell + _GAP + 30
            y += cell
        y += _PAD
    return canvas
