"""STF mesh extraction: latent -> SDF grid -> marching cubes -> coloured mesh (SHAP-E.md §6, official
``decode_latent_mesh``).

Official conventions kept: grid point (i, j, k) of G per axis sits at index/(G−1)·2−1 (flat order z fastest); the
SDF is positive inside; the G³ grid is padded with −1 to (G+2)³ so every surface closes at the box; iso-level 0;
vertex colours are the STF colour slot queried at the final vertex positions, converted sRGB -> linear.
``official_scale=True`` reproduces the official vertex mapping through the *padded* grid size, which shrinks the
mesh by (G−1)/(G+1) about the origin; the default puts the vertices on the true zero set.

Marching cubes is scikit-image's (Lewiner); its faces come out clockwise seen from outside for "inside = higher
values", so they are flipped once here to the counter-clockwise, outward-normal convention of ``MeshRecord``.

Two ways to fill the grid:
* ``dense``: the field at all G³ points (the official way; ~2.1 M MLP queries at G = 128).
* ``narrowband`` (coarse to fine): the field on a coarse grid of ~``coarse_size`` points per axis (a power-of-two
  subsampling of the fine grid, extended past the box when G−1 is not a multiple of the step); at each level the
  cells whose corners change sign are found, dilated by one cell (so a surface that bends between samples is still
  caught), and only the next level's points inside those cells are queried; everything else takes the trilinear
  interpolation of the coarser level (only its sign matters: no surface edge ends there). Grid points on the box
  faces that are inside get exact values, since the −1 padding puts a surface next to them. On the fine grid the
  two methods give identical values wherever a surface can be, so identical meshes unless a feature is thinner
  than the coarse spacing.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..records import EngineError, MeshRecord

FieldFn = Callable[[torch.Tensor], torch.Tensor]  # points (M, 3) -> values (M,) or colours (M, 3)
DEFAULT_CHUNK = 32768  # MLP queries per call: ~32 MB of activations per layer at width 256 (fp32)
MC_METHOD = "lorensen"
DEFAULT_GREY = (0.8, 0.8, 0.8)  # colour of meshes from fields that have none


def grid_points(grid_size: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Official ``volume_query_points``: (G³, 3) points, index = x·G² + y·G + z, coordinate index/(G−1)·2−1."""
    axis = torch.linspace(-1.0, 1.0, grid_size, device=device, dtype=dtype)
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)


def _evaluate(fn: FieldFn, points: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([fn(points[i:i + chunk]).float() for i in range(0, len(points), chunk)]) if len(points) else \
        points.new_zeros(0)


def _sign_change_cells(values: torch.Tensor) -> torch.Tensor:
    """(n, n, n) values -> (n−1)³ bool: cells whose 8 corners are not all on one side of 0."""
    inside = (values > 0).float()[None, None]
    any_in = F.max_pool3d(inside, 2, stride=1)
    all_in = -F.max_pool3d(-inside, 2, stride=1)
    return (any_in != all_in)[0, 0]


def _dilate(mask: torch.Tensor, radius: int = 1) -> torch.Tensor:
    return F.max_pool3d(mask.float()[None, None], 2 * radius + 1, stride=1, padding=radius)[0, 0] > 0


def _cells_to_points(cells: torch.Tensor) -> torch.Tensor:
    """Flagged cells (c, c, c) of a grid -> (2c+1)³ points of the twice-finer grid that lie in those cells."""
    fine = cells.repeat_interleave(2, 0).repeat_interleave(2, 1).repeat_interleave(2, 2).float()  # (2c)³ fine cells
    return F.max_pool3d(fine[None, None], 2, stride=1, padding=1)[0, 0] > 0  # a point touches any of its 8 cells


def auto_coarse_step(grid_size: int, coarse_size: int = 32) -> int:
    return 2 ** max(0, round(math.log2(max(grid_size, 1) / coarse_size)))


def sdf_grid(sdf_fn: FieldFn, grid_size: int, *, method: Literal["narrowband", "dense"] = "narrowband",
             device=None, chunk: int = DEFAULT_CHUNK, coarse_step: int | None = None,
             stats: dict | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fill the (G, G, G) grid [x, y, z] of ``sdf_fn`` values.

    Returns (grid float32, evaluated) where ``evaluated`` (G, G, G) bool marks the points queried at full
    resolution (None for dense). ``stats`` (optional dict) receives the number of field queries.
    """
    if grid_size < 2:
        raise EngineError(f"grid size {grid_size} is too small", "use a grid size of at least 8 (64 is typical)")
    step = 1 if method == "dense" else (coarse_step or auto_coarse_step(grid_size))
    if method not in ("narrowband", "dense"):
        raise EngineError(f"unknown extraction method {method!r}", "use 'narrowband' or 'dense'")
    if step & (step - 1):
        raise ValueError("coarse_step must be a power of two")
    scale = 2.0 / (grid_size - 1)
    queries = 0
    if step == 1:
        values = _evaluate(sdf_fn, grid_points(grid_size, device=device), chunk).reshape((grid_size,) * 3)
        if stats is not None:
            stats["queries"] = grid_size ** 3
        return values, None

    n = math.ceil((grid_size - 1) / step) + 1  # coarse points per axis; may reach past index G−1
    axis = torch.arange(n, device=device, dtype=torch.float32) * (step * scale) - 1.0
    coarse = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    values = _evaluate(sdf_fn, coarse, chunk).reshape(n, n, n)
    queries += n ** 3
    evaluated = None
    while step > 1:
        cells = _dilate(_sign_change_cells(values))  # (n−1)³
        step //= 2
        n2 = 2 * n - 1
        todo = _cells_to_points(cells)  # (n2)³
        evaluated = todo.clone()
        todo[::2, ::2, ::2] = False  # the coarse points are known already
        values = F.interpolate(values[None, None], size=(n2,) * 3, mode="trilinear", align_corners=True)[0, 0]
        idx = todo.nonzero()  # (M, 3) row-major, the order boolean indexing uses
        values[todo] = _evaluate(sdf_fn, idx.float() * (step * scale) - 1.0, chunk)
        queries += len(idx)
        n = n2
        del todo, cells, idx
    values = values[:grid_size, :grid_size, :grid_size].contiguous()
    evaluated = evaluated[:grid_size, :grid_size, :grid_size].contiguous()

    # The −1 padding makes a surface next to every inside point on the box faces: give those exact values.
    face = torch.zeros_like(evaluated)
    for axis_i in range(3):
        face.select(axis_i, 0).fill_(True)
        face.select(axis_i, grid_size - 1).fill_(True)
    todo = face & ~evaluated & (values > 0)
    idx = todo.nonzero()
    if len(idx):
        values[todo] = _evaluate(sdf_fn, idx.float() * scale - 1.0, chunk)
        evaluated |= todo
        queries += len(idx)
    if stats is not None:
        stats["queries"] = queries
    return values, evaluated


def marching_cubes(grid: torch.Tensor | np.ndarray, *, official_scale: bool = False,
                   mask: torch.Tensor | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(G, G, G) SDF grid (positive inside) -> vertices (V, 3) float32 in [-1, 1]³, faces (F, 3) int32 CCW
    from outside. Pads with −1 like the official code; empty arrays when there is no surface.
    ``mask`` (G, G, G) bool limits the work to cells near True points (skimage's ``mask``)."""
    from skimage.measure import marching_cubes as sk_marching_cubes

    g = grid.detach().float().cpu().numpy() if isinstance(grid, torch.Tensor) else np.asarray(grid, np.float32)
    size = g.shape[0]
    if g.ndim != 3 or g.shape != (size,) * 3:
        raise ValueError(f"expected a cubic grid, got {g.shape}")
    if not np.isfinite(g).all():
        raise EngineError("the SDF grid contains NaN or infinite values", "decode again in fp32 precision")
    if not (g > 0).any():
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32)
    padded = np.pad(g, 1, mode="constant", constant_values=-1.0)
    sk_mask = None
    if mask is not None:
        m = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        sk_mask = np.pad(m, 1, mode="constant", constant_values=True)
        sk_mask[1:-1, 1:-1, 1:-1] = _dilate(torch.from_numpy(sk_mask), 1).numpy()[1:-1, 1:-1, 1:-1]
        sk_mask[:2] = sk_mask[-2:] = True
        sk_mask[:, :2] = sk_mask[:, -2:] = True
        sk_mask[:, :, :2] = sk_mask[:, :, -2:] = True
    verts, faces, _normals, _values = sk_marching_cubes(padded, level=0.0, mask=sk_mask, method=MC_METHOD)
    if official_scale:
        verts = verts / (size + 1) * 2.0 - 1.0  # the official mapping through the padded size
    else:
        # Caps made by the padding sit a fraction of a voxel past the outer grid points: put them on the box.
        verts = np.clip((verts - 1.0) / (size - 1) * 2.0 - 1.0, -1.0, 1.0)
    faces = faces[:, [0, 2, 1]]  # skimage winds clockwise seen from outside for "inside = higher"
    return verts.astype(np.float32), faces.astype(np.int32)


def extract_mesh_from_field(sdf_fn: FieldFn, grid_size: int = 64, *, color_fn: FieldFn | None = None,
                            method: Literal["narrowband", "dense"] = "narrowband", official_scale: bool = False,
                            device=None, chunk: int = DEFAULT_CHUNK, coarse_step: int | None = None,
                            stats: dict | None = None) -> MeshRecord:
    """Any SDF (points (M, 3) -> (M,), positive inside) -> MeshRecord. ``color_fn`` gives linear RGB (M, 3) at
    the final vertex positions (default: grey). No surface -> ``MeshRecord(empty=True)`` with zero vertices."""
    grid, evaluated = sdf_grid(sdf_fn, grid_size, method=method, device=device, chunk=chunk,
                               coarse_step=coarse_step, stats=stats)
    verts, faces = marching_cubes(grid, official_scale=official_scale, mask=evaluated)
    if len(faces) == 0:
        return MeshRecord(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros((0, 3)), grid_size=grid_size, empty=True)
    if color_fn is None:
        colors = np.broadcast_to(np.asarray(DEFAULT_GREY, np.float32), verts.shape)
    else:
        pts = torch.from_numpy(verts).to(device=device if device is not None else "cpu")
        colors = torch.cat([color_fn(pts[i:i + chunk]).float() for i in range(0, len(pts), chunk)])
        colors = colors.clamp(0.0, 1.0).cpu().numpy()
    return MeshRecord(verts, faces, colors, grid_size=grid_size)


def decoder_field_fns(decoder, latent: torch.Tensor, *, device=None) -> tuple[FieldFn, FieldFn]:
    """(sdf_fn, linear colour_fn) of one latent (d_latent,). The projection runs where the decoder lives; the
    small per-latent weights then move to ``device``."""
    from ..models.implicit_decoder import query_field, srgb_to_linear

    home = next(decoder.parameters()).device
    device = torch.device(device) if device is not None else home
    params = [p.to(device) for p in decoder.project(latent.reshape(1, -1).to(home))]
    static = decoder.static_weights()
    static = type(static)(tuple(b.to(device) for b in static.biases), static.w4.to(device), static.w5.to(device),
                          static.w6.to(device))

    def autocast():
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def sdf_fn(points: torch.Tensor) -> torch.Tensor:
        with autocast():
            return query_field(params, points[None], weights=static, outputs=("sdf",))["sdf"][0]

    def color_fn(points: torch.Tensor) -> torch.Tensor:
        with autocast():
            rgb = query_field(params, points[None], weights=static, outputs=("stf_rgb",))["stf_rgb"][0]
        return srgb_to_linear(rgb.float())

    return sdf_fn, color_fn


@torch.no_grad()
def extract_mesh(decoder, latent: torch.Tensor, *, grid_size: int = 64,
                 method: Literal["narrowband", "dense"] = "narrowband", official_scale: bool = False,
                 device=None, chunk: int = DEFAULT_CHUNK, coarse_step: int | None = None,
                 stats: dict | None = None) -> MeshRecord:
    """latent (d_latent,) -> coloured MeshRecord (linear vertex colours; Z up, front −Y). fp16 autocast on CUDA."""
    latent = torch.as_tensor(latent)
    if latent.numel() != decoder.d_latent:
        raise EngineError(f"latent has {latent.numel()} numbers but the decoder expects {decoder.d_latent}",
                          "decode it with the model that made it")
    if not torch.isfinite(latent).all():
        raise EngineError("the latent contains NaN or infinite values", "regenerate it (try fp32 precision)")
    sdf_fn, color_fn = decoder_field_fns(decoder, latent.float(), device=device)
    dev = device if device is not None else next(decoder.parameters()).device
    mesh = extract_mesh_from_field(sdf_fn, grid_size, color_fn=color_fn, method=method,
                                   official_scale=official_scale, device=dev, chunk=chunk, coarse_step=coarse_step,
                                   stats=stats)
    mesh.latent = latent.detach().float().reshape(-1).cpu().numpy()
    return mesh
