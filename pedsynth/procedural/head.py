"""Neck, head, hair styles, face, glasses and hats for front, back and side views.

From the back the head is all hair (unless bald) and the face is hidden; in profile hair covers
the back of the skull and a nose and one eye show.
"""

from __future__ import annotations

import math

from pedsynth.procedural.canvas import Point, accent, tone
from pedsynth.procedural.painter import PartPainter
from pedsynth.procedural.pose import (
    HEAD_CENTRE_Y,
    HEAD_RX,
    HEAD_RY,
    NECK_Y,
    SHOULDER_Y,
)

FEATURE = (44, 32, 30)  # eyes, brows
LIPS = (150, 72, 64)
FRAME = (26, 26, 28)  # glasses frames


class HeadParts(PartPainter):
    """Everything above the shoulders."""

    def _neck(self) -> None:
        skin = tone(self.look.skin, 0.93)
        if self.view == "side":
            self.c.polygon(
                [
                    (-0.02, NECK_Y - 0.01),
                    (0.018, NECK_Y - 0.01),
                    (0.02, SHOULDER_Y + 0.01),
                    (-0.024, SHOULDER_Y + 0.01),
                ],
                skin,
            )
        else:
            self.c.rect((-0.021, NECK_Y - 0.012), (0.021, SHOULDER_Y + 0.004), skin)

    def _head_centre(self) -> Point:
        return (0.006 if self.view == "side" else 0.0, HEAD_CENTRE_Y)

    def _head(self) -> None:
        """Skull, ears and hair; the face features come later (``_face``)."""
        style, c = self.who.hair_style, self.c
        hair, skin = self.look.hair, self.look.skin
        cx, cy = self._head_centre()
        if self.view == "back":
            c.ellipse((-HEAD_RX, cy + 0.008), 0.009, 0.013, tone(skin, 0.9))
            c.ellipse((HEAD_RX, cy + 0.008), 0.009, 0.013, tone(skin, 0.9))
            if style == "bald":
                c.ellipse((cx, cy), HEAD_RX, HEAD_RY, skin)
                return
            if style == "curly":
                self._curls((cx, cy), 0, 360)
            c.ellipse((cx, cy - 0.002), HEAD_RX + 0.004, HEAD_RY + 0.002, hair)
            if style == "bun":  # on the back of the head, shaded so it stands out
                c.circle((cx, cy - 0.03), 0.025, accent(hair, 0.15))
                c.circle((cx, cy - 0.033), 0.02, hair)
            return
        if self.view == "side":
            if style == "bun":
                c.circle((cx - 0.045, cy - 0.036), 0.024, hair)
            if style == "curly":
                self._curls((cx - 0.006, cy), 150, 390)
            c.ellipse((cx, cy), HEAD_RX + 0.004, HEAD_RY, skin)
            c.polygon(
                [
                    (cx + HEAD_RX, cy - 0.002),
                    (cx + HEAD_RX + 0.014, cy + 0.022),
                    (cx + HEAD_RX - 0.002, cy + 0.026),
                ],
                skin,
            )  # nose
            if style != "bald":
                c.ellipse((cx - 0.01, cy - 0.006), HEAD_RX + 0.002, HEAD_RY + 0.002, hair)
                c.ellipse((cx + 0.016, cy + 0.016), HEAD_RX - 0.014, HEAD_RY - 0.016, skin)
            c.ellipse((cx - 0.004, cy + 0.01), 0.009, 0.013, tone(skin, 0.88))
            return
        if style == "curly":
            self._curls((cx, cy), 170, 370)
        if style == "bun":
            c.circle((cx, cy - 0.06), 0.024, hair)
        for side in (-1, 1):
            c.ellipse((side * HEAD_RX, cy + 0.01), 0.009, 0.013, tone(skin, 0.9))
        if style == "bald":
            c.ellipse((cx, cy), HEAD_RX, HEAD_RY, skin)
            return
        c.cap((cx, cy - 0.002), HEAD_RX + 0.005, HEAD_RY + 0.004, cy + 0.012, hair)
        c.ellipse((cx, cy + 0.014), HEAD_RX - 0.002, HEAD_RY - 0.012, skin)

    def _curls(self, centre: Point, start: float, end: float) -> None:
        cx, cy = centre
        for angle in range(int(start), int(end), 30):
            t = math.radians(angle)
            point = (cx + (HEAD_RX + 0.004) * math.cos(t), cy + (HEAD_RY + 0.0) * math.sin(t))
            self.c.circle(point, 0.018, self.look.hair)

    def _hair_behind(self) -> None:
        """Hair that hangs behind the head and neck (front and side views)."""
        style, hair = self.who.hair_style, self.look.hair
        cx, cy = self._head_centre()
        if self.view == "front":
            if style == "long":
                self.c.rect(
                    (-HEAD_RX - 0.004, cy), (HEAD_RX + 0.004, SHOULDER_Y + 0.02), hair, 0.02
                )
            elif style == "ponytail":
                self.c.segment(
                    (HEAD_RX * 0.7, cy - 0.02), (HEAD_RX + 0.014, cy + 0.06), 0.028, 0.014, hair
                )
        elif self.view == "side":
            if style == "long":
                self.c.polygon(
                    [
                        (cx - 0.052, cy - 0.02),
                        (cx - 0.064, SHOULDER_Y + 0.09),
                        (cx - 0.018, SHOULDER_Y + 0.08),
                        (cx + 0.0, cy + 0.04),
                    ],
                    hair,
                )
            elif style == "ponytail":
                self.c.segment((cx - 0.045, cy - 0.012), (cx - 0.074, cy + 0.09), 0.03, 0.016, hair)

    def _hair_drape(self) -> None:
        """Hair that falls in front of the shoulders (front) or over the back (back)."""
        style, hair = self.who.hair_style, self.look.hair
        cx, cy = self._head_centre()
        if self.view == "front" and style == "long":
            for side in (-1, 1):
                self.c.polygon(
                    [
                        (side * (HEAD_RX - 0.006), cy),
                        (side * (HEAD_RX + 0.014), SHOULDER_Y),
                        (side * (HEAD_RX + 0.012), SHOULDER_Y + 0.075),
                        (side * (HEAD_RX - 0.02), SHOULDER_Y + 0.07),
                        (side * 0.026, cy + 0.06),
                    ],
                    hair,
                )
        elif self.view == "back":
            if style == "long":
                self.c.polygon(
                    [
                        (-HEAD_RX - 0.002, cy),
                        (HEAD_RX + 0.002, cy),
                        (HEAD_RX + 0.012, SHOULDER_Y + 0.09),
                        (0.0, SHOULDER_Y + 0.105),
                        (-HEAD_RX - 0.012, SHOULDER_Y + 0.09),
                    ],
                    hair,
                )
            elif style == "ponytail":
                self.c.segment((0.0, cy + 0.02), (0.0, SHOULDER_Y + 0.06), 0.032, 0.018, hair)
                self.c.rect((-0.014, cy + 0.03), (0.014, cy + 0.04), accent(hair, 0.4))

    def _face(self) -> None:
        c = self.c
        cx, cy = self._head_centre()
        if self.view == "side":
            c.circle((cx + 0.032, cy + 0.002), 0.006, FEATURE)
            c.line(
                [(cx + 0.024, cy - 0.014), (cx + 0.042, cy - 0.016)],
                0.004,
                tone(self.look.hair, 0.9),
            )
            c.line([(cx + 0.036, cy + 0.038), (cx + 0.05, cy + 0.037)], 0.004, LIPS)
            return
        for side in (-1, 1):
            c.circle((cx + side * 0.019, cy + 0.006), 0.0058, FEATURE)
            c.line(
                [(cx + side * 0.011, cy - 0.01), (cx + side * 0.028, cy - 0.011)],
                0.004,
                tone(self.look.hair, 0.9),
            )
        c.line([(cx - 0.011, cy + 0.04), (cx + 0.011, cy + 0.04)], 0.005, LIPS)
        c.line([(cx, cy + 0.012), (cx + 0.003, cy + 0.026)], 0.004, tone(self.look.skin, 0.82))

    def _glasses(self) -> None:
        if not self.who.glasses:
            return
        c = self.c
        cx, cy = self._head_centre()
        if self.view == "side":
            c.ellipse((cx + 0.034, cy + 0.004), 0.011, 0.012, None, FRAME, 0.004)
            c.line([(cx + 0.023, cy + 0.0), (cx - 0.006, cy - 0.002)], 0.004, FRAME)
            return
        for side in (-1, 1):
            c.ellipse((cx + side * 0.02, cy + 0.006), 0.014, 0.012, None, FRAME, 0.0045)
        c.line([(cx - 0.006, cy + 0.004), (cx + 0.006, cy + 0.004)], 0.004, FRAME)

    def _hat(self) -> None:
        hat = self.who.hat
        if hat is None:
            return
        c, colour = self.c, self.look.hat
        cx, cy = self._head_centre()
        brim = accent(colour, 0.2)
        if hat.type == "cap":
            c.cap((cx, cy), HEAD_RX + 0.007, HEAD_RY + 0.006, cy - 0.014, colour)
            if self.view == "front":
                c.ellipse((cx, cy - 0.014), HEAD_RX + 0.01, 0.011, brim)
            elif self.view == "side":
                c.polygon(
                    [
                        (cx + 0.01, cy - 0.022),
                        (cx + HEAD_RX + 0.05, cy - 0.014),
                        (cx + HEAD_RX + 0.05, cy - 0.006),
                        (cx + 0.01, cy - 0.01),
                    ],
                    brim,
                )
            else:
                c.rect((cx - 0.016, cy - 0.02), (cx + 0.016, cy - 0.012), brim)
        elif hat.type == "beanie":
            c.cap((cx, cy + 0.002), HEAD_RX + 0.008, HEAD_RY + 0.008, cy - 0.002, colour)
            c.rect(
                (cx - HEAD_RX - 0.008, cy - 0.016), (cx + HEAD_RX + 0.008, cy + 0.002), brim, 0.006
            )
        else:
            c.cap((cx, cy - 0.026), HEAD_RX - 0.002, 0.05, cy - 0.024, colour)
            c.ellipse((cx, cy - 0.024), 0.098, 0.012 if self.view != "side" else 0.008, brim)
            c.rect(
                (cx - HEAD_RX + 0.002, cy - 0.04), (cx + HEAD_RX - 0.002, cy - 0.03), accent(colour)
            )
