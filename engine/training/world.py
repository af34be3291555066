"""The mini model's procedural world (MINI-DATASET.md): shapes, aspects, colours, held-out pairs, exact SDFs.
(Their captions: ``captions``.)

Geometry: every object is one of 8 base shapes, stretched along Z by its aspect and scaled uniformly so that the
unrotated axis-aligned bounding box has its largest side = 1.5 (centred at the origin); cube, pyramid and octahedron
get a yaw about Z. A non-uniform Z scaling of an SDF is not a distance, so each *scaled* shape has its own distance:
  * cube: exact box distance;
  * sphere / cylinder / cone / torus / capsule: solids of revolution -> the exact 2-D distance to the meridian
    cross-section evaluated at (rho, z) (ellipses by Eberly's monotone root bisection; the capsule is a union, exact
    outside and a lower bound of the depth inside);
  * pyramid / octahedron: convex polyhedra -> minimum point-triangle distance over the faces, sign from the planes.
``fast=True`` gives cheaper conservative bounds with the *same zero set* (for sphere tracing).

Sign conventions: ``object_sdf`` is POSITIVE INSIDE (Shap-E's decoder convention); ``signed_distance`` is its
negative (the usual negative-inside distance). Units: object frame, Z up, front -Y.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..colors import linear_to_srgb, srgb_to_linear  # noqa: F401  (re-exported for the training code)

SHAPES = ("cube", "sphere", "cylinder", "cone", "torus", "pyramid", "capsule", "octahedron")
ASPECTS = ("regular", "tall", "flat")
ASPECT_Z = (1.0, 2.0, 0.4)
YAWED_SHAPES = frozenset({0, 5, 7})  # cube, pyramid, octahedron
TARGET_SIZE = 1.5
TORUS_TUBE = 0.35

# (name, hex) in the contract's row-major order: red = 0 ... brown = 11.
_PALETTE = (
    ("red", "#D62728"), ("cyan", "#17BECF"), ("white", "#F2F2F2"),
    ("orange", "#FF7F0E"), ("blue", "#1F4FD6"), ("black", "#1A1A1A"),
    ("yellow", "#F2D21B"), ("purple", "#8C4FBF"), ("gray", "#808080"),
    ("green", "#2CA02C"), ("pink", "#F7A1C4"), ("brown", "#8C564B"),
)


@dataclass(frozen=True)
class Color:
    name: str
    hex: str

    @property
    def srgb(self) -> tuple[float, float, float]:
        h = self.hex.lstrip("#")
        return tuple(int(h[i:i + 2], 16) / 255.0 for i in (0, 2, 4))  # type: ignore[return-value]

    @property
    def linear(self) -> tuple[float, float, float]:
        return tuple(srgb_to_linear_scalar(u) for u in self.srgb)  # type: ignore[return-value]


COLORS = tuple(Color(n, h) for n, h in _PALETTE)
COLOR_NAMES = tuple(c.name for c in COLORS)
N_KINDS = len(SHAPES) * len(ASPECTS) * len(COLORS)  # 288


def srgb_to_linear_scalar(u: float) -> float:
    return u / 12.92 if u <= 0.04045 else ((u + 0.055) / 1.055) ** 2.4


def is_held_out(shape_idx: int, color_idx: int) -> bool:
    """The contract's held-out rule (every aspect): (shape + colour) % 7 == 3."""
    return (shape_idx + color_idx) % 7 == 3


def kind_index(shape: int, aspect: int, color: int) -> int:
    """Kinds are numbered shape-major: ((shape * 3) + aspect) * 12 + colour, 0..287."""
    return (shape * len(ASPECTS) + aspect) * len(COLORS) + color


def kind_from_index(k: int) -> tuple[int, int, int]:
    sa, c = divmod(k, len(COLORS))
    s, a = divmod(sa, len(ASPECTS))
    return s, a, c


@dataclass(frozen=True)
class ObjectSpec:
    """One object: indices into SHAPES / ASPECTS / COLORS, yaw in radians, value_jitter (sRGB factor - 1)."""

    shape: int
    aspect: int
    color: int
    yaw: float = 0.0
    value_jitter: float = 0.0

    @property
    def kind(self) -> int:
        return kind_index(self.shape, self.aspect, self.color)

    @property
    def held_out(self) -> bool:
        return is_held_out(self.shape, self.color)

    def srgb(self) -> torch.Tensor:
        """Object colour (3,) in sRGB with the value jitter applied."""
        return (torch.tensor(COLORS[self.color].srgb) * (1.0 + self.value_jitter)).clamp(0, 1)

    def linear_rgb(self) -> torch.Tensor:
        return srgb_to_linear(self.srgb())

    def describe(self) -> str:
        a = "" if self.aspect == 0 else ASPECTS[self.aspect] + " "
        return f"{a}{COLOR_NAMES[self.color]} {SHAPES[self.shape]}"


def allowed_kinds(split: str = "train") -> list[int]:
    """Kind indices of a split: 'train' (not held out), 'heldout', or 'all'."""
    return list(_allowed_kinds(split))


@lru_cache(maxsize=None)
def _allowed_kinds(split: str) -> tuple[int, ...]:
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', not {split!r}")
    out = []
    for k in range(N_KINDS):
        s, _, c = kind_from_index(k)
        h = is_held_out(s, c)
        if split == "all" or (split == "heldout") == h:
            out.append(k)
    return tuple(out)


def analogies(kind: int, have: set[int] | frozenset[int]) -> list[tuple[int, int, int]]:
    """Every (A, B, C) of kinds in ``have`` that composes ``kind`` = (g, c) as A - B + C: A = (g, c'),
    B = (g', c'), C = (g', c) with g' != g (another shape-aspect) and c' != c (another colour)."""
    n_c = len(COLORS)
    g, c = divmod(kind, n_c)
    out = []
    for g2 in range(N_KINDS // n_c):
        for c2 in range(n_c):
            abc = (g * n_c + c2, g2 * n_c + c2, g2 * n_c + c)
            if g2 != g and c2 != c and all(k in have for k in abc):
                out.append(abc)
    return out


def sample_spec(generator: torch.Generator, *, split: str = "train", jitter: float = 0.05,
                yaw: float | None = None) -> ObjectSpec:
    """Draw one object uniformly over the kinds of ``split``; random yaw for yawed shapes, value jitter +-jitter."""
    kinds = _allowed_kinds(split)
    k = kinds[int(torch.randint(len(kinds), (1,), generator=generator))]
    s, a, c = kind_from_index(k)
    u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
    y = (u[0] * math.pi / 2 if yaw is None else yaw) if s in YAWED_SHAPES else 0.0
    return ObjectSpec(s, a, c, yaw=y, value_jitter=(2 * u[1] - 1) * jitter)


def sample_specs(n: int, generator: torch.Generator, **kw) -> list[ObjectSpec]:
    return [sample_spec(generator, **kw) for _ in range(n)]


# ----------------------------------------------------------------------------------------------------------------
# Geometry parameters: 4 numbers per object, meaning per shape (after aspect and normalisation)
#   cube (hx, hy, hz) | sphere (r, c) | cylinder (r, h) | cone (r, h) | torus (R, t, tz) | pyramid (b, h)
#   capsule (r, hcyl, c) | octahedron (a, c); h are half-heights, b half the base side.


def _base_params(shape: int, az: float) -> tuple[list[float], tuple[float, float, float]]:
    """Unnormalised parameters and AABB sides of a base shape stretched by az along Z."""
    if shape == 1:
        return [1.0, az], (2, 2, 2 * az)
    if shape == 4:
        return [1.0, TORUS_TUBE, TORUS_TUBE * az], (2 + 2 * TORUS_TUBE,) * 2 + (2 * TORUS_TUBE * az,)
    if shape == 6:
        return [1.0, az, az], (2, 2, 4 * az)
    if shape == 0:
        return [1.0, 1.0, az], (2, 2, 2 * az)
    return [1.0, az], (2, 2, 2 * az)  # cylinder, cone, pyramid, octahedron


def shape_params(shape: int, aspect: int) -> torch.Tensor:
    """(4,) float64 parameters of a (shape, aspect) at the canonical size (largest AABB side 1.5)."""
    p, box = _base_params(shape, ASPECT_Z[aspect])
    scale = TARGET_SIZE / max(box)
    out = torch.zeros(4, dtype=torch.float64)
    out[:len(p)] = torch.tensor(p, dtype=torch.float64) * scale
    return out


def aabb_half_extents(shape: int, aspect: int) -> torch.Tensor:
    _, box = _base_params(shape, ASPECT_Z[aspect])
    return torch.tensor(box, dtype=torch.float64) * (TARGET_SIZE / max(box)) / 2


# ----------------------------------------------------------------------------------------------------------------
# 2-D and 3-D primitive distances (negative inside). q: (..., 2) as (rho, z); p: (..., 3); params broadcast.


def _box2d(q: torch.Tensor, bx: torch.Tensor, bz: torch.Tensor) -> torch.Tensor:
    dx, dz = q[..., 0].abs() - bx, q[..., 1].abs() - bz
    outside = torch.stack([dx.clamp(min=0), dz.clamp(min=0)], -1).norm(dim=-1)
    return outside + torch.maximum(dx, dz).clamp(max=0)


def _box3d(p: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    d = p.abs() - h  # (..., 3)
    return d.clamp(min=0).norm(dim=-1) + d.max(dim=-1).values.clamp(max=0)


def _ellipse2d(q: torch.Tensor, a: torch.Tensor, b: torch.Tensor, iters: int = 48) -> torch.Tensor:
    """Exact distance to the ellipse x^2/a^2 + z^2/b^2 = 1 (negative inside).

    Eberly: for a first-quadrant point with y > 0 the closest point is (a^2 x/(t+a^2), b^2 y/(t+b^2)) where t is the
    unique root of F(t) = (ax/(t+a^2))^2 + (by/(t+b^2))^2 - 1 on (-b^2, inf) (b = smaller axis); F decreases, so
    bisection on the bracket [-b^2 + b y, -b^2 + sqrt(a^2 x^2 + b^2 y^2)] is robust everywhere.
    """
    a, b = torch.broadcast_tensors(a, b)
    x, y = q[..., 0].abs(), q[..., 1].abs()
    swap = a < b  # make the first axis the major one
    a, b = torch.where(swap, b, a), torch.where(swap, a, b)
    x, y = torch.where(swap, y, x), torch.where(swap, x, y)
    dt = torch.float64
    a64, b64, x64 = a.to(dt), b.to(dt), x.to(dt)
    y64 = y.to(dt).clamp(min=1e-12 * float(a64.max()))  # y = 0 is the limit y -> 0+
    lo = -b64 ** 2 + b64 * y64
    hi = -b64 ** 2 + torch.sqrt((a64 * x64) ** 2 + (b64 * y64) ** 2)
    hi = torch.maximum(hi, lo)
    for _ in range(iters):
        t = 0.5 * (lo + hi)
        f = (a64 * x64 / (t + a64 ** 2)) ** 2 + (b64 * y64 / (t + b64 ** 2)) ** 2 - 1
        lo = torch.where(f > 0, t, lo)
        hi = torch.where(f > 0, hi, t)
    t = 0.5 * (lo + hi)
    cx, cy = a64 ** 2 * x64 / (t + a64 ** 2), b64 ** 2 * y64 / (t + b64 ** 2)
    dist = torch.sqrt((x64 - cx) ** 2 + (y64 - cy) ** 2)
    inside = (x64 / a64) ** 2 + (y.to(dt) / b64) ** 2 < 1
    return torch.where(inside, -dist, dist).to(q.dtype)


def _ellipse2d_bound(q: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Lipschitz-1 lower bound with the exact zero set: min(a, b) * (|q / (a, b)| - 1)."""
    n = torch.stack([q[..., 0] / a, q[..., 1] / b], -1).norm(dim=-1)
    return torch.minimum(a, b) * (n - 1)


def _segment2d(q: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ab, aq = b - a, q - a
    t = ((aq * ab).sum(-1) / (ab * ab).sum(-1)).clamp(0, 1)
    return (aq - t[..., None] * ab).norm(dim=-1)


def _cone2d(q: torch.Tensor, r: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Meridian triangle (0,-h), (r,-h), (0,h): exact distance to its two real edges, sign from the half-planes."""
    rho, z = q[..., 0].abs(), q[..., 1]
    zero = torch.zeros_like(r)
    rz = torch.stack([rho, z], -1)
    base = _segment2d(rz, torch.stack([zero, -h], -1), torch.stack([r, -h], -1))
    slant = _segment2d(rz, torch.stack([r, -h], -1), torch.stack([zero, h], -1))
    inside = (z > -h) & (rho * 2 * h < r * (h - z))
    d = torch.minimum(base, slant)
    return torch.where(inside, -d, d)


def _triangles_distance(p: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """Unsigned distance from points p (B, N, 3) to triangles tri (B, F, 3, 3) -> (B, N) (min over faces)."""
    a, b, c = tri[:, None, :, 0], tri[:, None, :, 1], tri[:, None, :, 2]  # (B, 1, F, 3)
    q = p[:, :, None, :]  # (B, N, 1, 3)
    n = torch.cross(b - a, c - a, dim=-1)
    n = n / n.norm(dim=-1, keepdim=True)
    e_in = [((torch.cross(v1 - v0, q - v0, dim=-1)) * n).sum(-1) >= 0 for v0, v1 in ((a, b), (b, c), (c, a))]
    face_in = e_in[0] & e_in[1] & e_in[2]
    plane = ((q - a) * n).sum(-1).abs()

    def seg(v0, v1):
        e = v1 - v0
        t = (((q - v0) * e).sum(-1) / (e * e).sum(-1)).clamp(0, 1)
        return (q - v0 - t[..., None] * e).norm(dim=-1)

    edges = torch.minimum(torch.minimum(seg(a, b), seg(b, c)), seg(c, a))
    return torch.where(face_in, plane, edges).min(dim=-1).values


def _pyramid_tris(b: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The faces a folded point (x >= |y|) can be nearest to: the +x side and the base's +x wedge. (B, 2, 3, 3)."""
    z = torch.zeros_like(b)
    c0, c1 = torch.stack([b, -b, -h], -1), torch.stack([b, b, -h], -1)
    apex, mid = torch.stack([z, z, h], -1), torch.stack([z, z, -h], -1)
    return torch.stack([torch.stack([c0, c1, apex], -2), torch.stack([mid, c1, c0], -2)], 1)


def _octa_tris(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The first-octant face (a folded point |p| is nearest to it). (B, 1, 3, 3)."""
    z = torch.zeros_like(a)
    return torch.stack([torch.stack([a, z, z], -1), torch.stack([z, a, z], -1), torch.stack([z, z, c], -1)], -2)[:, None]


def _pyramid_planes(p: torch.Tensor, b: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """max of the signed plane distances (exact inside, lower bound outside); b, h: (B, 1)."""
    # Side planes: |x| * 2h + b * z <= b * h, normalised.
    norm = torch.sqrt((2 * h) ** 2 + b ** 2)
    sx = (p[..., 0].abs() * 2 * h + b * p[..., 2] - b * h) / norm
    sy = (p[..., 1].abs() * 2 * h + b * p[..., 2] - b * h) / norm
    return torch.maximum(torch.maximum(sx, sy), -p[..., 2] - h)


def _octa_planes(p: torch.Tensor, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    # |x|/a + |y|/a + |z|/c <= 1 -> plane normal (c, c, a) / norm.
    norm = torch.sqrt(2 * c ** 2 + a ** 2)
    return (c * (p[..., 0].abs() + p[..., 1].abs()) + a * p[..., 2].abs() - a * c) / norm


def _shape_distance(shape: int, p: torch.Tensor, prm: torch.Tensor, fast: bool) -> torch.Tensor:
    """Negative-inside distance for objects of one shape: p (B, N, 3) in the unyawed frame, prm (B, 4) -> (B, N)."""
    P = [prm[:, i:i + 1] for i in range(4)]  # each (B, 1)
    rho = torch.sqrt(p[..., 0] ** 2 + p[..., 1] ** 2)
    q = torch.stack([rho, p[..., 2]], -1)
    ell = _ellipse2d_bound if fast else _ellipse2d
    if shape == 0:
        return _box3d(p, prm[:, None, :3])
    if shape == 1:
        return ell(q, P[0], P[1])
    if shape == 2:
        return _box2d(q, P[0], P[1])
    if shape == 3:
        return _cone2d(q, P[0], P[1])
    if shape == 4:
        return ell(torch.stack([rho - P[0], p[..., 2]], -1), P[1], P[2])
    if shape == 6:
        body = _box2d(q, P[0], P[1])
        top = ell(torch.stack([rho, p[..., 2] - P[1]], -1), P[0], P[2])
        bot = ell(torch.stack([rho, p[..., 2] + P[1]], -1), P[0], P[2])
        return torch.minimum(body, torch.minimum(top, bot))
    if shape in (5, 7):
        planes = _pyramid_planes(p, P[0], P[1]) if shape == 5 else _octa_planes(p, P[0], P[1])
        if fast:
            return planes
        # Symmetry folding: the nearest boundary point of a mirror-symmetric solid lies on the point's side of each
        # mirror plane, so only the faces of one fundamental wedge matter (exact, and 4-8x cheaper).
        ax, ay = p[..., 0].abs(), p[..., 1].abs()
        if shape == 5:
            folded = torch.stack([torch.maximum(ax, ay), torch.minimum(ax, ay), p[..., 2]], -1)
            tris = _pyramid_tris(prm[:, 0], prm[:, 1])
        else:
            folded = p.abs()
            tris = _octa_tris(prm[:, 0], prm[:, 1])
        d = _triangles_distance(folded, tris.to(p.dtype))
        return torch.where(planes <= 0, -d, d)
    raise ValueError(f"unknown shape index {shape}")


def specs_tensors(specs: list[ObjectSpec], device=None, dtype=torch.float32):
    """(shape idx (B,), params (B, 4), yaw (B,)) for a list of specs."""
    shape = torch.tensor([s.shape for s in specs], device=device)
    prm = torch.stack([shape_params(s.shape, s.aspect) for s in specs]).to(device=device, dtype=dtype)
    yaw = torch.tensor([s.yaw for s in specs], device=device, dtype=dtype)
    return shape, prm, yaw


def rotate_z(p: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate points p (B, N, 3) by angle (B,) about +Z (counter-clockwise seen from above)."""
    c, s = torch.cos(angle)[:, None], torch.sin(angle)[:, None]
    x, y = p[..., 0], p[..., 1]
    return torch.stack([c * x - s * y, s * x + c * y, p[..., 2]], -1)


def signed_distance_tensors(shape: torch.Tensor, prm: torch.Tensor, yaw: torch.Tensor, p: torch.Tensor, *,
                            fast: bool = False) -> torch.Tensor:
    """Negative-inside distance of objects given as tensors; p (B, N, 3) world points -> (B, N)."""
    local = rotate_z(p, -yaw)  # object frame before the yaw
    out = torch.empty(p.shape[:2], dtype=p.dtype, device=p.device)
    for s in torch.unique(shape).tolist():
        idx = (shape == s).nonzero().squeeze(1)
        out[idx] = _shape_distance(int(s), local[idx], prm[idx], fast)
    return out


def signed_distance(specs: ObjectSpec | list[ObjectSpec], points: torch.Tensor, *, fast: bool = False) -> torch.Tensor:
    """Negative-inside distance. specs: one spec with points (N, 3) -> (N,), or B specs with points (B, N, 3)."""
    single = isinstance(specs, ObjectSpec)
    sp = [specs] if single else list(specs)
    p = points[None] if single else points
    shape, prm, yaw = specs_tensors(sp, device=p.device, dtype=p.dtype)
    d = signed_distance_tensors(shape, prm, yaw, p, fast=fast)
    return d[0] if single else d


def object_sdf(specs: ObjectSpec | list[ObjectSpec], points: torch.Tensor, *, fast: bool = False) -> torch.Tensor:
    """Shap-E convention: POSITIVE INSIDE, negative outside (the negation of ``signed_distance``)."""
    return -signed_distance(specs, points, fast=fast)
