"""Limbs and shoes: tapered skin, trouser legs and sleeves along the skeleton, feet per view."""

from __future__ import annotations

import math

from pedsynth.procedural.canvas import Point, accent, tone
from pedsynth.procedural.painter import PartPainter
from pedsynth.procedural.pose import (
    ANKLE_WIDTH,
    ARM_WIDTH,
    FOOT_HEIGHT,
    HAND_RADIUS,
    HIP_Y,
    KNEE_WIDTH,
    SIDE_DEPTH,
    THIGH_WIDTH,
    WAIST_Y,
    WRIST_WIDTH,
    Limb,
)
from pedsynth.procedural.vocabulary import RGB, SLEEVE_LENGTH

# Leg coverage (fraction of the leg from the hip) and widths (hip, knee, ankle) per lower type.
LEG_COVER = {"trousers": 1.0, "jeans": 1.0, "leggings": 1.0, "shorts": 0.42, "skirt": 0.0}
LEG_WIDTHS = {
    "trousers": (1.08, 1.12, 1.3),
    "jeans": (1.04, 1.04, 1.18),
    "leggings": (0.94, 0.92, 0.94),
    "shorts": (1.14, 1.3, 1.3),
    "skirt": (1.0, 1.0, 1.0),
}
LOOSE_SLEEVES = {"jacket": 0.012, "coat": 0.014, "hoodie": 0.01, "sweater": 0.008}


def _lerp(a: Point, b: Point, t: float) -> Point:
    return (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t)


class BodyParts(PartPainter):
    """Arms, legs (bare or clothed) and shoes."""

    def _partial_limb(
        self, limb: Limb, cover: float, widths: tuple[float, float, float], fill: RGB
    ) -> None:
        """Draw the first ``cover`` fraction (by length) of a limb; widths at root/middle/end."""
        if cover <= 0:
            return
        first = math.dist(limb.root, limb.middle)
        second = math.dist(limb.middle, limb.end)
        reach = cover * (first + second)
        if reach <= first:
            t = reach / first
            end_width = widths[0] + (widths[1] - widths[0]) * t
            self.c.segment(limb.root, _lerp(limb.root, limb.middle, t), widths[0], end_width, fill)
            return
        self.c.segment(limb.root, limb.middle, widths[0], widths[1], fill)
        t = min(1.0, (reach - first) / second)
        end_width = widths[1] + (widths[2] - widths[1]) * t
        self.c.segment(limb.middle, _lerp(limb.middle, limb.end, t), widths[1], end_width, fill)

    def _leg(self, leg: Limb) -> None:
        lower = self.who.lower_type
        skin = tone(self.look.skin, leg.shade)
        base = (THIGH_WIDTH * self.sk.build, KNEE_WIDTH, ANKLE_WIDTH)
        cover = LEG_COVER[lower]
        if cover < 1.0:
            self._partial_limb(leg, 1.0, base, skin)
        scale = LEG_WIDTHS[lower]
        widths = (base[0] * scale[0], base[1] * scale[1], base[2] * scale[2])
        colour = tone(self.look.lower, leg.shade)
        self._partial_limb(leg, cover, widths, colour)
        if lower == "jeans":  # a light seam down the leg
            seam = tone(colour, 1.25)
            self.c.line([leg.root, leg.middle, leg.end], 0.005, seam)

    def _pelvis(self) -> None:
        lower = self.who.lower_type
        if lower == "skirt":
            return
        colour = self.look.lower
        if self.view == "side":
            d = SIDE_DEPTH
            points = [
                (-d * 1.05, WAIST_Y),
                (d * 0.9, WAIST_Y),
                (d * 0.95, HIP_Y + 0.02),
                (0.0, HIP_Y + 0.05),
                (-d * 1.1, HIP_Y + 0.03),
            ]
        else:
            h = self.sk.hip_half
            points = [
                (-self.sk.waist_half * 1.04, WAIST_Y),
                (self.sk.waist_half * 1.04, WAIST_Y),
                (h, HIP_Y + 0.02),
                (h * 0.9, HIP_Y + 0.05),
                (0.0, HIP_Y + 0.055),
                (-h * 0.9, HIP_Y + 0.05),
                (-h, HIP_Y + 0.02),
            ]
        self.c.polygon(points, colour)

    def _arm(self, arm: Limb) -> None:
        skin = tone(self.look.skin, arm.shade)
        widths = (ARM_WIDTH * self.sk.build, ARM_WIDTH * 0.82, WRIST_WIDTH)
        upper_type = self.who.upper_type
        self._partial_limb(arm, 1.0, widths, skin)
        sleeve = SLEEVE_LENGTH[upper_type]
        if sleeve > 0:
            extra = LOOSE_SLEEVES.get(upper_type, 0.004)
            loose = (widths[0] + extra, widths[1] + extra, widths[2] + extra)
            colour = tone(self.look.upper, arm.shade)
            self._partial_limb(arm, sleeve, loose, colour)
            if upper_type in ("sweater", "hoodie"):  # ribbed cuffs
                cuff_start = _lerp(arm.middle, arm.end, 0.86)
                self.c.segment(cuff_start, arm.end, loose[2], loose[2], accent(colour, 0.18))
        direction = (arm.end[0] - arm.middle[0], arm.end[1] - arm.middle[1])
        norm = math.hypot(*direction) or 1.0
        hand = (
            arm.end[0] + direction[0] / norm * HAND_RADIUS * 0.8,
            arm.end[1] + direction[1] / norm * HAND_RADIUS * 0.8,
        )
        self.c.ellipse(hand, HAND_RADIUS * 0.85, HAND_RADIUS, skin)

    def _shoe(self, leg: Limb) -> None:
        kind = self.who.shoes_type
        colour = tone(self.look.shoes, leg.shade)
        ax, ay = leg.end
        sole = (232, 232, 228) if sum(self.look.shoes) < 560 else (150, 150, 150)
        if self.view == "side":
            self._shoe_profile(leg, kind, colour, tone(sole, leg.shade))
            return
        half = 0.022 if kind == "heels" else 0.028
        if kind == "boots":
            self.c.rect((ax - 0.026, ay - 0.07), (ax + 0.026, ay), colour, radius=0.006)
        if kind == "sandals":
            self.c.rect(
                (ax - half, ay - 0.008), (ax + half, ay + FOOT_HEIGHT), self.look.skin, 0.01
            )
            for y in (ay - 0.002, ay + 0.01):
                self.c.line([(ax - half, y), (ax + half, y)], 0.007, colour)
            return
        self.c.rect((ax - half, ay - 0.01), (ax + half, ay + FOOT_HEIGHT), colour, radius=0.012)
        if kind == "sneakers":
            self.c.rect((ax - half, ay + FOOT_HEIGHT - 0.008), (ax + half, ay + FOOT_HEIGHT), sole)
        elif kind == "leather shoes":
            self.c.ellipse((ax - half * 0.3, ay + 0.002), 0.008, 0.004, tone(colour, 1.5))

    def _shoe_profile(self, leg: Limb, kind: str, colour: RGB, sole: RGB) -> None:
        ax, ay = leg.end
        shin = math.atan2(leg.end[0] - leg.middle[0], leg.end[1] - leg.middle[1])
        tilt = max(0.0, min(0.7, -shin * 0.9))  # a trailing foot pushes off with the toe down

        def at(x: float, y: float) -> Point:
            return (
                ax + x * math.cos(tilt) - y * math.sin(tilt),
                ay + x * math.sin(tilt) + y * math.cos(tilt),
            )

        length = 0.058 if kind == "heels" else 0.066
        if kind == "boots":
            self.c.rect((ax - 0.026, ay - 0.07), (ax + 0.024, ay), colour, radius=0.006)
        body = [
            at(-0.026, -0.012),
            at(0.012, -0.012),
            at(length * 0.75, 0.0),
            at(length, 0.012),
            at(length, FOOT_HEIGHT),
            at(-0.028, FOOT_HEIGHT),
        ]
        if kind == "sandals":
            self.c.polygon(body, self.look.skin)
            for x in (-0.01, 0.03):
                self.c.line([at(x, -0.008), at(x + 0.008, FOOT_HEIGHT)], 0.008, colour)
            return
        if kind == "heels":
            body[-1] = at(-0.024, 0.006)
            self.c.polygon(body, colour)
            self.c.line([at(-0.022, 0.004), at(-0.02, FOOT_HEIGHT)], 0.007, colour)
            return
        self.c.polygon(body, colour)
        if kind == "sneakers":
            self.c.polygon(
                [
                    at(-0.028, FOOT_HEIGHT - 0.008),
                    at(length, FOOT_HEIGHT - 0.008),
                    at(length, FOOT_HEIGHT),
                    at(-0.028, FOOT_HEIGHT),
                ],
                sole,
            )
        elif kind == "leather shoes":
            self.c.ellipse(at(length * 0.6, 0.004), 0.01, 0.004, tone(colour, 1.5))
