"""A PIL canvas that records every text run it draws, for documents and tables.

The checks use the record (``drawn``: text and pixel box) to refuse a question whose answer
text was not drawn, or was drawn outside the image.
"""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from data_tools.synth import fonts


class TextCanvas:
    def __init__(self, width: int, height: int, background: tuple[int, int, int]):
        self.image = Image.new("RGB", (width, height), background)
        self.draw = ImageDraw.Draw(self.image)
        self.drawn: list[tuple[str, tuple[float, float, float, float]]] = []

    def font(self, path: str, size: int) -> ImageFont.FreeTypeFont:
        return fonts.truetype(path, max(6, int(size)))

    def text(
        self, xy: tuple[float, float], s: str, font, fill=(0, 0, 0), anchor: str = "la"
    ) -> tuple[float, float, float, float]:
        """Draw ``s``; returns and records its box (x0, y0, x1, y1)."""
        self.draw.text(xy, s, font=font, fill=fill, anchor=anchor)
        box = self.draw.textbbox(xy, s, font=font, anchor=anchor)
        self.drawn.append((s, tuple(float(v) for v in box)))
        return box

    def width(self, s: str, font) -> float:
        return float(font.getlength(s))

    def crop_height(self, height: int) -> None:
        """Cut the canvas to ``height`` rows (documents are laid out top-down on a tall canvas)."""
        self.image = self.image.crop((0, 0, self.image.width, int(height)))
        self.draw = ImageDraw.Draw(self.image)
