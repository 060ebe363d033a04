"""Upper garments, skirts and coat tails, with the details that tell garment types apart.

A shirt has a collar and buttons, a jacket an open front over an inner top, a hoodie a hood and
pocket, a sweater ribbed hems; without them a model could only learn colours.
"""

from __future__ import annotations

from pedsynth.procedural.canvas import Point, accent, tone
from pedsynth.procedural.painter import PartPainter
from pedsynth.procedural.pose import (
    HEAD_CENTRE_Y,
    HEAD_RX,
    HEAD_RY,
    HIP_Y,
    KNEE_WIDTH,
    SHOULDER_Y,
    SIDE_DEPTH,
    WAIST_Y,
)
from pedsynth.procedural.vocabulary import RGB

UPPER_BOTTOM = {"jacket": HIP_Y + 0.03, "coat": HIP_Y, "hoodie": HIP_Y + 0.02}


class GarmentParts(PartPainter):
    """The torso garment and everything that hangs from the waist."""

    def _lower_overlay(self) -> None:
        """Skirts, the skirt of a dress and the tails of a coat hang over the legs."""
        upper_type, lower_type = self.who.upper_type, self.who.lower_type
        if upper_type == "dress":
            self._flared(WAIST_Y - 0.02, HIP_Y + 0.21, self.look.upper, 1.55)
        elif lower_type == "skirt":
            self._flared(WAIST_Y + 0.01, HIP_Y + 0.18, self.look.lower, 1.45)
        if upper_type == "coat":
            self._flared(WAIST_Y, HIP_Y + 0.23, self.look.upper, 1.3)
            if self.view == "front":
                edge = accent(self.look.upper)
                self.c.line([(0.0, WAIST_Y), (0.0, HIP_Y + 0.23)], 0.006, edge)

    def _flared(self, top: float, bottom: float, colour: RGB, flare: float) -> None:
        """A trapezoid from the waist down, wider at the hem; wider still when striding."""
        legs = self.sk.legs
        if self.view == "side":
            d = SIDE_DEPTH
            reach = max(abs(leg.middle[0]) for leg in legs)
            self.c.polygon(
                [
                    (-d * 1.05, top),
                    (d * 0.95, top),
                    (d * flare + reach * 0.5, bottom),
                    (-d * flare * 1.1 - reach * 0.5, bottom),
                ],
                colour,
            )
            return
        h = self.sk.hip_half * 1.02
        spread = max(abs(leg.middle[0]) for leg in legs) + KNEE_WIDTH * 0.6
        hem = max(h * flare, spread)
        self.c.polygon(
            [
                (-self.sk.waist_half * 1.05, top),
                (self.sk.waist_half * 1.05, top),
                (h, HIP_Y),
                (hem, bottom),
                (-hem, bottom),
                (-h, HIP_Y),
            ],
            colour,
        )

    def _torso_outline(self, bottom: float) -> list[Point]:
        if self.view == "side":
            d = SIDE_DEPTH * (1.08 if self.who.upper_type in ("coat", "jacket", "hoodie") else 1.0)
            chest = 0.012 if self.woman else 0.004
            return [
                (-d * 0.95, SHOULDER_Y - 0.008),
                (d * 0.7, SHOULDER_Y - 0.01),
                (d + chest, SHOULDER_Y + 0.07),
                (d * 0.85, WAIST_Y),
                (d * 0.95, bottom),
                (-d * 1.08, bottom),
                (-d * 0.85, WAIST_Y),
                (-d * 1.08, SHOULDER_Y + 0.06),
            ]
        s, w, h = self.sk.shoulder_half, self.sk.waist_half, self.sk.hip_half
        return [
            (-s * 0.82, SHOULDER_Y - 0.012),
            (s * 0.82, SHOULDER_Y - 0.012),
            (s, SHOULDER_Y + 0.012),
            (s * 0.96, SHOULDER_Y + 0.07),
            (w, WAIST_Y),
            (h * 1.02, bottom),
            (-h * 1.02, bottom),
            (-w, WAIST_Y),
            (-s * 0.96, SHOULDER_Y + 0.07),
            (-s, SHOULDER_Y + 0.012),
        ]

    def _torso(self) -> None:
        upper_type = self.who.upper_type
        colour = self.look.upper
        bottom = UPPER_BOTTOM.get(upper_type, HIP_Y - 0.01)
        if upper_type in ("tank top", "dress"):
            self.c.polygon(self._torso_outline(WAIST_Y), self.look.skin)  # bare shoulders
            outline = self._torso_outline(bottom)
            body = [p for p in outline if p[1] > SHOULDER_Y + 0.02]
            top = SHOULDER_Y + 0.035
            if self.view == "side":
                body = [(-SIDE_DEPTH * 1.05, top), (SIDE_DEPTH * 1.0, top), *body]
            else:
                body = [
                    (-self.sk.shoulder_half * 0.9, top),
                    (self.sk.shoulder_half * 0.9, top),
                    *body,
                ]
            self.c.polygon(body, colour)
            if self.view != "side" and upper_type == "tank top":
                for x in (-0.045, 0.045):
                    self.c.line([(x, SHOULDER_Y - 0.008), (x, top + 0.005)], 0.014, colour)
        else:
            self.c.polygon(self._torso_outline(bottom), colour)
        detail = accent(colour)
        if self.view == "front":
            self._front_details(upper_type, colour, detail, bottom)
        elif self.view == "back":
            self._back_details(upper_type, colour, detail, bottom)
        else:
            self._side_details(upper_type, colour, detail, bottom)
        if upper_type == "dress":  # a belt line at the waist
            span = SIDE_DEPTH if self.view == "side" else self.sk.waist_half
            self.c.line([(-span, WAIST_Y - 0.01), (span, WAIST_Y - 0.01)], 0.008, detail)

    def _front_details(self, upper_type: str, colour: RGB, detail: RGB, bottom: float) -> None:
        c = self.c
        if upper_type == "shirt":
            c.polygon(
                [
                    (-0.024, SHOULDER_Y - 0.012),
                    (0.024, SHOULDER_Y - 0.012),
                    (0.0, SHOULDER_Y + 0.045),
                ],
                self.look.skin,
            )
            c.polygon(
                [
                    (-0.03, SHOULDER_Y - 0.016),
                    (-0.004, SHOULDER_Y + 0.03),
                    (-0.02, SHOULDER_Y + 0.03),
                ],
                tone(colour, 1.12),
            )
            c.polygon(
                [(0.03, SHOULDER_Y - 0.016), (0.004, SHOULDER_Y + 0.03), (0.02, SHOULDER_Y + 0.03)],
                tone(colour, 1.12),
            )
            for i in range(4):
                c.circle((0.0, SHOULDER_Y + 0.07 + i * 0.06), 0.0045, detail)
        elif upper_type in ("jacket", "coat"):
            inner_bottom = bottom if upper_type == "jacket" else SHOULDER_Y + 0.1
            c.polygon(
                [
                    (-0.026, SHOULDER_Y - 0.012),
                    (0.026, SHOULDER_Y - 0.012),
                    (0.014, inner_bottom),
                    (-0.014, inner_bottom),
                ],
                self.look.inner,
            )
            c.polygon(
                [
                    (-0.04, SHOULDER_Y - 0.016),
                    (-0.012, SHOULDER_Y + 0.09),
                    (-0.03, SHOULDER_Y + 0.06),
                ],
                detail,
            )
            c.polygon(
                [(0.04, SHOULDER_Y - 0.016), (0.012, SHOULDER_Y + 0.09), (0.03, SHOULDER_Y + 0.06)],
                detail,
            )
            if upper_type == "coat":
                for i in range(3):
                    y = SHOULDER_Y + 0.14 + i * 0.07
                    c.circle((-0.022, y), 0.005, detail)
                    c.circle((0.022, y), 0.005, detail)
        elif upper_type == "hoodie":
            c.polygon(
                [
                    (-0.05, bottom - 0.1),
                    (0.05, bottom - 0.1),
                    (0.065, bottom - 0.02),
                    (-0.065, bottom - 0.02),
                ],
                detail,
            )
            for x in (-0.014, 0.014):
                c.line([(x, SHOULDER_Y), (x, SHOULDER_Y + 0.08)], 0.005, tone(detail, 0.9))
        elif upper_type in ("sweater", "t-shirt"):
            c.ellipse((0.0, SHOULDER_Y - 0.008), 0.03, 0.016, self.look.skin, detail, 0.006)
            if upper_type == "sweater":
                h = self.sk.hip_half * 1.02
                c.rect((-h, bottom - 0.025), (h, bottom), detail)

    def _back_details(self, upper_type: str, colour: RGB, detail: RGB, bottom: float) -> None:
        if upper_type == "hoodie":
            self.c.ellipse((0.0, SHOULDER_Y + 0.02), 0.058, 0.038, detail)
            self.c.ellipse((0.0, SHOULDER_Y + 0.012), 0.04, 0.024, tone(detail, 0.85))
        elif upper_type == "shirt":
            s = self.sk.shoulder_half
            self.c.line(
                [(-s * 0.9, SHOULDER_Y + 0.05), (s * 0.9, SHOULDER_Y + 0.05)], 0.005, detail
            )
        elif upper_type == "sweater":
            h = self.sk.hip_half * 1.02
            self.c.rect((-h, bottom - 0.025), (h, bottom), detail)
        elif upper_type == "coat":
            self.c.line([(0.0, HIP_Y), (0.0, HIP_Y + 0.23)], 0.006, detail)

    def _side_details(self, upper_type: str, colour: RGB, detail: RGB, bottom: float) -> None:
        d = SIDE_DEPTH
        if upper_type == "hoodie":
            self.c.ellipse((-d * 0.7, SHOULDER_Y - 0.005), 0.036, 0.03, detail)
        elif upper_type in ("jacket", "coat"):
            self.c.line(
                [(d * 0.8, SHOULDER_Y), (d * 0.95, WAIST_Y), (d * 0.95, bottom)],
                0.008,
                self.look.inner,
            )
        elif upper_type == "sweater":
            self.c.rect((-d * 1.08, bottom - 0.025), (d * 0.95, bottom), detail)

    def _hood_behind_head(self) -> None:
        if self.who.upper_type == "hoodie":
            self.c.ellipse(
                (0.0, HEAD_CENTRE_Y + 0.045),
                HEAD_RX + 0.022,
                HEAD_RY + 0.02,
                accent(self.look.upper, 0.15),
            )
