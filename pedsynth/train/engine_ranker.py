"""A vision-language engine from ``pedsynth.engines`` as a RAR re-ranker (``RankerFn``).

The engines take one image per request, so the top-k candidates are shown as one contact
sheet: the crops side by side at a common height, each under its number (1-based, as the
ranking prompt names them). The model's answer goes back to ``rerank_with_model`` unparsed;
its parser keeps the index order where the answer has nothing usable.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw

from pedsynth.engines.text import ChatRequest, get_generator
from pedsynth.schemas.text import EngineConfig
from pedsynth.train.metrics import RANKING_PROMPT, RankerFn

LABEL_BAND = 20  # pixels above each crop for its number


def contact_sheet(candidates: Sequence[Any], tile_height: int = 256) -> bytes:
    """Numbered crops side by side, as JPEG bytes; takes PIL images or encoded bytes."""
    tiles = []
    for item in candidates:
        img = Image.open(io.BytesIO(item)) if isinstance(item, bytes | bytearray) else item
        img = img.convert("RGB")
        width = max(1, round(img.width * tile_height / img.height))
        tiles.append(img.resize((width, tile_height)))
    sheet = Image.new("RGB", (sum(t.width for t in tiles), tile_height + LABEL_BAND), "white")
    draw, x = ImageDraw.Draw(sheet), 0
    for number, tile in enumerate(tiles, start=1):
        sheet.paste(tile, (x, LABEL_BAND))
        draw.text((x + tile.width // 2 - 4, 4), str(number), fill="black")
        x += tile.width
    buf = io.BytesIO()
    sheet.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def engine_ranker(config: EngineConfig, *, tile_height: int = 256, seed: int = 0) -> RankerFn:
    """A ``RankerFn`` backed by the process-wide vision engine for ``config``.

    A failed generation raises, which ``rerank_with_model`` counts in ``error_rate`` and
    answers with the index order.
    """
    generator = get_generator(config, "vision")

    def rank(query: str, candidates: Sequence[Any]) -> str:
        request = ChatRequest(
            request_id="rerank",
            prompt=RANKING_PROMPT.format(n=len(candidates), query=query),
            image=contact_sheet(candidates, tile_height),
            seed=seed,
        )
        result = generator.generate([request])[0]
        if result.text is None:
            raise RuntimeError(f"re-ranker generation failed: {result.error}")
        return result.text

    return rank
