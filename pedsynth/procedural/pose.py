"""How one image shows its person: viewpoint, walking or standing, limb angles; the skeleton.

Coordinates are in figure units: x to the right with the body centred on 0, y downwards
from the top of the head (0) to the soles (about 1). Side views are built facing +x and
mirrored afterwards, so the geometry has only three cases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pedsynth.procedural.identity import Look, pick

Point = tuple[float, float]

VIEWS = ("front", "back", "side")
VIEW_WEIGHTS = (0.38, 0.32, 0.30)

# Body proportions in figure units (a figure about 7.5 heads tall).
HEAD_CENTRE_Y = 0.068
HEAD_RX = 0.05
HEAD_RY = 0.063
NECK_Y = 0.125
SHOULDER_Y = 0.175
SHOULDER_HALF = 0.095
WAIST_Y = 0.40
WAIST_HALF = 0.07
HIP_Y = 0.50
HIP_HALF = 0.072
THIGH = 0.245
SHIN = 0.232
FOOT_HEIGHT = 0.022
UPPER_ARM = 0.165
FOREARM = 0.152
THIGH_WIDTH = 0.068
KNEE_WIDTH = 0.05
ANKLE_WIDTH = 0.038
ARM_WIDTH = 0.046
WRIST_WIDTH = 0.032
HAND_RADIUS = 0.021
SIDE_DEPTH = 0.052  # half the chest depth seen in profile


@dataclass(frozen=True)
class Shot:
    """The per-image pose and viewpoint; captions may mention ``view``, ``walking``, ``facing``."""

    view: str  # "front", "back" or "side"
    mirrored: bool  # the figure is flipped left-right after drawing
    walking: bool
    stride: float  # thigh swing in radians
    knee_bend: float
    arm_swing: float
    elbow_bend: float
    arm_spread: float  # front and back views: how far the arms hang out
    leg_spread: float
    lead_near: bool  # side view: the near leg is the forward one
    step_left: bool  # front and back views: which leg is stepping

    @property
    def facing(self) -> str | None:
        """Side views only: the direction the person walks in the image."""
        if self.view != "side":
            return None
        return "left" if self.mirrored else "right"


def sample_shot(rng: np.random.Generator) -> Shot:
    """A random but plausible viewpoint and pose."""
    view = pick(rng, VIEWS, VIEW_WEIGHTS)
    walking = bool(rng.random() < 0.72)
    return Shot(
        view=view,
        mirrored=bool(rng.random() < 0.5),
        walking=walking,
        stride=float(rng.uniform(0.22, 0.42) if walking else rng.uniform(0.0, 0.07)),
        knee_bend=float(rng.uniform(0.1, 0.45) if walking else 0.0),
        arm_swing=float(rng.uniform(0.15, 0.45) if walking else rng.uniform(0.0, 0.08)),
        elbow_bend=float(rng.uniform(0.05, 0.5)),
        arm_spread=float(rng.uniform(0.05, 0.2)),
        leg_spread=float(rng.uniform(0.01, 0.07) if walking else rng.uniform(0.02, 0.1)),
        lead_near=bool(rng.random() < 0.5),
        step_left=bool(rng.random() < 0.5),
    )


@dataclass(frozen=True)
class Limb:
    """A two-segment limb: root (shoulder or hip), middle (elbow or knee), end (wrist or ankle)."""

    root: Point
    middle: Point
    end: Point
    side: int  # -1 image-left or far side, +1 image-right or near side
    shade: float  # 1.0 for limbs in front, darker for the far limbs of a side view


@dataclass(frozen=True)
class Skeleton:
    """Joint positions of one figure in one pose, plus the build-scaled body widths."""

    arms: tuple[Limb, Limb]  # in drawing order: the far or left arm first
    legs: tuple[Limb, Limb]
    shoulder_half: float
    waist_half: float
    hip_half: float
    build: float

    @property
    def bottom(self) -> float:
        """The lowest sole, where the ground is."""
        return max(leg.end[1] for leg in self.legs) + FOOT_HEIGHT


def _segment(start: Point, length: float, angle: float, squash: float = 1.0) -> Point:
    """The end of a segment hanging from ``start``, ``angle`` radians from straight down."""
    return (start[0] + length * math.sin(angle), start[1] + length * math.cos(angle) * squash)


def _limb(
    root: Point,
    lengths: tuple[float, float],
    angles: tuple[float, float],
    *,
    side: int,
    shade: float,
    squash: float = 1.0,
) -> Limb:
    """A limb hanging from ``root``; ``squash`` shortens it vertically (a leg stepping at us)."""
    middle = _segment(root, lengths[0], angles[0], squash)
    return Limb(root, middle, _segment(middle, lengths[1], angles[1], squash), side, shade)


def _profile_limbs(shot: Shot) -> tuple[tuple[Limb, Limb], tuple[Limb, Limb]]:
    """Arms and legs seen from the side (facing +x), far limb first and darker."""
    lead_thigh, trail_thigh = shot.stride, -shot.stride * 0.9
    lead = ((0.0, HIP_Y), (lead_thigh, lead_thigh * 0.4))  # nearly straight knee
    trail = ((-0.004, HIP_Y), (trail_thigh, trail_thigh - shot.knee_bend))  # pushing off
    far_leg, near_leg = (trail, lead) if shot.lead_near else (lead, trail)
    # Arms swing against the legs: the arm on the side of the leading leg swings back.
    near_arm = -shot.arm_swing if shot.lead_near else shot.arm_swing
    shoulder = (0.004, SHOULDER_Y + 0.01)

    def arm(angle: float, side: int, shade: float) -> Limb:
        angles = (angle, angle + shot.elbow_bend)
        return _limb(shoulder, (UPPER_ARM, FOREARM), angles, side=side, shade=shade)

    def leg(spec: tuple[Point, tuple[float, float]], side: int, shade: float) -> Limb:
        return _limb(spec[0], (THIGH, SHIN), spec[1], side=side, shade=shade)

    arms = (arm(-near_arm, -1, 0.78), arm(near_arm, 1, 1.0))
    return arms, (leg(far_leg, -1, 0.8), leg(near_leg, 1, 1.0))


def _facing_limbs(
    shot: Shot, shoulder_half: float, hip_half: float
) -> tuple[tuple[Limb, Limb], tuple[Limb, Limb]]:
    """Arms and legs seen from the front or back, image-left first.

    Walking towards or away from the camera shows as a stepping leg that looks shorter and
    an arm that swings out and looks foreshortened.
    """
    arms, legs = [], []
    for side in (-1, 1):
        stepping = shot.walking and (side == -1) == shot.step_left
        swinging = shot.walking and not stepping
        spread = shot.arm_spread + (0.04 if swinging else 0.0)
        arm_root = (side * (shoulder_half - ARM_WIDTH * 0.35), SHOULDER_Y + 0.008)
        forearm_angle = side * (spread + 0.02) - side * shot.elbow_bend * 0.3
        arms.append(
            _limb(
                arm_root,
                (UPPER_ARM, FOREARM * (0.8 if swinging else 1.0)),
                (side * spread, forearm_angle),
                side=side,
                shade=1.0,
            )
        )
        legs.append(
            _limb(
                (side * (hip_half - THIGH_WIDTH * 0.5), HIP_Y),
                (THIGH, SHIN),
                (side * shot.leg_spread, side * shot.leg_spread * 0.5),
                side=side,
                shade=1.0,
                squash=0.94 if stepping else 1.0,
            )
        )
    return (arms[0], arms[1]), (legs[0], legs[1])


def build_skeleton(shot: Shot, look: Look) -> Skeleton:
    """Joint positions for ``shot``; side views face +x."""
    shoulder_half = SHOULDER_HALF * look.build
    hip_half = HIP_HALF * look.build
    if shot.view == "side":
        arms, legs = _profile_limbs(shot)
    else:
        arms, legs = _facing_limbs(shot, shoulder_half, hip_half)
    return Skeleton(arms, legs, shoulder_half, WAIST_HALF * look.build, hip_half, look.build)
