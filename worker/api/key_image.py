"""The key image of an AI result: the source slice that the most region weight points to, with the regions that
drove each called finding drawn on it, rendered to PNG on the server (the browser needs no DICOM reader, and the
pixels leave only through an authenticated, audited route).
"""
from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont

#: Outline colours, one per finding in the order given (colour-blind-safe Okabe-Ito).
COLOURS = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#D55E00", "#CC79A7", "#0072B2")
#: Small slices are enlarged to at least this many pixels across, so outlines and the legend stay legible.
MIN_SIZE = 384


@dataclass(frozen=True)
class FindingRegions:
    """One finding's regions: (SOP Instance UID, closed polygon in pixel (column, row), weight) each."""

    name: str
    regions: tuple[tuple[str, tuple[tuple[float, float], ...], float], ...]


def key_instance(findings: Sequence[FindingRegions]) -> str | None:
    """The SOP Instance UID carrying the most region weight over all findings; None without regions."""
    weight: dict[str, float] = defaultdict(float)
    for finding in findings:
        for uid, _, w in finding.regions:
            weight[uid] += abs(w) or 1e-9
    return max(weight, key=weight.get) if weight else None


def _grey(ds: pydicom.Dataset) -> np.ndarray:
    pixels = ds.pixel_array.astype(np.float32)
    if pixels.ndim == 3:  # a multi-frame or colour object: the first frame, as grey
        pixels = pixels[0] if pixels.shape[-1] not in (3, 4) else pixels[..., :3].mean(axis=-1)
    pixels = pixels * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)
    low, high = np.percentile(pixels, (1, 99))
    scaled = np.clip((pixels - low) / max(high - low, 1e-6), 0, 1)
    return (scaled * 255).astype(np.uint8)


def render_key_image(path: Path, sop_instance_uid: str, findings: Sequence[FindingRegions]) -> bytes:
    """PNG of the slice at ``path`` with the outlines of every finding's regions on it and a legend below."""
    grey = _grey(pydicom.dcmread(path))
    scale = max(1, -(-MIN_SIZE // max(grey.shape)))
    image = Image.fromarray(grey).resize((grey.shape[1] * scale, grey.shape[0] * scale), Image.Resampling.NEAREST)
    shown = [(f, COLOURS[i % len(COLOURS)]) for i, f in enumerate(findings)
             if any(uid == sop_instance_uid for uid, _, _ in f.regions)]
    font = ImageFont.load_default(size=16)
    legend_height = 22 * len(shown) + 8
    canvas = Image.new("RGB", (image.width, image.height + legend_height), "black")
    canvas.paste(image.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for finding, colour in shown:
        for uid, polygon, _ in finding.regions:
            if uid == sop_instance_uid and len(polygon) >= 2:
                draw.line([(x * scale, y * scale) for x, y in polygon], fill=colour, width=2)
    for row, (finding, colour) in enumerate(shown):
        top = image.height + 4 + 22 * row
        draw.rectangle((6, top + 3, 20, top + 17), outline=colour, width=2)
        draw.text((28, top + 1), finding.name, fill="white", font=font)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()
