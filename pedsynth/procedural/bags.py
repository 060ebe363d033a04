"""Bags as each view shows them: a backpack is a big box from behind and only straps from the
front; a handbag hangs from a hand; a shoulder bag crosses the chest to the opposite hip.
"""

from __future__ import annotations

from pedsynth.procedural.canvas import accent, tone
from pedsynth.procedural.painter import PartPainter
from pedsynth.procedural.pose import HIP_Y, SHOULDER_Y, SIDE_DEPTH
from pedsynth.procedural.vocabulary import RGB


class BagParts(PartPainter):
    """Backpack, handbag and shoulder bag."""

    def _bag_straps(self) -> None:
        bag = self.who.bag
        if bag is None:
            return
        colour = self.look.bag
        strap = tone(colour, 0.85)
        c, s = self.c, self.sk.shoulder_half
        if bag.type == "backpack":
            if self.view == "front":
                for side in (-1, 1):
                    c.line(
                        [
                            (side * (s - 0.035), SHOULDER_Y - 0.012),
                            (side * (s - 0.042), SHOULDER_Y + 0.2),
                        ],
                        0.02,
                        strap,
                    )
            elif self.view == "back":
                self._backpack_back(colour)
            else:
                d = SIDE_DEPTH * 1.08
                c.rect(
                    (-d - 0.085, SHOULDER_Y + 0.02), (-d + 0.012, SHOULDER_Y + 0.25), colour, 0.02
                )
                c.rect(
                    (-d - 0.1, SHOULDER_Y + 0.12),
                    (-d - 0.05, SHOULDER_Y + 0.23),
                    accent(colour),
                    0.012,
                )
                c.line(
                    [
                        (-0.018, SHOULDER_Y - 0.01),
                        (0.006, SHOULDER_Y + 0.09),
                        (-0.01, SHOULDER_Y + 0.2),
                    ],
                    0.016,
                    strap,
                )
        elif bag.type == "shoulder bag":
            if self.view == "side":
                c.line([(0.0, SHOULDER_Y - 0.01), (0.01, HIP_Y - 0.07)], 0.012, strap)
            else:
                side = self.look.handbag_side if self.view == "front" else -self.look.handbag_side
                c.line(
                    [
                        (side * (s - 0.03), SHOULDER_Y - 0.01),
                        (-side * (self.sk.hip_half + 0.02), HIP_Y - 0.06),
                    ],
                    0.012,
                    strap,
                )

    def _backpack_back(self, colour: RGB) -> None:
        c = self.c
        half = 0.078 * self.sk.build
        c.arc((0.0, SHOULDER_Y + 0.03), 0.022, 0.02, 180, 360, 0.008, accent(colour))
        c.rect((-half, SHOULDER_Y + 0.02), (half, SHOULDER_Y + 0.25), colour, radius=0.03)
        c.rect(
            (-half * 0.72, SHOULDER_Y + 0.14),
            (half * 0.72, SHOULDER_Y + 0.235),
            accent(colour, 0.2),
            radius=0.015,
        )
        c.line(
            [(-half * 0.8, SHOULDER_Y + 0.06), (half * 0.8, SHOULDER_Y + 0.06)],
            0.005,
            accent(colour),
        )

    def _bag_on_body(self) -> None:
        bag = self.who.bag
        if bag is None:
            return
        colour = self.look.bag
        if bag.type == "shoulder bag":
            if self.view == "side":
                self.c.rect((-0.03, HIP_Y - 0.08), (0.065, HIP_Y + 0.02), colour, 0.01)
                self.c.line([(-0.03, HIP_Y - 0.05), (0.065, HIP_Y - 0.05)], 0.005, accent(colour))
                return
            side = -self.look.handbag_side if self.view == "front" else self.look.handbag_side
            x = side * (self.sk.hip_half + 0.03)
            self.c.rect((x - 0.045, HIP_Y - 0.08), (x + 0.045, HIP_Y + 0.03), colour, 0.01)
            self.c.line(
                [(x - 0.045, HIP_Y - 0.05), (x + 0.045, HIP_Y - 0.05)], 0.005, accent(colour)
            )
        elif bag.type == "handbag":
            if self.view == "side":
                hand = self.sk.arms[1].end
            else:
                side = self.look.handbag_side if self.view == "front" else -self.look.handbag_side
                hand = next(arm.end for arm in self.sk.arms if arm.side == side)
            hx, hy = hand
            self.c.arc((hx, hy + 0.035), 0.022, 0.03, 180, 360, 0.007, accent(colour))
            self.c.polygon(
                [
                    (hx - 0.038, hy + 0.035),
                    (hx + 0.038, hy + 0.035),
                    (hx + 0.048, hy + 0.115),
                    (hx - 0.048, hy + 0.115),
                ],
                colour,
            )
            self.c.circle((hx, hy + 0.05), 0.006, accent(colour))
        elif bag.type == "backpack" and self.view == "front":
            # The sides of the pack peek out behind the waist.
            for side in (-1, 1):
                x = side * (self.sk.waist_half + 0.006)
                self.c.rect(
                    (x - 0.008, SHOULDER_Y + 0.12), (x + 0.008, SHOULDER_Y + 0.2), tone(colour, 0.8)
                )
