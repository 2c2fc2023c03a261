"""TensorBoard-format scalars and images (tensorboardX event files) and the loss-curve PNG."""

from __future__ import annotations

import math
import os

from PIL import Image, ImageDraw


class Scalars:
    """Writes TensorBoard event files under `directory` (only process 0 writes) and keeps the loss history."""

    def __init__(self, directory: str, enabled: bool = True):
        self.history: list[tuple[int, float]] = []
        self.writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(directory)

    def write(self, step: int, values: dict[str, float]) -> None:
        if "loss" in values:
            self.history.append((step, float(values["loss"])))
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, float(value), step)

    def image(self, step: int, tag: str, image) -> None:
        """An image summary: uint8 [H, W, 3] (e.g. a sample grid)."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_loss(history: list[tuple[int, float]], path: str, title: str = "training loss") -> None:
    """Loss against step (log scale), raw points and a running mean."""
    width, height, left, top, right, bottom = 720, 400, 60, 30, 20, 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 8), title, fill="black")
    if history:
        steps = [s for s, _ in history]
        logs = [math.log10(max(v, 1e-12)) for _, v in history]
        lo, hi = min(logs), max(logs)
        hi = hi if hi > lo else lo + 1
        x0, x1 = min(steps), max(max(steps), min(steps) + 1)

        def xy(step, value):
            return (left + (width - left - right) * (step - x0) / (x1 - x0),
                    top + (height - top - bottom) * (hi - value) / (hi - lo))

        draw.rectangle([left, top, width - right, height - bottom], outline="black")
        for k in range(5):
            v = lo + (hi - lo) * k / 4
            _, y = xy(x0, v)
            draw.text((4, y - 6), f"{10 ** v:.3g}", fill="black")
        draw.text((left, height - bottom + 6), f"step {x0}", fill="black")
        draw.text((width - right - 80, height - bottom + 6), f"step {x1}", fill="black")
        for s, v in zip(steps, logs):
            x, y = xy(s, v)
            draw.point((x, y), fill=(160, 190, 230))
        window = max(1, len(logs) // 20)
        smooth = [sum(logs[max(0, i - window):i + 1]) / len(logs[max(0, i - window):i + 1]) for i in range(len(logs))]
        draw.line([xy(s, v) for s, v in zip(steps, smooth)], fill=(31, 119, 180), width=2)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path)
