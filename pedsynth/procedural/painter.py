"""The state every part painter shares: canvas, identity, look, skeleton and view."""

from __future__ import annotations

from pedsynth.procedural.canvas import Canvas
from pedsynth.procedural.identity import Identity, Look
from pedsynth.procedural.pose import Shot, Skeleton


class PartPainter:
    """Base of the part mixins; ``FigurePainter`` combines them and decides the layer order."""

    def __init__(
        self, canvas: Canvas, identity: Identity, look: Look, skeleton: Skeleton, shot: Shot
    ) -> None:
        self.c = canvas
        self.who = identity
        self.look = look
        self.sk = skeleton
        self.view = shot.view
        self.woman = identity.gender == "woman"
