"""Paints one person, layer by layer, for a front, back or side view.

What is visible depends on the view, as in a real crop: from the back the face and glasses are
hidden and a backpack covers the upper back; from the front a backpack shows only its straps;
in profile the far limbs are darker and the backpack sticks out behind. Side views face +x.
"""

from __future__ import annotations

from pedsynth.procedural.bags import BagParts
from pedsynth.procedural.body import BodyParts
from pedsynth.procedural.garments import GarmentParts
from pedsynth.procedural.head import HeadParts


class FigurePainter(HeadParts, BagParts, GarmentParts, BodyParts):
    """Draws an identity in a pose on a canvas; ``paint`` picks the layer order for the view.

    Construct with ``(canvas, identity, look, skeleton, shot)``.
    """

    def paint(self) -> None:
        """Draw the whole figure, back to front."""
        if self.view == "front":
            self._paint_front()
        elif self.view == "back":
            self._paint_back()
        else:
            self._paint_side()

    def _paint_front(self) -> None:
        self._hood_behind_head()
        self._hair_behind()
        for leg in self.sk.legs:
            self._leg(leg)
        self._pelvis()
        for leg in self.sk.legs:
            self._shoe(leg)
        self._lower_overlay()
        self._torso()
        self._bag_straps()
        for arm in self.sk.arms:
            self._arm(arm)
        self._bag_on_body()
        self._hair_drape()
        self._neck()
        self._head()
        self._face()
        self._glasses()
        self._hat()

    def _paint_back(self) -> None:
        for leg in self.sk.legs:
            self._leg(leg)
        self._pelvis()
        for leg in self.sk.legs:
            self._shoe(leg)
        self._lower_overlay()
        self._torso()
        for arm in self.sk.arms:
            self._arm(arm)
        self._neck()
        self._head()
        self._bag_straps()
        self._bag_on_body()
        self._hair_drape()
        self._hat()

    def _paint_side(self) -> None:
        far_arm, near_arm = self.sk.arms
        far_leg, near_leg = self.sk.legs
        self._arm(far_arm)
        self._leg(far_leg)
        self._shoe(far_leg)
        self._leg(near_leg)
        self._pelvis()
        self._shoe(near_leg)
        self._lower_overlay()
        self._torso()
        self._bag_straps()
        self._hair_behind()
        self._neck()
        self._head()
        self._face()
        self._glasses()
        self._hat()
        self._arm(near_arm)
        self._bag_on_body()
