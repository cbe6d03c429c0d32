"""Retrieval examples as one PNG (PIL only): caption queries with their top images, image queries with their top
captions; a correct match is framed or written in green, a wrong one in red."""
from __future__ import annotations

import textwrap
from pathlib import Path

from PIL import Image, ImageDraw

GREEN, RED, BLACK = (30, 150, 30), (200, 30, 30), (0, 0, 0)
CELL, BORDER, TEXT_W = 96, 4, 260


def retrieval_examples_png(text_queries: list[tuple[str, list[Image.Image], list[bool]]],
                           image_queries: list[tuple[Image.Image, list[str], list[bool]]],
                           out_path: str | Path) -> Path:
    """text_queries: (caption, its top images, which are its own image); image_queries: (image, its top captions,
    which are its own captions). Rows of text -> image first, then rows of image -> text."""
    k_images = max((len(imgs) for _, imgs, _ in text_queries), default=0)
    width = max(TEXT_W + k_images * (CELL + BORDER), 640)  # 640: room for an 80-character caption line
    row_h = CELL + 2 * BORDER
    title_h = 18
    height = 2 * title_h + (len(text_queries) + len(image_queries)) * row_h + 4
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    y = 2
    draw.text((4, y), "text -> image: top matches (green frame: the caption's own image)", fill=BLACK)
    y += title_h
    for caption, images, correct in text_queries:
        draw.multiline_text((4, y + 4), "\n".join(textwrap.wrap(caption, 40)[:5]), fill=BLACK)
        for col, (image, hit) in enumerate(zip(images, correct)):
            x = TEXT_W + col * (CELL + BORDER)
            draw.rectangle([x - BORDER, y, x + CELL + BORDER - 1, y + row_h - 1], fill=GREEN if hit else RED)
            sheet.paste(image.resize((CELL, CELL), Image.NEAREST), (x, y + BORDER))
        y += row_h
    draw.text((4, y), "image -> text: top captions (green: one of the image's own captions)", fill=BLACK)
    y += title_h
    for image, captions, correct in image_queries:
        sheet.paste(image.resize((CELL, CELL), Image.NEAREST), (4, y + BORDER))
        line_y = y + 4
        for rank, (caption, hit) in enumerate(zip(captions, correct), start=1):
            wrapped = textwrap.wrap(f"{rank}. {caption}", 80)[:2]
            draw.multiline_text((CELL + 16, line_y), "\n".join(wrapped), fill=GREEN if hit else RED)
            line_y += 12 * len(wrapped) + 4
        y += row_h
    out_path = Path(out_path)
    sheet.save(out_path)
    return out_path
