"""Synthetic LiDAR: a spinning multi-beam sensor ray-cast against procedural street scenes.

The world (see ``docs/data_format.md``) is a street scene around a sensor mounted on a
car driving in a lane: a gently sloped and undulating ground with one or two streets
(raised sidewalks behind curbs, lane markings), buildings, walls and hedges, trees,
bushes, poles and signs, object-sized clutter (bins, barriers, bollards, benches,
trailers, dumpsters...) and the labelled objects (vehicles, pedestrians, cyclists),
each built from several primitives.

Primitives are upright oriented boxes, vertical cylinders and yawed ellipsoids. The
ray cast is fully vectorised: every primitive is tested only against the rays of its
azimuth sector and elevation band (candidate (primitive, ray) pairs are generated with
array arithmetic, without a Python loop), the ground is intersected per ray with a few
Newton steps on its smooth height function, and the nearest hit wins.

Everything depends only on ``(seed, sensor, scene)``: ``simulate_frame`` draws all its
randomness from ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from haltdet import CLASSES, ConfigError, InputError
from haltdet.boxes import count_points_in_boxes
from haltdet.data.frames import (
    FRAMES_DIR,
    INDEX_FILE,
    Frame,
    difficulty_from_points,
    is_dataset_dir,
    read_dataset_index,
    write_dataset_index,
    write_frame,
)

VEHICLE, PEDESTRIAN, CYCLIST = (CLASSES.index(c) for c in ("Vehicle", "Pedestrian", "Cyclist"))

TWO_PI = 2.0 * math.pi
# Bumped whenever the same seed gives different frames; written to dataset.json.
# 2: pedestrians show which way they face (shoes, head, lean, forearms).
SIMULATOR_VERSION = 2


# ============================================================================ configs


def _horizon_dense_table(n: int, top: float, bottom: float, centre: float = -2.0,
                         width: float = 6.0, floor: float = 0.35) -> tuple[float, ...]:
    """``n`` elevations (degrees, top first) from ``top`` to ``bottom``, denser near ``centre``.

    Beams are the quantiles of a density ``floor + exp(-((e - centre) / width)^2)``.
    """
    grid = np.linspace(bottom, top, 4001)
    dens = floor + np.exp(-(((grid - centre) / width) ** 2))
    cdf = np.concatenate([[0.0], np.cumsum((dens[1:] + dens[:-1]) / 2 * np.diff(grid))])
    cdf /= cdf[-1]
    elev = np.interp(np.linspace(0.0, 1.0, n), cdf, grid)
    elev[0], elev[-1] = bottom, top
    return tuple(float(round(e, 4)) for e in elev[::-1])


def _default_beams() -> tuple[float, ...]:
    return _horizon_dense_table(64, 3.0, -25.0)


@dataclass
class SensorConfig:
    """A spinning multi-beam LiDAR; its origin is the LiDAR frame origin.

    Attributes:
        beam_elevations_deg: elevation of each beam (degrees, any order).
        azimuth_steps: firings per revolution (rays per beam).
        mount_height: sensor height above the road at the origin (m); the ground is at
            about z = -mount_height near the sensor.
        max_range / min_range: returns outside [min_range, max_range] are dropped (m).
        range_noise_std: Gaussian noise added to the range, along the ray (m).
        dropout: probability that a return is lost.
        intensity_noise_std: Gaussian noise added to the intensity.
        intensity_ambient: intensity = reflectivity * (ambient + (1 - ambient) * cos(incidence)) + noise,
            clipped to [0, 1].
    """

    beam_elevations_deg: tuple = field(default_factory=_default_beams)
    azimuth_steps: int = 1024
    mount_height: float = 1.9
    max_range: float = 75.0
    min_range: float = 1.0
    range_noise_std: float = 0.02
    dropout: float = 0.03
    intensity_noise_std: float = 0.03
    intensity_ambient: float = 0.2
    name: str = "default"

    def __post_init__(self) -> None:
        try:
            beams = tuple(float(e) for e in self.beam_elevations_deg)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"beam_elevations_deg must be a list of numbers ({exc})") from exc
        self.beam_elevations_deg = beams
        if not beams or not all(math.isfinite(e) and -89.0 < e < 89.0 for e in beams):
            raise ConfigError("beam_elevations_deg must be a non-empty list of angles in (-89, 89) degrees")
        if int(self.azimuth_steps) != self.azimuth_steps or self.azimuth_steps < 8:
            raise ConfigError(f"azimuth_steps must be an integer >= 8, got {self.azimuth_steps!r}")
        self.azimuth_steps = int(self.azimuth_steps)
        if not self.mount_height > 0:
            raise ConfigError(f"mount_height must be > 0, got {self.mount_height}")
        if not 0 <= self.min_range < self.max_range:
            raise ConfigError(f"need 0 <= min_range < max_range, got {self.min_range}, {self.max_range}")
        if self.range_noise_std < 0 or self.intensity_noise_std < 0:
            raise ConfigError("noise standard deviations must be >= 0")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.intensity_ambient <= 1:
            raise ConfigError(f"intensity_ambient must be in [0, 1], got {self.intensity_ambient}")

    PRESETS = ("default", "hdl64", "waymo_top", "nuscenes32")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "SensorConfig":
        """A named sensor: "default", "hdl64" (KITTI), "waymo_top", "nuscenes32".

        Keyword overrides replace fields of the preset (e.g. ``azimuth_steps=256``).
        """
        if name == "default":
            cfg: dict[str, Any] = {}
        elif name == "hdl64":
            # Velodyne HDL-64E as on KITTI: upper block +2..-8.33 deg, lower block -8.83..-24.8 deg.
            upper = np.linspace(2.0, -8.33, 32)
            lower = np.linspace(-8.83, -24.8, 32)
            cfg = dict(beam_elevations_deg=tuple(float(round(e, 4)) for e in np.concatenate([upper, lower])),
                       mount_height=1.73, max_range=120.0, min_range=1.0)
        elif name == "waymo_top":
            cfg = dict(beam_elevations_deg=_horizon_dense_table(64, 2.4, -17.6, centre=-1.5, width=5.0),
                       mount_height=2.1, max_range=75.0)
        elif name == "nuscenes32":
            # Velodyne HDL-32E: 32 beams, uniform +10..-30 deg.
            cfg = dict(beam_elevations_deg=tuple(float(round(e, 4)) for e in np.linspace(10.0, -30.0, 32)),
                       mount_height=1.84, max_range=70.0)
        else:
            raise InputError(f"unknown sensor preset {name!r}; valid choices: {', '.join(cls.PRESETS)}")
        cfg["name"] = name
        cfg.update(overrides)
        return cls(**cfg)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["beam_elevations_deg"] = list(self.beam_elevations_deg)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SensorConfig":
        return _from_dict(cls, d)


def _from_dict(cls, d: dict):
    """`cls(**d)` for a config dataclass, with an unknown key a ConfigError."""
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} key(s): {sorted(unknown)}")
    return cls(**d)


def _check_range(name: str, value) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be a (min, max) pair of integers, got {value!r}") from exc
    if not 0 <= lo <= hi:
        raise ConfigError(f"{name} must satisfy 0 <= min <= max, got {value!r}")
    return lo, hi


@dataclass
class SceneConfig:
    """Knobs of the procedural world.

    Attributes:
        vehicles / pedestrians / cyclists: (min, max) objects of the class per frame
            (the actual count is drawn uniformly; placement may fall short when the
            streets are full).
        region: object centres lie within |x| <= region and |y| <= region (<= 60 m).
        world_extent: background (buildings, trees, clutter) is generated within this
            half-size (m).
        cross_street_prob: probability of a crossing street (an intersection).
        building_density: fraction of street frontage with a building.
        vegetation_density, pole_density, clutter_density: multipliers (0 disables).
        ground_slope_max: largest ground slope (rise/run) of the planar part.
        ground_undulation: largest amplitude (m) of the smooth ground waves.
        curb_height: height of sidewalks and lots above the road (m).
        size_jitter: relative size jitter of the objects (0.1 = +-10 %).
        lane_markings: paint lane markings (high-reflectivity stripes) on the roads.
    """

    vehicles: tuple = (15, 35)
    pedestrians: tuple = (8, 20)
    cyclists: tuple = (4, 10)
    region: float = 60.0
    world_extent: float = 100.0
    cross_street_prob: float = 0.6
    building_density: float = 0.8
    vegetation_density: float = 1.0
    pole_density: float = 1.0
    clutter_density: float = 1.0
    ground_slope_max: float = 0.015
    ground_undulation: float = 0.15
    curb_height: float = 0.15
    size_jitter: float = 0.1
    lane_markings: bool = True

    def __post_init__(self) -> None:
        self.vehicles = _check_range("vehicles", self.vehicles)
        self.pedestrians = _check_range("pedestrians", self.pedestrians)
        self.cyclists = _check_range("cyclists", self.cyclists)
        if not 0 < self.region <= 60.0:
            raise ConfigError(f"region must be in (0, 60] m, got {self.region}")
        if not self.world_extent > 0:
            raise ConfigError(f"world_extent must be > 0, got {self.world_extent}")
        for name in ("cross_street_prob", "building_density"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("vegetation_density", "pole_density", "clutter_density", "ground_undulation",
                     "curb_height", "size_jitter"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.ground_slope_max <= 0.1:
            raise ConfigError(f"ground_slope_max must be in [0, 0.1], got {self.ground_slope_max}")
        if self.ground_undulation > 0.5:
            raise ConfigError(f"ground_undulation must be <= 0.5 m, got {self.ground_undulation}")
        if self.size_jitter > 0.3:
            raise ConfigError(f"size_jitter must be <= 0.3, got {self.size_jitter}")

    @classmethod
    def flat_ground(cls) -> "SceneConfig":
        """An empty world: flat ground at z = -mount_height, nothing on it."""
        return cls(vehicles=(0, 0), pedestrians=(0, 0), cyclists=(0, 0), cross_street_prob=0.0,
                   building_density=0.0, vegetation_density=0.0, pole_density=0.0, clutter_density=0.0,
                   ground_slope_max=0.0, ground_undulation=0.0, curb_height=0.0, lane_markings=False)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("vehicles", "pedestrians", "cyclists"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SceneConfig":
        return _from_dict(cls, d)


# ============================================================================ world geometry


PARK_W = 2.3  # parking lane width
MARK_HALF_W = 0.075


class _Street:
    """A straight street: road u in (u_lo, u_hi) across the axis, sidewalks beyond."""

    def __init__(self, rng: np.random.Generator, angle: float, origin: tuple[float, float]):
        self.angle = float(angle)
        self.ex, self.ey = math.cos(angle), math.sin(angle)
        self.nx, self.ny = -self.ey, self.ex
        self.ox, self.oy = origin
        self.lane_w = float(rng.uniform(3.0, 3.6))
        self.lanes_r = 1 if rng.random() < 0.6 else 2
        self.lanes_l = self.lanes_r if rng.random() < 0.8 else 3 - self.lanes_r
        self.park_r = bool(rng.random() < 0.7)
        self.park_l = bool(rng.random() < 0.7)
        self.sidewalk = float(rng.uniform(2.5, 5.0))
        self.u_lo = -(self.lanes_r * self.lane_w + PARK_W * self.park_r)
        self.u_hi = self.lanes_l * self.lane_w + PARK_W * self.park_l
        marks = [(0.0, False)]
        for k in range(1, self.lanes_r):
            marks.append((-k * self.lane_w, True))
        for k in range(1, self.lanes_l):
            marks.append((k * self.lane_w, True))
        if self.park_r:
            marks.append((-self.lanes_r * self.lane_w, False))
        if self.park_l:
            marks.append((self.lanes_l * self.lane_w, False))
        self.marks = marks

    def set_origin_for_ego(self, u_ego: float) -> None:
        """Place the street so that the world origin has lateral coordinate ``u_ego``."""
        self.ox, self.oy = -u_ego * self.nx, -u_ego * self.ny

    def su(self, x, y):
        dx, dy = x - self.ox, y - self.oy
        return dx * self.ex + dy * self.ey, dx * self.nx + dy * self.ny

    def to_world(self, s: float, u: float) -> tuple[float, float]:
        return self.ox + s * self.ex + u * self.nx, self.oy + s * self.ey + u * self.ny

    def curb(self, side: int) -> float:
        return self.u_hi if side > 0 else self.u_lo

    def yaw_for(self, side: int) -> float:
        """Heading of traffic on a side (right-hand traffic: u < 0 drives along +e)."""
        return self.angle if side < 0 else self.angle + math.pi

    def rect_hits_corridor(self, cx, cy, hl, hw, yaw, margin: float) -> bool:
        """Does the rectangle touch road + sidewalks (+ margin) of this street?"""
        _, uc = self.su(cx, cy)
        c, s = math.cos(yaw), math.sin(yaw)
        rho = hl * abs(c * self.nx + s * self.ny) + hw * abs(-s * self.nx + c * self.ny)
        lo = self.u_lo - self.sidewalk - margin
        hi = self.u_hi + self.sidewalk + margin
        return uc + rho > lo and uc - rho < hi

    def rect_hits_road(self, cx, cy, hl, hw, yaw, margin: float = 0.0) -> bool:
        _, uc = self.su(cx, cy)
        c, s = math.cos(yaw), math.sin(yaw)
        rho = hl * abs(c * self.nx + s * self.ny) + hw * abs(-s * self.nx + c * self.ny)
        return uc + rho > self.u_lo - margin and uc - rho < self.u_hi + margin


class _Ground:
    """Road surface ``h(x, y)`` = plane + smooth waves; everything off-road is raised by the curb."""

    def __init__(self, rng: np.random.Generator, scene: SceneConfig, mount_height: float, streets):
        self.base = -float(mount_height)
        slope = rng.uniform(0, scene.ground_slope_max)
        direction = rng.uniform(0, TWO_PI)
        self.gx, self.gy = slope * math.cos(direction), slope * math.sin(direction)
        k = 2
        amp = rng.uniform(0.3, 1.0, k) * scene.ground_undulation
        wavelength = rng.uniform(40.0, 120.0, k)
        wdir = rng.uniform(0, TWO_PI, k)
        self.amp = amp
        self.wx = TWO_PI / wavelength * np.cos(wdir)
        self.wy = TWO_PI / wavelength * np.sin(wdir)
        self.phase = rng.uniform(0, TWO_PI, k)
        self.sin_phase = np.sin(self.phase)
        self.curb = float(scene.curb_height)
        self.streets = streets
        self.refl_road = float(rng.uniform(0.06, 0.14))
        self.refl_walk = float(rng.uniform(0.22, 0.35))
        self.refl_lot = float(rng.uniform(0.3, 0.45))
        self.refl_mark = float(rng.uniform(0.55, 0.75))
        self.markings = scene.lane_markings

    def road_level(self, x, y):
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        h = self.base + self.gx * x + self.gy * y
        for a, wx, wy, ph, sp in zip(self.amp, self.wx, self.wy, self.phase, self.sin_phase):
            if a:
                h = h + a * (np.sin(wx * x + wy * y + ph) - sp)
        return h

    def gradient(self, x, y):
        gx = np.full(np.shape(x), self.gx)
        gy = np.full(np.shape(x), self.gy)
        for a, wx, wy, ph in zip(self.amp, self.wx, self.wy, self.phase):
            if a:
                c = a * np.cos(wx * x + wy * y + ph)
                gx = gx + c * wx
                gy = gy + c * wy
        return gx, gy

    def is_road(self, x, y):
        out = np.zeros(np.shape(x), dtype=bool)
        for st in self.streets:
            _, u = st.su(x, y)
            out |= (u > st.u_lo) & (u < st.u_hi)
        return out

    def surface(self, x, y):
        return self.road_level(x, y) + self.curb * (~self.is_road(x, y))

    def reflectivity(self, x, y):
        """Per-point ground reflectivity: asphalt, paint, sidewalk or lot."""
        n = np.shape(x)
        road_of = []
        walk = np.zeros(n, dtype=bool)
        for st in self.streets:
            _, u = st.su(x, y)
            road_of.append(((u > st.u_lo) & (u < st.u_hi), u))
            walk |= (u > st.u_lo - st.sidewalk) & (u < st.u_hi + st.sidewalk)
        road = np.zeros(n, dtype=bool)
        for r, _ in road_of:
            road |= r
        refl = np.where(road, self.refl_road, np.where(walk, self.refl_walk, self.refl_lot))
        if self.markings:
            for i, st in enumerate(self.streets):
                r, u = road_of[i]
                other = np.zeros(n, dtype=bool)
                for j, (r2, _) in enumerate(road_of):
                    if j != i:
                        other |= r2
                s, _ = st.su(x, y)
                mark = np.zeros(n, dtype=bool)
                for um, dashed in st.marks:
                    m = np.abs(u - um) < MARK_HALF_W
                    if dashed:
                        m &= np.mod(s, 9.0) < 3.0
                    mark |= m
                refl = np.where(r & mark & ~other, self.refl_mark, refl)
        return refl


class _Prims:
    """Growing lists of primitives of the three kinds (world frame)."""

    def __init__(self) -> None:
        self.box: list[tuple] = []  # cx, cy, cz, half_l, half_w, half_h, yaw, refl
        self.cyl: list[tuple] = []  # cx, cy, zlo, zhi, r, refl
        self.ell: list[tuple] = []  # cx, cy, cz, a, b, c, yaw, refl

    def add_box(self, cx, cy, zlo, zhi, l, w, yaw, refl):
        self.box.append((cx, cy, (zlo + zhi) / 2, l / 2, w / 2, (zhi - zlo) / 2, yaw, refl))

    def add_cyl(self, cx, cy, zlo, zhi, r, refl):
        self.cyl.append((cx, cy, zlo, zhi, r, refl))

    def add_ell(self, cx, cy, cz, a, b, c, yaw, refl):
        self.ell.append((cx, cy, cz, a, b, c, yaw, refl))


class _Occupancy:
    """BEV rectangles with height intervals, for rejection of overlapping placements."""

    def __init__(self) -> None:
        self.buf = np.zeros((256, 8))  # cx, cy, hl, hw, yaw, zlo, zhi, radius
        self.n = 0

    def add(self, cx, cy, hl, hw, yaw, zlo=-1e9, zhi=1e9) -> None:
        if self.n == len(self.buf):
            self.buf = np.concatenate([self.buf, np.zeros_like(self.buf)])
        self.buf[self.n] = (cx, cy, hl, hw, yaw, zlo, zhi, math.hypot(hl, hw))
        self.n += 1

    def free(self, cx, cy, hl, hw, yaw, zlo=-1e9, zhi=1e9, margin=0.0) -> bool:
        if self.n == 0:
            return True
        b = self.buf[: self.n]
        dx = b[:, 0] - cx
        dy = b[:, 1] - cy
        reach = math.hypot(hl, hw) + b[:, 7] + margin
        cand = (dx * dx + dy * dy < reach * reach) & (b[:, 5] < zhi) & (b[:, 6] > zlo)
        if not cand.any():
            return True
        b, dx, dy = b[cand], dx[cand], dy[cand]
        ca, sa = math.cos(yaw), math.sin(yaw)
        cb, sb = np.cos(b[:, 4]), np.sin(b[:, 4])
        separated = np.zeros(len(b), dtype=bool)
        for ux, uy in ((ca, sa), (-sa, ca), (cb, sb), (-sb, cb)):
            pa = hl * np.abs(ca * ux + sa * uy) + hw * np.abs(-sa * ux + ca * uy)
            pb = b[:, 2] * np.abs(cb * ux + sb * uy) + b[:, 3] * np.abs(-sb * ux + cb * uy)
            separated |= np.abs(dx * ux + dy * uy) > pa + pb + margin
        return bool(separated.all())


# ---------------------------------------------------------------------------- objects
# Parts are in the object frame (x along heading, z up from the object's ground point):
#   ("box", x, y, zlo, zhi, l, w, yaw, refl) | ("cyl", x, y, zlo, zhi, r, refl)
#   ("ell", x, y, z, a, b, c, yaw, refl)


def _vehicle_parts(rng, jitter: float) -> list[tuple]:
    j = lambda: rng.uniform(1 - jitter, 1 + jitter)  # noqa: E731
    kind = rng.choice(3, p=[0.7, 0.2, 0.1])
    paint = float(rng.choice([rng.uniform(0.08, 0.25), rng.uniform(0.3, 0.75)]))
    glass, tyre = float(rng.uniform(0.04, 0.12)), 0.05
    parts: list[tuple] = []
    if kind == 0:  # car
        L, W, H = 4.5 * j(), 1.9 * j(), 1.5 * j()
        rw = 0.32 * H / 1.5
        belt = H * rng.uniform(0.52, 0.6)
        parts.append(("box", 0.0, 0.0, 0.28 * H / 1.5, belt, L, W, 0.0, paint))
        cab_l = L * rng.uniform(0.45, 0.55)
        parts.append(("box", -0.06 * L, 0.0, belt, H, cab_l, W * 0.86, 0.0, glass))
        # hood/trunk slope approximated by a lower, shorter step
        parts.append(("box", -0.06 * L, 0.0, belt, belt + 0.35 * (H - belt), cab_l + 0.5, W * 0.9, 0.0, paint))
        axles = (0.5 * L - rw - 0.45, -(0.5 * L - rw - 0.55))
    elif kind == 1:  # van
        L, W, H = 5.2 * j(), 2.0 * j(), 2.1 * j()
        rw = 0.34 * H / 2.1
        parts.append(("box", 0.0, 0.0, 0.3, 0.72 * H, L, W, 0.0, paint))
        parts.append(("box", -0.08 * L, 0.0, 0.72 * H, H, 0.82 * L, W * 0.95, 0.0, paint))
        parts.append(("box", 0.33 * L, 0.0, 0.72 * H, 0.95 * H, 0.12 * L, W * 0.9, 0.0, glass))
        axles = (0.5 * L - rw - 0.5, -(0.5 * L - rw - 0.6))
    else:  # truck
        L, W, H = rng.uniform(7.0, 10.0), 2.5 * j(), 3.2 * j()
        rw = 0.5
        cab = 2.3
        parts.append(("box", 0.5 * L - cab / 2, 0.0, 0.55, 0.88 * H, cab, W * 0.96, 0.0, paint))
        parts.append(("box", 0.5 * L - 0.15, 0.0, 0.45 * H, 0.8 * H, 0.3, W * 0.9, 0.0, glass))
        parts.append(("box", -cab / 2 - 0.15, 0.0, 0.95, H, L - cab - 0.3, W, 0.0, float(rng.uniform(0.2, 0.7))))
        parts.append(("box", 0.0, 0.0, 0.55, 0.95, L * 0.95, W * 0.5, 0.0, 0.15))
        axles = (0.5 * L - 1.2, -(0.5 * L - 1.6), -(0.5 * L - 2.9))
    for ax in axles:
        for side in (-1.0, 1.0):
            parts.append(("ell", ax, side * (W / 2 - 0.12), rw, rw, 0.12, rw, 0.0, tyre))
    return parts


def _pedestrian_parts(rng, jitter: float) -> list[tuple]:
    """A person facing +x. Front and back differ as they do on real people: shoes reach
    forward of the ankles, the head sits ahead of the spine, walkers lean forward and
    many carry their forearms ahead of the hips (bent elbows, a phone, a bag)."""
    H = rng.uniform(1.5, 1.95)
    shoulder = rng.uniform(0.5, 0.7) / 2
    stride = rng.uniform(0.0, 0.55)
    cloth = float(rng.uniform(0.1, 0.5))
    skin = float(rng.uniform(0.25, 0.4))
    leg_r = rng.uniform(0.065, 0.09)
    lean = rng.uniform(0.0, 0.06) * stride / 0.55  # walkers lean forward, standers do not
    hip = 0.47 * H
    parts: list[tuple] = []
    foot_l = 0.145 * H
    for side, sign in ((-1, 1), (1, -1)):
        x = sign * stride / 2
        parts.append(("cyl", x, side * 0.1, 0.0, hip + 0.04, leg_r, cloth * 0.8))
        # a shoe: heel just behind the leg, toes about two thirds of a foot ahead of it
        parts.append(("box", x + foot_l * 0.5 - 0.06, side * 0.1, 0.0, 0.08, foot_l, 0.1, 0.0, 0.15))
    torso_lo, torso_hi = hip, 0.82 * H
    parts.append(("ell", lean / 2, 0.0, (torso_lo + torso_hi) / 2, rng.uniform(0.11, 0.16), shoulder - 0.06,
                  (torso_hi - torso_lo) / 2 + 0.03, 0.0, cloth))
    swing = rng.uniform(0.0, 0.2)
    upper = 0.19 * H
    forearms_forward = rng.random() < 0.6
    for side, sign in ((-1, -1), (1, 1)):
        y = side * (shoulder - 0.05)
        elbow = torso_hi - upper
        parts.append(("ell", lean + sign * swing / 2, y, torso_hi - upper / 2, 0.05, 0.05, upper / 2, 0.0, cloth))
        if forearms_forward:  # elbow bent: the forearm points ahead
            parts.append(("ell", lean + 0.13, y * 0.9, elbow - 0.03, 0.14, 0.045, 0.05, 0.0, skin))
        else:  # hanging, swinging with the stride
            parts.append(("ell", lean + sign * swing, y, elbow - 0.13, 0.045, 0.045, 0.13, 0.0, skin))
    head_r = rng.uniform(0.09, 0.115)
    parts.append(("ell", lean + 0.05, 0.0, H - head_r, head_r, head_r * 0.85, head_r, 0.0, skin))
    if rng.random() < 0.25:  # backpack
        parts.append(("box", lean - 0.2, 0.0, 0.55 * H, 0.78 * H, 0.18, 0.32, 0.0, float(rng.uniform(0.1, 0.5))))
    return parts


def _cyclist_parts(rng, jitter: float) -> list[tuple]:
    H = rng.uniform(1.6, 1.9)
    rw = rng.uniform(0.31, 0.36)
    wb = rng.uniform(1.0, 1.15)
    metal = float(rng.uniform(0.3, 0.6))
    cloth = float(rng.uniform(0.1, 0.5))
    parts: list[tuple] = []
    for x in (wb / 2, -wb / 2):
        parts.append(("ell", x, 0.0, rw, rw, 0.035, rw, 0.0, 0.08))
    parts.append(("box", 0.0, 0.0, rw + 0.25, rw + 0.32, wb * 0.75, 0.05, 0.0, metal))  # top tube
    parts.append(("box", -0.05, 0.0, rw - 0.05, rw + 0.25, 0.5, 0.05, 0.0, metal))  # down tube
    bar_w = rng.uniform(0.5, 0.68)
    bar_z = rw + rng.uniform(0.55, 0.7)
    parts.append(("box", wb / 2 - 0.12, 0.0, bar_z - 0.03, bar_z + 0.03, 0.06, bar_w, 0.0, metal))
    seat_z = rw + 0.55
    for side in (-1, 1):
        parts.append(("cyl", -0.15 + side * 0.08, side * 0.12, rw - 0.05, seat_z, 0.07, cloth * 0.8))
    torso_lo, torso_hi = seat_z, H - 0.24
    parts.append(("ell", 0.0, 0.0, (torso_lo + torso_hi) / 2, 0.2, 0.18, (torso_hi - torso_lo) / 2 + 0.03,
                  0.0, cloth))
    for side in (-1, 1):
        parts.append(("ell", 0.15, side * (bar_w / 2 - 0.08), (bar_z + torso_hi) / 2 - 0.05, 0.22, 0.05, 0.06,
                      0.0, cloth))
    head_r = rng.uniform(0.1, 0.12)
    parts.append(("ell", 0.12, 0.0, H - head_r, head_r, head_r * 0.9, head_r, 0.0, float(rng.uniform(0.2, 0.6))))
    return parts


def _part_extent(p: tuple) -> tuple[float, float, float, float, float, float]:
    kind = p[0]
    if kind == "box":
        _, x, y, zlo, zhi, l, w, yaw, _ = p
        c, s = abs(math.cos(yaw)), abs(math.sin(yaw))
        ex, ey = l / 2 * c + w / 2 * s, l / 2 * s + w / 2 * c
        return x - ex, x + ex, y - ey, y + ey, zlo, zhi
    if kind == "cyl":
        _, x, y, zlo, zhi, r, _ = p
        return x - r, x + r, y - r, y + r, zlo, zhi
    _, x, y, z, a, b, cc, yaw, _ = p
    c, s = math.cos(yaw), math.sin(yaw)
    ex, ey = math.sqrt((a * c) ** 2 + (b * s) ** 2), math.sqrt((a * s) ** 2 + (b * c) ** 2)
    return x - ex, x + ex, y - ey, y + ey, z - cc, z + cc


def _centre_parts(parts: list[tuple]) -> tuple[list[tuple], float, float, float]:
    """Shift parts so the tight box is centred at x = y = 0 with bottom z = 0; returns (parts, l, w, h)."""
    ext = np.array([_part_extent(p) for p in parts])
    x0, x1 = ext[:, 0].min(), ext[:, 1].max()
    y0, y1 = ext[:, 2].min(), ext[:, 3].max()
    z0, z1 = ext[:, 4].min(), ext[:, 5].max()
    xc, yc = (x0 + x1) / 2, (y0 + y1) / 2
    out = []
    for p in parts:
        if p[0] == "box":
            out.append((p[0], p[1] - xc, p[2] - yc, p[3] - z0, p[4] - z0) + p[5:])
        elif p[0] == "cyl":
            out.append((p[0], p[1] - xc, p[2] - yc, p[3] - z0, p[4] - z0) + p[5:])
        else:
            out.append((p[0], p[1] - xc, p[2] - yc, p[3] - z0) + p[4:])
    return out, x1 - x0, y1 - y0, z1 - z0


def _emit_parts(prims: _Prims, parts: list[tuple], px: float, py: float, gz: float, yaw: float) -> None:
    c, s = math.cos(yaw), math.sin(yaw)
    for p in parts:
        wx, wy = px + c * p[1] - s * p[2], py + s * p[1] + c * p[2]
        if p[0] == "box":
            _, _, _, zlo, zhi, l, w, ly, refl = p
            prims.add_box(wx, wy, gz + zlo, gz + zhi, l, w, yaw + ly, refl)
        elif p[0] == "cyl":
            _, _, _, zlo, zhi, r, refl = p
            prims.add_cyl(wx, wy, gz + zlo, gz + zhi, r, refl)
        else:
            _, _, _, z, a, b, cc, ly, refl = p
            prims.add_ell(wx, wy, gz + z, a, b, cc, yaw + ly, refl)


def _wrap(a: float) -> float:
    return (a + math.pi) % TWO_PI - math.pi


# ---------------------------------------------------------------------------- the world


class _World:
    def __init__(self, rng: np.random.Generator, sensor: SensorConfig, scene: SceneConfig):
        self.rng = rng
        self.scene = scene
        self.prims = _Prims()
        self.occ = _Occupancy()
        self.objects: list[tuple[tuple, int]] = []
        ext = scene.world_extent

        main = _Street(rng, rng.normal(0.0, 0.05), (0.0, 0.0))
        lane = int(rng.integers(main.lanes_r))
        main.set_origin_for_ego(-(lane + 0.5) * main.lane_w + rng.normal(0.0, 0.2))
        self.streets = [main]
        if rng.random() < scene.cross_street_prob:
            s_c = rng.uniform(12.0, 45.0) * rng.choice([-1.0, 1.0])
            angle = main.angle + math.pi / 2 + rng.uniform(-0.25, 0.25)
            self.streets.append(_Street(rng, angle, main.to_world(s_c, 0.0)))
        self.ground = _Ground(rng, scene, sensor.mount_height, self.streets)
        self.ext = ext
        # the ego car around the sensor
        self.occ.add(0.0, 0.0, 2.6, 1.1, 0.0)

        self._buildings()
        self._vegetation_and_poles()
        self._clutter()
        self._objects()

    # -- helpers
    def in_world(self, x, y, lim=None) -> bool:
        lim = self.ext if lim is None else lim
        return abs(x) <= lim and abs(y) <= lim

    def on_road(self, x, y, r=0.0) -> bool:
        return any(st.rect_hits_road(x, y, r, r, 0.0) for st in self.streets)

    def ground_at(self, x, y) -> float:
        return float(self.ground.surface(np.array([x]), np.array([y]))[0])

    def rand_street_point(self, u_fn, s_lim=None):
        rng = self.rng
        st_i = int(rng.integers(len(self.streets))) if len(self.streets) > 1 and rng.random() < 0.35 else 0
        st = self.streets[st_i]
        side = -1 if rng.random() < 0.5 else 1
        s = rng.uniform(-(s_lim or self.ext * 1.4), s_lim or self.ext * 1.4)
        u = u_fn(st, side)
        x, y = st.to_world(s, u)
        return st, side, x, y

    # -- background
    def _buildings(self) -> None:
        rng, sc = self.rng, self.scene
        for st in self.streets:
            for side in (-1, 1):
                setback = rng.uniform(0.0, 3.0) if rng.random() < 0.6 else 0.0
                u_f = st.curb(side) + side * (st.sidewalk + setback)
                s = -self.ext * 1.45 + rng.uniform(0, 10)
                while s < self.ext * 1.45:
                    L = rng.uniform(8.0, 35.0)
                    gap = rng.uniform(1.0, 8.0) if rng.random() < 0.5 else 0.0
                    if rng.random() < sc.building_density:
                        D, H = rng.uniform(8.0, 25.0), rng.uniform(3.5, 22.0)
                        uc = u_f + side * (rng.uniform(0.0, 1.5) + D / 2)
                        cx, cy = st.to_world(s + L / 2, uc)
                        if self.in_world(cx, cy, self.ext + 10) and not any(
                            o.rect_hits_corridor(cx, cy, L / 2, D / 2, st.angle, -0.01) for o in self.streets
                        ) and self.occ.free(cx, cy, L / 2, D / 2, st.angle, margin=-0.01):
                            corners = [st.to_world(s + a, uc + b) for a in (0, L) for b in (-D / 2, D / 2)]
                            zg = self.ground.surface(np.array([p[0] for p in corners] + [cx]),
                                                     np.array([p[1] for p in corners] + [cy]))
                            self.prims.add_box(cx, cy, zg.min() - 1.0, zg[-1] + H, L, D, st.angle,
                                               float(rng.uniform(0.15, 0.6)))
                            self.occ.add(cx, cy, L / 2, D / 2, st.angle)
                    elif sc.building_density > 0 and rng.random() < 0.5:
                        # a wall, fence or hedge along the frontage
                        hedge = rng.random() < 0.4
                        thick = rng.uniform(0.6, 1.2) if hedge else rng.uniform(0.15, 0.3)
                        hgt = rng.uniform(0.8, 1.8) if hedge else rng.uniform(0.8, 2.4)
                        length = L * rng.uniform(0.5, 1.0)
                        cx, cy = st.to_world(s + L / 2, u_f + side * thick / 2)
                        if self.in_world(cx, cy) and not any(
                            o.rect_hits_corridor(cx, cy, length / 2, thick / 2, st.angle, -0.01) for o in self.streets
                        ) and self.occ.free(cx, cy, length / 2, thick / 2, st.angle):
                            g = self.ground_at(cx, cy)
                            refl = rng.uniform(0.3, 0.55) if hedge else rng.uniform(0.15, 0.5)
                            self.prims.add_box(cx, cy, g - 0.3, g + hgt, length, thick, st.angle, float(refl))
                            self.occ.add(cx, cy, length / 2, thick / 2, st.angle)
                    s += L + gap

    def _tree(self, x, y, g) -> None:
        rng = self.rng
        trunk_r = rng.uniform(0.12, 0.25)
        base = rng.uniform(2.2, 3.6)
        a = rng.uniform(1.2, 2.6)
        c = rng.uniform(1.2, 2.5)
        self.prims.add_cyl(x, y, g - 0.2, g + base + c, trunk_r, float(rng.uniform(0.15, 0.3)))
        self.prims.add_ell(x, y, g + base + c, a, a * rng.uniform(0.85, 1.0), c, rng.uniform(0, math.pi),
                           float(rng.uniform(0.3, 0.55)))
        self.occ.add(x, y, trunk_r, trunk_r, 0.0)
        self.occ.add(x, y, a, a, 0.0, g + base, g + base + 2 * c)

    def _vegetation_and_poles(self) -> None:
        rng, sc = self.rng, self.scene
        for st in self.streets:
            for side in (-1, 1):
                # trees along the curb side of the sidewalk
                s = -self.ext * 1.45 + rng.uniform(0, 8)
                u_tree = st.curb(side) + side * rng.uniform(0.8, 1.3)
                while s < self.ext * 1.45:
                    if rng.random() < 0.55 * min(sc.vegetation_density, 1.5):
                        x, y = st.to_world(s, u_tree)
                        if self.in_world(x, y) and not self.on_road(x, y, 0.3) and self.occ.free(x, y, 0.3, 0.3, 0.0):
                            self._tree(x, y, self.ground_at(x, y))
                    s += rng.uniform(7.0, 14.0)
                # street lights
                s = -self.ext * 1.45 + rng.uniform(0, 20)
                while s < self.ext * 1.45:
                    if rng.random() < min(sc.pole_density, 1.0):
                        x, y = st.to_world(s, st.curb(side) + side * 0.45)
                        if self.in_world(x, y) and not self.on_road(x, y, 0.2) and self.occ.free(x, y, 0.2, 0.2, 0.0):
                            g = self.ground_at(x, y)
                            h = rng.uniform(6.0, 9.0)
                            r = rng.uniform(0.09, 0.14)
                            self.prims.add_cyl(x, y, g - 0.2, g + h, r, 0.45)
                            arm = rng.uniform(1.5, 3.0)
                            ax, ay = st.to_world(s, st.curb(side) + side * 0.45 - side * arm / 2)
                            self.prims.add_box(ax, ay, g + h - 0.2, g + h, 0.15, arm, st.angle, 0.45)
                            self.occ.add(x, y, r, r, 0.0)
                    s += rng.uniform(20.0, 35.0) / max(sc.pole_density, 1.0)
                # signs
                s = -self.ext * 1.45 + rng.uniform(0, 30)
                while s < self.ext * 1.45:
                    if rng.random() < 0.5 * min(sc.pole_density, 1.0):
                        x, y = st.to_world(s, st.curb(side) + side * rng.uniform(0.3, 0.7))
                        if self.in_world(x, y) and not self.on_road(x, y, 0.1) and self.occ.free(x, y, 0.3, 0.3, 0.0):
                            g = self.ground_at(x, y)
                            h = rng.uniform(2.4, 3.2)
                            self.prims.add_cyl(x, y, g - 0.2, g + h, rng.uniform(0.035, 0.06), 0.4)
                            size = rng.uniform(0.55, 0.8)
                            self.prims.add_box(x, y, g + h - 0.05, g + h - 0.05 + size, 0.04, size, st.angle, 0.9)
                            self.occ.add(x, y, 0.1, 0.1, 0.0)
                    s += rng.uniform(15.0, 40.0)
        # bushes and trees in lots (off-street), traffic lights at the intersection
        n_lot = int(round(rng.integers(10, 30) * sc.vegetation_density))
        for _ in range(n_lot):
            x, y = rng.uniform(-self.ext, self.ext, 2)
            if any(st.rect_hits_corridor(x, y, 1.5, 1.5, 0.0, 0.0) for st in self.streets):
                continue
            if rng.random() < 0.5:
                if self.occ.free(x, y, 2.5, 2.5, 0.0):
                    self._tree(x, y, self.ground_at(x, y))
            else:
                a = rng.uniform(0.5, 1.6)
                c = rng.uniform(0.4, 1.0)
                if self.occ.free(x, y, a, a, 0.0):
                    g = self.ground_at(x, y)
                    self.prims.add_ell(x, y, g + 0.6 * c, a, a * rng.uniform(0.6, 1.0), c, rng.uniform(0, math.pi),
                                       float(rng.uniform(0.3, 0.55)))
                    self.occ.add(x, y, a, a, 0.0)
        if len(self.streets) > 1 and sc.pole_density > 0:
            main, cross = self.streets
            for su in ((-1, -1), (-1, 1), (1, -1), (1, 1)):
                # corner of the two curbs, pushed onto the sidewalk
                u1 = main.curb(su[0]) + su[0] * 0.6
                u2 = cross.curb(su[1]) + su[1] * 0.6
                x, y = self._corner(main, cross, u1, u2)
                if self.in_world(x, y) and self.occ.free(x, y, 0.3, 0.3, 0.0):
                    g = self.ground_at(x, y)
                    self.prims.add_cyl(x, y, g - 0.2, g + 3.2, 0.1, 0.4)
                    self.prims.add_box(x, y, g + 2.3, g + 3.3, 0.35, 0.35, main.angle, 0.35)
                    self.occ.add(x, y, 0.2, 0.2, 0.0)

    @staticmethod
    def _corner(a: _Street, b: _Street, ua: float, ub: float) -> tuple[float, float]:
        """The point with lateral coordinate ua on street a and ub on street b."""
        m = np.array([[a.nx, a.ny], [b.nx, b.ny]])
        rhs = np.array([ua + a.ox * a.nx + a.oy * a.ny, ub + b.ox * b.nx + b.oy * b.ny])
        x, y = np.linalg.solve(m, rhs)
        return float(x), float(y)

    def _clutter(self) -> None:
        rng, sc = self.rng, self.scene
        n = int(round(rng.integers(30, 50) * sc.clutter_density))
        kinds = ["bin", "bollards", "bench", "barrier", "cones", "bush", "trailer", "dumpster", "hydrant", "box"]
        probs = np.array([0.16, 0.08, 0.1, 0.13, 0.07, 0.14, 0.08, 0.08, 0.06, 0.1])
        for _ in range(n):
            kind = kinds[int(rng.choice(len(kinds), p=probs / probs.sum()))]
            self._clutter_item(kind)

    def _clutter_item(self, kind: str) -> None:
        rng = self.rng
        walk = lambda st, side: st.curb(side) + side * rng.uniform(0.5, st.sidewalk - 0.4)  # noqa: E731
        edge = lambda st, side: st.curb(side) - side * rng.uniform(0.4, 1.2)  # noqa: E731
        park = lambda st, side: st.curb(side) - side * PARK_W / 2  # noqa: E731
        lot = lambda st, side: st.curb(side) + side * (st.sidewalk + rng.uniform(1.0, 12.0))  # noqa: E731
        where = {"bin": walk, "bollards": walk, "bench": walk, "barrier": edge, "cones": edge, "bush": walk,
                 "trailer": park, "dumpster": lot, "hydrant": walk, "box": lot}[kind]
        st, side, x, y = self.rand_street_point(where)
        if not self.in_world(x, y):
            return
        yaw = st.angle + (rng.normal(0, 0.05) if rng.random() < 0.8 else rng.uniform(-math.pi, math.pi))
        parts: list[tuple]
        if kind == "bin":
            if rng.random() < 0.5:
                parts = [("box", 0, 0, 0, rng.uniform(0.9, 1.2), rng.uniform(0.55, 0.75), rng.uniform(0.55, 0.75),
                          0.0, float(rng.uniform(0.1, 0.5)))]
            else:
                parts = [("cyl", 0, 0, 0, rng.uniform(0.8, 1.1), rng.uniform(0.25, 0.35), float(rng.uniform(0.1, 0.5)))]
        elif kind == "bollards":
            k = int(rng.integers(3, 7))
            gap = rng.uniform(1.2, 2.0)
            r = rng.uniform(0.07, 0.12)
            h = rng.uniform(0.7, 1.0)
            parts = [("cyl", (i - (k - 1) / 2) * gap, 0, 0, h, r, 0.5) for i in range(k)]
        elif kind == "bench":
            L = rng.uniform(1.5, 2.2)
            parts = [("box", 0, 0, 0.4, 0.48, L, 0.5, 0.0, 0.3), ("box", 0, -0.22, 0.48, 0.9, L, 0.06, 0.0, 0.3),
                     ("box", 0.45 * L, 0, 0, 0.4, 0.08, 0.45, 0.0, 0.3), ("box", -0.45 * L, 0, 0, 0.4, 0.08, 0.45, 0.0, 0.3)]
        elif kind == "barrier":
            k = int(rng.integers(1, 4))
            L, h = rng.uniform(1.8, 3.0), rng.uniform(0.8, 1.1)
            parts = [("box", (i - (k - 1) / 2) * (L + 0.05), 0, 0, h, L, rng.uniform(0.4, 0.6), 0.0, 0.55)
                     for i in range(k)]
        elif kind == "cones":
            k = int(rng.integers(2, 6))
            parts = [("ell", i * rng.uniform(1.5, 3.0), rng.normal(0, 0.2), 0.35, 0.15, 0.15, 0.35, 0.0, 0.7)
                     for i in range(k)]
        elif kind == "bush":
            a = rng.uniform(0.4, 1.1)
            c = rng.uniform(0.35, 0.8)
            parts = [("ell", 0, 0, 0.7 * c, a, a * rng.uniform(0.6, 1.0), c, 0.0, float(rng.uniform(0.3, 0.55)))]
        elif kind == "trailer":
            L, W, H = rng.uniform(2.5, 4.5), rng.uniform(1.6, 2.1), rng.uniform(1.1, 2.2)
            parts = [("box", 0, 0, 0.45, H, L, W, 0.0, float(rng.uniform(0.2, 0.6))),
                     ("box", L / 2 + 0.6, 0, 0.4, 0.5, 1.2, 0.12, 0.0, 0.3)]
            for sgn in (-1, 1):
                parts.append(("ell", 0.0, sgn * (W / 2 - 0.1), 0.3, 0.3, 0.1, 0.3, 0.0, 0.05))
        elif kind == "dumpster":
            parts = [("box", 0, 0, 0, rng.uniform(1.2, 1.6), rng.uniform(1.6, 2.4), rng.uniform(1.0, 1.6), 0.0,
                      float(rng.uniform(0.15, 0.5)))]
        elif kind == "hydrant":
            parts = [("cyl", 0, 0, 0, rng.uniform(0.6, 0.8), rng.uniform(0.11, 0.15), 0.6)]
        else:  # "box": crates, electrical cabinets, kiosks
            parts = [("box", 0, 0, 0, rng.uniform(0.8, 2.5), rng.uniform(0.6, 2.5), rng.uniform(0.5, 1.5), 0.0,
                      float(rng.uniform(0.15, 0.6)))]
        parts, L, W, H = _centre_parts(parts)
        on_road_ok = kind in ("barrier", "cones", "trailer")
        if not on_road_ok and self.on_road(x, y, max(L, W) / 2):
            return
        if not self.occ.free(x, y, L / 2, W / 2, yaw, margin=0.3):
            return
        g = self.ground_at(x, y)
        _emit_parts(self.prims, parts, x, y, g, yaw)
        self.occ.add(x, y, L / 2, W / 2, yaw, g, g + H)

    # -- labelled objects
    def _place(self, parts: list[tuple], cls: int, pose_fn, tries: int = 25, margin: float = 0.25) -> bool:
        parts, L, W, H = _centre_parts(parts)
        lim = self.scene.region
        for _ in range(tries):
            x, y, yaw = pose_fn()
            if not (abs(x) <= lim and abs(y) <= lim):
                continue
            g = self.ground_at(x, y)
            if not self.occ.free(x, y, L / 2, W / 2, yaw, g, g + H, margin=margin):
                continue
            _emit_parts(self.prims, parts, x, y, g, yaw)
            self.occ.add(x, y, L / 2, W / 2, yaw, g, g + H)
            self.objects.append(((x, y, g + H / 2, L, W, H, _wrap(yaw)), cls))
            return True
        return False

    def _objects(self) -> None:
        rng, sc = self.rng, self.scene
        lim = sc.region
        n_veh = int(rng.integers(sc.vehicles[0], sc.vehicles[1] + 1))
        n_ped = int(rng.integers(sc.pedestrians[0], sc.pedestrians[1] + 1))
        n_cyc = int(rng.integers(sc.cyclists[0], sc.cyclists[1] + 1))
        jit = sc.size_jitter

        def pick():
            st = self.streets[int(rng.integers(len(self.streets)))] if len(self.streets) > 1 and rng.random() < 0.35 \
                else self.streets[0]
            return st, (-1 if rng.random() < 0.5 else 1), rng.uniform(-lim * 1.45, lim * 1.45)

        def parked():
            st, side, s = pick()
            if not (st.park_l if side > 0 else st.park_r):
                side = -side
            u = st.curb(side) - side * rng.uniform(1.0, 1.25)
            x, y = st.to_world(s, u)
            return x, y, st.yaw_for(side) + rng.normal(0, 0.03)

        def traffic():
            st, side, s = pick()
            lanes = st.lanes_l if side > 0 else st.lanes_r
            k = int(rng.integers(lanes))
            u = side * (k + 0.5) * st.lane_w + rng.normal(0, 0.25)
            x, y = st.to_world(s, u)
            return x, y, st.yaw_for(side) + rng.normal(0, 0.04)

        def lot():
            st, side, s = pick()
            u = st.curb(side) + side * (st.sidewalk + rng.uniform(1.5, 15.0))
            x, y = st.to_world(s, u)
            return x, y, rng.uniform(-math.pi, math.pi)

        def sidewalk():
            st, side, s = pick()
            u = st.curb(side) + side * rng.uniform(0.4, st.sidewalk - 0.3)
            x, y = st.to_world(s, u)
            r = rng.random()
            yaw = st.angle + (math.pi if rng.random() < 0.5 else 0.0)
            if r < 0.2:
                yaw = rng.uniform(-math.pi, math.pi)
            return x, y, yaw + rng.normal(0, 0.15)

        def crossing():
            st, side, s = pick()
            u = rng.uniform(st.u_lo, st.u_hi)
            x, y = st.to_world(s, u)
            return x, y, st.angle + math.pi / 2 * (1 if rng.random() < 0.5 else -1) + rng.normal(0, 0.3)

        def bike_lane():
            st, side, s = pick()
            parking = st.park_l if side > 0 else st.park_r
            u = st.curb(side) - side * ((PARK_W if parking else 0.0) + rng.uniform(0.5, 0.9))
            x, y = st.to_world(s, u)
            return x, y, st.yaw_for(side) + rng.normal(0, 0.08)

        for _ in range(n_veh):
            r = rng.random()
            fn = parked if r < 0.45 else traffic if r < 0.8 else lot
            self._place(_vehicle_parts(rng, jit), VEHICLE, fn, margin=0.3)
        for _ in range(n_ped):
            r = rng.random()
            if r < 0.15 and self.objects and self.objects[-1][1] == PEDESTRIAN:
                bx, by = self.objects[-1][0][:2]  # walk in a group

                def fn(bx=bx, by=by):
                    yaw = self.objects[-1][0][6]
                    return bx + rng.normal(0, 1.0), by + rng.normal(0, 1.0), yaw + rng.normal(0, 0.2)
            else:
                fn = sidewalk if r < 0.8 else crossing
            self._place(_pedestrian_parts(rng, jit), PEDESTRIAN, fn, margin=0.15)
        for _ in range(n_cyc):
            r = rng.random()
            fn = bike_lane if r < 0.7 else traffic if r < 0.85 else sidewalk
            self._place(_cyclist_parts(rng, jit), CYCLIST, fn, margin=0.2)


# ============================================================================ ray casting

_GROUND, _BOX, _CYL, _ELL = 0, 1, 2, 3
_NEWTON_STEPS = 5


def _cull(cx, cy, rad, zlo, zhi, elev, n_az, phase, max_range):
    """Beam band [b0, b0+nb) and column band [j0, j0+nc) (mod n_az) each primitive can hit."""
    dist = np.hypot(cx, cy)
    full = dist <= rad + 1e-6
    alpha = np.arcsin(np.clip(rad / np.maximum(dist, 1e-9), 0.0, 1.0))
    phi = np.arctan2(cy, cx)
    step = TWO_PI / n_az
    j0 = np.ceil((phi - alpha - phase) / step).astype(np.int64)
    j1 = np.floor((phi + alpha - phase) / step).astype(np.int64)
    nc = np.clip(j1 - j0 + 1, 0, n_az)
    j0 = np.where(full, 0, j0)
    nc = np.where(full, n_az, nc)
    dmin = np.maximum(dist - rad, 0.0)
    dmax = dist + rad
    emin = np.minimum(np.arctan2(zlo, dmin), np.arctan2(zlo, dmax))
    emax = np.maximum(np.arctan2(zhi, dmin), np.arctan2(zhi, dmax))
    b0 = np.searchsorted(elev, emin - 1e-9, side="left")
    b1 = np.searchsorted(elev, emax + 1e-9, side="right")
    nb = np.where(dist - rad > max_range, 0, b1 - b0)
    return b0, nb, j0, nc


def _pairs(b0, nb, j0, nc, n_az):
    """All candidate (primitive, ray) pairs of the bands, as flat index arrays."""
    cnt = nb * nc
    total = int(cnt.sum())
    if total == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    prim = np.repeat(np.arange(len(cnt)), cnt)
    start = np.cumsum(cnt) - cnt
    local = np.arange(total) - start[prim]
    nbp = nb[prim]
    col = j0[prim] + local // nbp
    beam = b0[prim] + local % nbp
    return prim, beam * n_az + col % n_az


def _hit_boxes(B, prim, dx, dy, dz):
    cx, cy, cz = B[prim, 0], B[prim, 1], B[prim, 2]
    hl, hw, hh = B[prim, 3], B[prim, 4], B[prim, 5]
    c, s = B[prim, 8], B[prim, 9]
    ox, oy = -(cx * c + cy * s), -(-cx * s + cy * c)
    lx, ly = dx * c + dy * s, -dx * s + dy * c
    with np.errstate(divide="ignore", invalid="ignore"):
        ix, iy, iz = 1.0 / lx, 1.0 / ly, 1.0 / dz
        t1, t2 = (-hl - ox) * ix, (hl - ox) * ix
        tn, tf = np.fmin(t1, t2), np.fmax(t1, t2)
        t1, t2 = (-hw - oy) * iy, (hw - oy) * iy
        tn, tf = np.fmax(tn, np.fmin(t1, t2)), np.fmin(tf, np.fmax(t1, t2))
        t1, t2 = (-hh + cz) * iz, (hh + cz) * iz
        tn, tf = np.fmax(tn, np.fmin(t1, t2)), np.fmin(tf, np.fmax(t1, t2))
    return np.where((tn <= tf) & (tn > 0), tn, np.inf)


def _hit_cylinders(C, prim, dx, dy, dz):
    cx, cy, zlo, zhi, r = C[prim, 0], C[prim, 1], C[prim, 2], C[prim, 3], C[prim, 4]
    a = dx * dx + dy * dy
    b = -2.0 * (cx * dx + cy * dy)
    cc = cx * cx + cy * cy - r * r
    disc = b * b - 4 * a * cc
    with np.errstate(divide="ignore", invalid="ignore"):
        ts = (-b - np.sqrt(np.maximum(disc, 0.0))) / (2 * a)
        z = ts * dz
        t = np.where((disc >= 0) & (ts > 0) & (z >= zlo) & (z <= zhi), ts, np.inf)
        for zc in (zhi, zlo):
            tc = zc / dz
            px, py = tc * dx - cx, tc * dy - cy
            ok = (tc > 0) & (px * px + py * py <= r * r)
            t = np.where(ok & (tc < t), tc, t)
    return t


def _hit_ellipsoids(E, prim, dx, dy, dz):
    cx, cy, cz = E[prim, 0], E[prim, 1], E[prim, 2]
    ia, ib, ic = E[prim, 8], E[prim, 9], E[prim, 10]
    c, s = E[prim, 11], E[prim, 12]
    ox, oy, oz = -(cx * c + cy * s) * ia, -(-cx * s + cy * c) * ib, -cz * ic
    lx, ly, lz = (dx * c + dy * s) * ia, (-dx * s + dy * c) * ib, dz * ic
    A = lx * lx + ly * ly + lz * lz
    Bh = ox * lx + oy * ly + oz * lz
    C = ox * ox + oy * oy + oz * oz - 1.0
    disc = Bh * Bh - A * C
    t = (-Bh - np.sqrt(np.maximum(disc, 0.0))) / A
    return np.where((disc >= 0) & (t > 0), t, np.inf)


def _ground_hits(ground: _Ground, dx, dy, dz, t_max: float):
    """Range of the first ground hit of each ray (inf if none within t_max)."""
    n = dx.shape[0]
    t_out = np.full(n, np.inf)
    slope = ground.gx * dx + ground.gy * dy
    den = dz - slope
    idx = np.nonzero(den < -1e-4)[0]
    if idx.size == 0:
        return t_out
    dxi, dyi, deni = dx[idx], dy[idx], den[idx]
    waves = [(a, wx * dxi + wy * dyi, ph, sp)
             for a, wx, wy, ph, sp in zip(ground.amp, ground.wx, ground.wy, ground.phase, ground.sin_phase) if a]

    def solve(base):
        t = np.minimum(base / deni, 4 * t_max)
        for _ in range(_NEWTON_STEPS if waves else 0):
            f = t * deni - base
            fp = deni.copy()
            for a, w, ph, sp in waves:
                arg = w * t + ph
                f -= a * (np.sin(arg) - sp)
                fp -= a * w * np.cos(arg)
            step = np.where(fp < -1e-6, f / fp, 0.0)
            t = np.clip(t - step, 0.0, 4 * t_max)
        if waves:
            f = t * deni - base
            for a, w, ph, sp in waves:
                f -= a * (np.sin(w * t + ph) - sp)
            t = np.where(np.abs(f) < 1e-4, t, np.inf)
        return t

    t_road = solve(ground.base)
    if ground.curb == 0:
        t_out[idx] = np.where(t_road <= t_max, t_road, np.inf)
        return t_out
    t_side = solve(ground.base + ground.curb)
    ok_s = np.isfinite(t_side) & (t_side <= t_max)
    ts = np.where(ok_s, t_side, 0.0)
    side_raised = ok_s & ~ground.is_road(ts * dxi, ts * dyi)
    tr = np.where(np.isfinite(t_road), t_road, 0.0)
    road_ok = np.isfinite(t_road) & ground.is_road(tr * dxi, tr * dyi)
    t = np.where(side_raised, t_side, np.where(road_ok, t_road, np.inf))
    # rays that go below the sidewalk level over the road and are below the road level
    # over a raised area: they hit a curb face in between; find it by bisection.
    curb = ok_s & ~side_raised & np.isfinite(t_road) & ~road_ok
    if curb.any():
        k = np.nonzero(curb)[0]
        lo, hi = t_side[k], t_road[k]
        for _ in range(10):
            mid = (lo + hi) / 2
            road = ground.is_road(mid * dxi[k], mid * dyi[k])
            lo, hi = np.where(road, mid, lo), np.where(road, hi, mid)
        t[k] = hi
    t_out[idx] = np.where(t <= t_max, t, np.inf)
    return t_out


def _prim_arrays(prims: _Prims):
    B = np.array(prims.box, dtype=np.float64).reshape(-1, 8)
    B = np.concatenate([B, np.cos(B[:, 6:7]), np.sin(B[:, 6:7])], axis=1)
    C = np.array(prims.cyl, dtype=np.float64).reshape(-1, 6)
    E = np.array(prims.ell, dtype=np.float64).reshape(-1, 8)
    E = np.concatenate([E, 1.0 / E[:, 3:6], np.cos(E[:, 6:7]), np.sin(E[:, 6:7])], axis=1)
    return B, C, E


def _raycast(world: _World, sensor: SensorConfig, rng: np.random.Generator) -> np.ndarray:
    elev = np.sort(np.radians(np.asarray(sensor.beam_elevations_deg, dtype=np.float64)))
    n_az = sensor.azimuth_steps
    step = TWO_PI / n_az
    phase = float(rng.uniform(0.0, step))
    az = phase + step * np.arange(n_az)
    ce, se = np.cos(elev), np.sin(elev)
    ca, sa = np.cos(az), np.sin(az)
    dx = (ce[:, None] * ca[None, :]).ravel()
    dy = (ce[:, None] * sa[None, :]).ravel()
    dz = np.repeat(se, n_az)
    n_rays = dx.shape[0]
    t_max = sensor.max_range

    t_best = _ground_hits(world.ground, dx, dy, dz, t_max + 1.0)
    kind = np.zeros(n_rays, dtype=np.int8)
    pidx = np.zeros(n_rays, dtype=np.int64)

    B, C, E = _prim_arrays(world.prims)
    hits = []
    if len(B):
        rad = np.hypot(B[:, 3], B[:, 4])
        cull = _cull(B[:, 0], B[:, 1], rad, B[:, 2] - B[:, 5], B[:, 2] + B[:, 5], elev, n_az, phase, t_max)
        prim, ray = _pairs(*cull, n_az)
        hits.append((_BOX, prim, ray, _hit_boxes(B, prim, dx[ray], dy[ray], dz[ray])))
    if len(C):
        cull = _cull(C[:, 0], C[:, 1], C[:, 4], C[:, 2], C[:, 3], elev, n_az, phase, t_max)
        prim, ray = _pairs(*cull, n_az)
        hits.append((_CYL, prim, ray, _hit_cylinders(C, prim, dx[ray], dy[ray], dz[ray])))
    if len(E):
        rad = np.maximum(E[:, 3], E[:, 4])
        cull = _cull(E[:, 0], E[:, 1], rad, E[:, 2] - E[:, 5], E[:, 2] + E[:, 5], elev, n_az, phase, t_max)
        prim, ray = _pairs(*cull, n_az)
        hits.append((_ELL, prim, ray, _hit_ellipsoids(E, prim, dx[ray], dy[ray], dz[ray])))
    kept = []
    for code, prim, ray, t in hits:
        ok = t <= t_max + 1.0
        prim, ray, t = prim[ok], ray[ok], t[ok]
        np.minimum.at(t_best, ray, t)
        kept.append((code, prim, ray, t))
    for code, prim, ray, t in kept:
        win = t == t_best[ray]
        kind[ray[win]] = code
        pidx[ray[win]] = prim[win]

    valid = np.isfinite(t_best) & (t_best <= t_max) & (t_best >= sensor.min_range)
    if sensor.dropout > 0:
        valid &= rng.random(n_rays) >= sensor.dropout
    rays = np.nonzero(valid)[0]
    t = t_best[rays]
    rdx, rdy, rdz = dx[rays], dy[rays], dz[rays]
    px, py, pz = t * rdx, t * rdy, t * rdz
    k = kind[rays]
    pi = pidx[rays]

    # surface normal and reflectivity of each return
    nx, ny, nz = np.zeros_like(t), np.zeros_like(t), np.ones_like(t)
    refl = np.zeros_like(t)
    m = k == _GROUND
    if m.any():
        gx, gy = world.ground.gradient(px[m], py[m])
        nx[m], ny[m] = -gx, -gy
        refl[m] = world.ground.reflectivity(px[m], py[m])
    m = k == _BOX
    if m.any():
        b = B[pi[m]]
        c, s = b[:, 8], b[:, 9]
        qx, qy, qz = px[m] - b[:, 0], py[m] - b[:, 1], pz[m] - b[:, 2]
        lx, ly = qx * c + qy * s, -qx * s + qy * c
        rx, ry, rz = np.abs(lx) / b[:, 3], np.abs(ly) / b[:, 4], np.abs(qz) / b[:, 5]
        face = np.argmax(np.stack([rx, ry, rz]), axis=0)
        nlx = np.where(face == 0, np.sign(lx), 0.0)
        nly = np.where(face == 1, np.sign(ly), 0.0)
        nx[m], ny[m], nz[m] = nlx * c - nly * s, nlx * s + nly * c, np.where(face == 2, np.sign(qz), 0.0)
        refl[m] = b[:, 7]
    m = k == _CYL
    if m.any():
        cy_ = C[pi[m]]
        qx, qy = px[m] - cy_[:, 0], py[m] - cy_[:, 1]
        cap = (np.abs(pz[m] - cy_[:, 3]) < 1e-6) | (np.abs(pz[m] - cy_[:, 2]) < 1e-6)
        nx[m], ny[m] = np.where(cap, 0.0, qx), np.where(cap, 0.0, qy)
        nz[m] = np.where(cap, 1.0, 0.0)
        refl[m] = cy_[:, 5]
    m = k == _ELL
    if m.any():
        e = E[pi[m]]
        c, s = e[:, 11], e[:, 12]
        qx, qy, qz = px[m] - e[:, 0], py[m] - e[:, 1], pz[m] - e[:, 2]
        lx, ly = (qx * c + qy * s) * e[:, 8] ** 2, (-qx * s + qy * c) * e[:, 9] ** 2
        nx[m], ny[m], nz[m] = lx * c - ly * s, lx * s + ly * c, qz * e[:, 10] ** 2
        refl[m] = e[:, 7]
    norm = np.sqrt(nx * nx + ny * ny + nz * nz)
    cos_inc = np.abs(nx * rdx + ny * rdy + nz * rdz) / np.maximum(norm, 1e-12)
    amb = sensor.intensity_ambient
    intensity = refl * (amb + (1 - amb) * cos_inc)
    if sensor.intensity_noise_std > 0:
        intensity = intensity + sensor.intensity_noise_std * rng.standard_normal(t.shape[0])
    intensity = np.clip(intensity, 0.0, 1.0)

    if sensor.range_noise_std > 0:
        t_noisy = t + sensor.range_noise_std * rng.standard_normal(t.shape[0])
        keep = (t_noisy <= t_max) & (t_noisy >= sensor.min_range)
        scale = t_noisy / t
        px, py, pz = px * scale, py * scale, pz * scale
        px, py, pz, intensity = px[keep], py[keep], pz[keep], intensity[keep]
    return np.stack([px, py, pz, intensity], axis=1).astype(np.float32)


# ============================================================================ public API


def _count_points(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """``count_points_in_boxes`` on the points that can possibly be in a box (exactly equal
    to counting on all points: the decision per (box, point) does not depend on the others)."""
    m = boxes.shape[0]
    if m == 0 or points.shape[0] == 0:
        return np.zeros(m, dtype=np.int64)
    order = np.argsort(points[:, 0], kind="stable")
    xs = points[order, 0]
    reach = np.hypot(boxes[:, 3], boxes[:, 4]).astype(np.float64) / 2 + 0.05
    lo = np.searchsorted(xs, boxes[:, 0] - reach, side="left")
    hi = np.searchsorted(xs, boxes[:, 0] + reach, side="right")
    counts = np.zeros(m, dtype=np.int64)
    for i in range(m):
        sel = order[lo[i]:hi[i]]
        sel = sel[np.abs(points[sel, 1] - boxes[i, 1]) <= reach[i]]
        if sel.size:
            counts[i] = int(np.asarray(count_points_in_boxes(points[sel], boxes[i : i + 1]))[0])
    return counts


def simulate_frame(seed: int, sensor: SensorConfig | None = None, scene: SceneConfig | None = None,
                   frame_id: str | None = None) -> Frame:
    """Simulate one LiDAR frame; depends only on the arguments (bit-identical for a seed).

    Args:
        seed: integer seed of ``numpy.random.default_rng``.
        sensor: the sensor (default ``SensorConfig()``).
        scene: the world knobs (default ``SceneConfig()``).
        frame_id: id of the returned frame (default ``"seed<seed>"``).
    Returns:
        A :class:`~haltdet.data.frames.Frame` with float32 points (N, 4) and labels whose
        ``num_points`` is ``count_points_in_boxes(points, boxes)`` on the stored arrays.
    """
    sensor = SensorConfig() if sensor is None else sensor
    scene = SceneConfig() if scene is None else scene
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    rng = np.random.default_rng(int(seed))
    world = _World(rng, sensor, scene)
    points = _raycast(world, sensor, rng)
    if world.objects:
        boxes = np.array([o[0] for o in world.objects], dtype=np.float32)
        labels = np.array([o[1] for o in world.objects], dtype=np.int64)
    else:
        boxes = np.zeros((0, 7), dtype=np.float32)
        labels = np.zeros(0, dtype=np.int64)
    num_points = _count_points(points, boxes)
    return Frame(
        frame_id=f"seed{int(seed)}" if frame_id is None else str(frame_id),
        points=points,
        boxes=boxes,
        labels=labels,
        num_points=num_points,
        difficulty=difficulty_from_points(num_points),
    )


def frame_seed(dataset_seed: int, index: int) -> int:
    """The seed of frame ``index`` of a dataset generated with ``dataset_seed``."""
    return int(np.random.SeedSequence([int(dataset_seed), int(index)]).generate_state(2, np.uint64)[0] >> 1)


def _gen_one(args) -> str:
    out_dir, i, seed, sensor_d, scene_d = args
    frame = simulate_frame(frame_seed(seed, i), SensorConfig.from_dict(sensor_d), SceneConfig.from_dict(scene_d),
                           frame_id=f"{i:06d}")
    write_frame(out_dir, frame)
    return frame.frame_id


def _worker_init() -> None:
    try:
        import torch

        torch.set_num_threads(1)
    except Exception:  # pragma: no cover - torch is a hard dependency; be lenient in workers
        pass


def generate_dataset(out_dir, frames: int, seed: int, sensor: SensorConfig | None = None,
                     scene: SceneConfig | None = None, workers: int = 1, progress: bool = True) -> Path:
    """Simulate ``frames`` frames and write them as a haltdet dataset in ``out_dir``.

    Frame ``i`` is ``simulate_frame(frame_seed(seed, i), sensor, scene)`` with id ``f"{i:06d}"``,
    so a dataset is reproducible and frames do not depend on ``workers``. An existing
    haltdet dataset in ``out_dir`` is replaced; any other non-empty directory is refused.
    """
    out = Path(out_dir)
    if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < 0:
        raise InputError(f"frames must be a non-negative integer, got {frames!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    if workers < 1:
        raise InputError(f"workers must be >= 1, got {workers}")
    sensor = SensorConfig() if sensor is None else sensor
    scene = SceneConfig() if scene is None else scene
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not is_dataset_dir(out):
            raise InputError(
                f"{out}: directory is not empty and is not a haltdet dataset (no valid {INDEX_FILE}); "
                "refusing to overwrite it - choose an empty or new directory"
            )
        old = read_dataset_index(out)
        for fid in old["frames"]:
            (out / FRAMES_DIR / f"{fid}.npz").unlink(missing_ok=True)
        frames_dir = out / FRAMES_DIR
        if frames_dir.is_dir() and not any(frames_dir.iterdir()):
            shutil.rmtree(frames_dir)
    meta = {"source": "synth", "simulator_version": SIMULATOR_VERSION, "seed": int(seed),
            "sensor": sensor.to_dict(), "scene": scene.to_dict()}
    # an index marked incomplete first: an interrupted run leaves a directory we may overwrite
    write_dataset_index(out, [], dict(meta, complete=False))
    (out / FRAMES_DIR).mkdir(parents=True, exist_ok=True)
    jobs = [(str(out), i, int(seed), sensor.to_dict(), scene.to_dict()) for i in range(int(frames))]
    ids: list[str] = []
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc=f"simulating {out.name}", unit="frame", disable=not progress)
    try:
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                ids.append(_gen_one(job))
                bar.update(1)
        else:
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(workers, initializer=_worker_init) as pool:
                for fid in pool.imap(_gen_one, jobs, chunksize=1):
                    ids.append(fid)
                    bar.update(1)
    finally:
        bar.close()
    write_dataset_index(out, ids, dict(meta, complete=True))
    return out
