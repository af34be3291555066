"""STF mesh extraction: latent -> SDF grid -> marching cubes -> coloured mesh (SHAP-E.md §6, official
``decode_latent_mesh``).

Official conventions kept: grid point (i, j, k) of G per axis sits at index/(G−1)·2−1 (flat order z fastest); the
SDF is positive inside; the G³ grid is padded with −1 to (G+2)³ so every surface closes at the box; iso-level 0;
vertex colours are the STF colour slot queried at the final vertex positions, converted sRGB -> linear.
``official_scale=True`` reproduces the official vertex mapping through the *padded* grid size, which shrinks the
mesh by (G−1)/(G+1) about the origin; the default puts the vertices on the true zero set.

Marching cubes is scikit-image's (Lewiner); its faces come out clockwise seen from outside for "inside = higher
values", so they are flipped once here to the counter-clockwise, outward-normal convention of ``MeshRecord``.

Two ways to fill the grid (``sdf_grid``):
* ``dense``: the field at all G³ points (the official way; ~2.1 M MLP queries at G = 128).
* ``narrowband`` (coarse to fine, surface following): the field on a coarse lattice of ~33³ points (a power-of-two
  subsampling of the fine grid, extended past the box when G−1 is not a multiple of the step); then, level by level
  down to the fine grid, every other point holds a placeholder (trilinear from the coarser level) and the field is
  queried (a) at the midpoint of every coarse edge whose exact ends change sign, (b) at inside grid points on the
  box faces (the −1 padding makes each a surface corner), and then (c) at the missing corners of every cell whose
  corner values change sign, repeated until no such cell is left (the *closure*, a fixed point).
  Guarantee: at the fixed point every sign-change cell has 8 queried corners, so each of its triangles is the
  dense path's; through every sign-change edge the 4 cells around it change sign too, so a surface component
  that reaches a queried cell is traced in full, however far it strays from the coarser band. The narrowband
  mesh is therefore exactly the dense mesh minus whole components that no coarse cell saw (closed pieces that fit
  between coarse samples, ~1/16 of the box, and never touch a traced surface). ``coarse_dilate`` also queries
  all points of the coarse sign-change cells and their neighbours at the next level, which finds such pieces
  close to the surface.
Queries run through ``PackedField`` on the CPU (``decoder_field_fns``); the grid bookkeeping runs on one thread.

Vertex colours: ``query`` (official, at every vertex) or ``interpolate`` (from the grid corners), see
``engine.geometry.vertex_colors``.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..records import EngineError, MeshRecord
from .vertex_colors import interpolate_corner_colors, resolve_vertex_colors

FieldFn = Callable[[torch.Tensor], torch.Tensor]  # points (M, 3) -> values (M,) or colours (M, 3)
DEFAULT_CHUNK = 32768  # MLP queries per call: ~32 MB of activations per layer at width 256 (fp32)
MC_METHOD = "lorensen"
COARSE_SIZE = 32  # coarsest lattice ~33³ points (spacing ~1/16 of the box), whatever the grid size
DEFAULT_GREY = (0.8, 0.8, 0.8)  # colour of meshes from fields that have none


def grid_points_axis(grid_size: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """(G,) coordinates index/(G−1)·2−1 along each axis (the same values the dense grid uses)."""
    return torch.linspace(-1.0, 1.0, grid_size, device=device, dtype=dtype)


def grid_points(grid_size: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Official ``volume_query_points``: (G³, 3) points, index = x·G² + y·G + z, coordinate index/(G−1)·2−1."""
    axis = grid_points_axis(grid_size, device=device, dtype=dtype)
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


_CORNERS = torch.tensor([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)])  # (8, 3) cell corner offsets
_CHILDREN = torch.tensor([[i, j, k] for i in (0, 1, 2) for j in (0, 1, 2) for k in (0, 1, 2)])  # (27, 3)


def _ravel(ijk: torch.Tensor, n: int) -> torch.Tensor:
    return (ijk[..., 0] * n + ijk[..., 1]) * n + ijk[..., 2]


def _unravel(flat: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack([flat // (n * n), (flat // n) % n, flat % n], dim=-1)


def _unique(flat: torch.Tensor, size: int) -> torch.Tensor:
    """Sorted distinct values of ``flat`` (M,), all in [0, size): a mark-and-scan over ``size`` booleans when that
    is the cheaper pass (M ≳ size / 8), else a sort."""
    if 8 * len(flat) < size:
        return torch.unique(flat)
    mark = torch.zeros(size, dtype=torch.bool, device=flat.device)
    mark[flat] = True
    return mark.nonzero()[:, 0]


def auto_coarse_step(grid_size: int, coarse_size: int = COARSE_SIZE) -> int:
    """The power-of-two step that gives about ``coarse_size`` coarse points per axis."""
    return 2 ** max(0, round(math.log2(max(grid_size, 1) / coarse_size)))


@contextlib.contextmanager
def _one_intra_op_thread():
    """Run the grid bookkeeping (pooling, gathers, scatters on up to (G+2)³ tensors) with one intra-op thread.

    On a busy 2-core machine every multi-threaded op waits at its fork/join barrier for the other thread's
    scheduler slice: measured 10x slower than one thread (G = 256 bookkeeping 4.5 s vs 0.45 s). The field
    queries are unaffected: ``PackedField`` runs its own single-threaded workers. The caller's setting (and the
    process default that threads started later inherit) is restored on exit.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Level:
    """One lattice of the hierarchy: (n, n, n) values and an ``exact`` mask (True where the field was queried).

    Lattice index i sits at fine-grid index i·step − shift (shift 1 on the final, padded level); ``axis`` gives the
    fine-grid coordinates (the dense path's linspace, extended past the box for the coarse lattices' overhang).
    """

    def __init__(self, values: torch.Tensor, exact: torch.Tensor, step: int, shift: int, axis: torch.Tensor,
                 colors: list | None = None):
        self.values, self.exact, self.step, self.shift, self.axis = values, exact, step, shift, axis
        self.colors = colors  # None, or a list collecting (fine ijk (M, 3), colour (M, 3)) of every query
        self.n = values.shape[0]

    def query(self, fn: FieldFn, flat: torch.Tensor, chunk: int) -> int:
        """Query the field at lattice points ``flat`` (M,) (flat indices) and mark them exact."""
        if len(flat):
            fine = _unravel(flat, self.n) * self.step - self.shift  # (M, 3) fine-grid index
            out = _evaluate(fn, self.axis[fine], chunk)
            if self.colors is not None:  # fn gives (M, 4): SDF and colour
                out = out.reshape(len(flat), 4)
                self.colors.append((fine, out[:, 1:]))
                out = out[:, 0]
            self.values.view(-1)[flat] = out
            self.exact.view(-1)[flat] = True
        return len(flat)

    def close(self, fn: FieldFn, new: torch.Tensor, chunk: int, stats: dict) -> int:
        """The closure: query the missing corners of every cell whose corner values change sign, until none is
        left. Only cells touching just-queried points (``new``, flat indices) can have changed, so each round
        looks at the 8 cells around each of those."""
        n, queries = self.n, 0
        corner_flat = _ravel(_CORNERS, n).to(new.device)  # (8,)
        values, exact = self.values.view(-1), self.exact.view(-1)
        while len(new):
            ijk = _unravel(new, n)  # (M, 3)
            # Cell (p − o) for corner offset o exists unless it leaves the lattice: o_d = 1 needs p_d > 0 and
            # o_d = 0 needs p_d < n − 1. (M, 2) per axis, multiplied out to (M, 2, 2, 2) = (M, 8) in _CORNERS order.
            ok = [torch.stack([ijk[:, d] < n - 1, ijk[:, d] > 0], 1) for d in range(3)]
            valid = (ok[0][:, :, None, None] & ok[1][:, None, :, None] & ok[2][:, None, None, :]).reshape(-1, 8)
            cells = _unique((new[:, None] - corner_flat)[valid], n ** 3)  # (C,) lowest-corner flat index
            corners = cells[:, None] + corner_flat  # (C, 8)
            known = exact[corners]
            open_ = ~known.all(1)
            corners, known = corners[open_], known[open_]
            inside = values[corners] > 0
            need = inside.any(1) != inside.all(1)
            new = _unique(corners[need][~known[need]], n ** 3)
            queries += self.query(fn, new, chunk)
            stats["closure_rounds"] = stats.get("closure_rounds", 0) + (len(new) > 0)
        return queries


def sdf_grid(sdf_fn: FieldFn, grid_size: int, *, method: Literal["narrowband", "dense"] = "narrowband",
             device=None, chunk: int = DEFAULT_CHUNK, coarse_step: int | None = None, coarse_dilate: int = 0,
             stats: dict | None = None, padded: bool = False, corner_colors: list | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fill the (G, G, G) grid [x, y, z] of ``sdf_fn`` values (module docstring: dense / narrowband).

    Returns (grid float32, exact) where ``exact`` (G, G, G) bool marks the points where the field was queried
    (None for dense); elsewhere the grid holds a placeholder whose sign makes no surface there. ``padded=True``
    returns the (G+2)³ grid with the official −1 border instead (exact there). ``stats`` (optional dict)
    receives ``queries`` and per-level counts. ``coarse_step``: the coarsest lattice's step in fine voxels (a power
    of two; default ~G/32). ``coarse_dilate``: also query every point of the coarsest level's sign-change cells
    dilated by this many cells at the next level. ``corner_colors``: a list; ``sdf_fn`` then returns (M, 4)
    (SDF, colour) and every query appends (fine-grid index (M, 3), colour (M, 3)) to the list.
    """
    if grid_size < 2:
        raise EngineError(f"grid size {grid_size} is too small", "use a grid size of at least 8 (64 is typical)")
    if method not in ("narrowband", "dense"):
        raise EngineError(f"unknown extraction method {method!r}", "use 'narrowband' or 'dense'")
    step = 1 if method == "dense" else (coarse_step or auto_coarse_step(grid_size))
    if step & (step - 1):
        raise ValueError("coarse_step must be a power of two")
    stats = stats if stats is not None else {}
    axis = grid_points_axis(grid_size, device=device)
    if step == 1:
        values = _evaluate(sdf_fn, grid_points(grid_size, device=device), chunk)
        if corner_colors is not None:
            values = values.reshape(-1, 4)
            corner_colors.append((_unravel(torch.arange(grid_size ** 3, device=device), grid_size), values[:, 1:]))
            values = values[:, 0]
        values = values.reshape((grid_size,) * 3)
        stats["queries"] = grid_size ** 3
        return (F.pad(values, (1,) * 6, value=-1.0) if padded else values), None

    n = math.ceil((grid_size - 1) / step) + 1  # coarse points per axis; may reach past index G−1
    fine_n = (n - 1) * step + 1
    scale = 2.0 / (grid_size - 1)
    extra = torch.arange(grid_size, fine_n, device=device, dtype=torch.float32) * scale - 1.0
    axis = torch.cat([axis, extra])  # (fine_n,): fine index -> coordinate (the same along x, y and z)
    level = _Level(torch.empty((n,) * 3, device=device), torch.zeros((n,) * 3, dtype=torch.bool, device=device),
                   step, 0, axis, corner_colors)
    queries = stats["coarse"] = level.query(sdf_fn, torch.arange(n ** 3, device=device), chunk)
    cells = _dilate(_sign_change_cells(level.values), coarse_dilate) if coarse_dilate else None
    while level.step > 1:
        level, todo = _refine(level, grid_size, cells)
        cells = None
        if level.shift:  # the final, padded level: inside points on the box faces meet the −1 border
            todo = _unique(torch.cat([todo, _box_face_candidates(level, grid_size)]), level.n ** 3)
        new = level.query(sdf_fn, todo, chunk)
        closed = level.close(sdf_fn, todo, chunk, stats)
        stats.setdefault("levels", []).append({"step": level.step, "seeds": new, "closure": closed})
        queries += new + closed
    stats["queries"] = queries
    values, exact = level.values, level.exact
    if not padded:
        values = values[1:-1, 1:-1, 1:-1].contiguous()
        exact = exact[1:-1, 1:-1, 1:-1].contiguous()
    return values, exact


def _refine(level: _Level, grid_size: int, cells: torch.Tensor | None) -> tuple[_Level, torch.Tensor]:
    """Halve the step. Returns the finer level (trilinear placeholders, the coarse lattice points exact) and the
    flat indices (M,) of its points to query first: the midpoints of the coarse edges whose exact ends change
    sign (plus every point of the flagged coarse ``cells``, if given)."""
    n, step = level.n, level.step // 2
    m2 = 2 * n - 1
    up = F.interpolate(level.values[None, None], size=(m2,) * 3, mode="trilinear", align_corners=True)[0, 0]
    if step > 1:
        m, shift = m2, 0
        values = up
        exact = torch.zeros((m,) * 3, dtype=torch.bool, device=values.device)
        exact[::2, ::2, ::2] = level.exact
    else:  # the final level: the G³ grid inside the official −1 border, (G+2)³
        m, shift = grid_size + 2, 1
        values = torch.full((m,) * 3, -1.0, device=up.device)
        values[1:-1, 1:-1, 1:-1] = up[:grid_size, :grid_size, :grid_size]
        exact = torch.ones((m,) * 3, dtype=torch.bool, device=up.device)
        exact[1:-1, 1:-1, 1:-1] = False
        c = (grid_size + 1) // 2  # coarse points inside the box
        exact[1:-1:2, 1:-1:2, 1:-1:2] = level.exact[:c, :c, :c]
    del up
    seeds = []
    for a in range(3):  # coarse edges along axis a with exact, opposite-sign ends -> their fine midpoints
        v0, v1 = level.values.narrow(a, 0, n - 1), level.values.narrow(a, 1, n - 1)
        known = level.exact.narrow(a, 0, n - 1) & level.exact.narrow(a, 1, n - 1)
        mid = (((v0 > 0) != (v1 > 0)) & known).nonzero() * 2  # (E, 3) fine index of the edge's lower end
        mid[:, a] += 1
        seeds.append(mid)
    if cells is not None:  # every point (2i + a, 2j + b, 2k + c), a, b, c in 0..2, of each flagged cell
        seeds.append((cells.nonzero()[:, None, :] * 2 + _CHILDREN.to(cells.device)).reshape(-1, 3))
    pts = torch.cat(seeds) + shift
    if shift:
        pts = pts[(pts < m - shift).all(-1)]  # beyond the box: not part of the fine grid
    todo = torch.zeros((m,) * 3, dtype=torch.bool, device=values.device)
    todo.view(-1)[_ravel(pts, m)] = True
    todo &= ~exact
    return _Level(values, exact, step, shift, level.axis, level.colors), todo.view(-1).nonzero()[:, 0]


def _box_face_candidates(level: _Level, grid_size: int) -> torch.Tensor:
    """Flat indices of not-yet-queried grid points on the box faces whose placeholder is inside (> 0): next to the
    −1 border each of them is a surface corner, so it needs its exact value."""
    m, found = level.n, []
    idx = torch.arange(m, device=level.values.device)
    for a in range(3):
        for i in (1, grid_size):
            face = ~level.exact.select(a, i) & (level.values.select(a, i) > 0)  # (m, m)
            uv = face.nonzero()  # (K, 2): the other two axes in order
            ijk = torch.empty(len(uv), 3, dtype=torch.long, device=idx.device)
            ijk[:, a] = i
            ijk[:, [d for d in range(3) if d != a]] = uv
            found.append(_ravel(ijk, m))
    return torch.cat(found)


def marching_cubes(grid: torch.Tensor | np.ndarray, *, official_scale: bool = False,
                   mask: torch.Tensor | np.ndarray | None = None, padded: bool = False,
                   index_out: list | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(G, G, G) SDF grid (positive inside) -> vertices (V, 3) float32 in [-1, 1]³, faces (F, 3) int32 CCW
    from outside. Pads with −1 like the official code (``padded=True``: the grid already is the (G+2)³ padded
    one); empty arrays when there is no surface. ``mask`` (same shape as ``grid``) bool: only cells whose lowest
    corner is True are visited (skimage's ``mask``); pass ``exact`` from ``sdf_grid``: every sign-change cell of a
    narrowband grid has all 8 corners exact, so the mask never drops a triangle. ``index_out`` (a list) receives
    the vertices in padded-grid index units (V, 3) float64, for looking up their edge's corners."""
    from skimage.measure import marching_cubes as sk_marching_cubes

    g = grid.detach().float().cpu().numpy() if isinstance(grid, torch.Tensor) else np.asarray(grid, np.float32)
    if g.ndim != 3 or g.shape != (g.shape[0],) * 3:
        raise ValueError(f"expected a cubic grid, got {g.shape}")
    if not np.isfinite(g).all():
        raise EngineError("the SDF grid contains NaN or infinite values", "decode again in fp32 precision")
    if not (g > 0).any():
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32)
    sk_mask = None
    if mask is not None:
        sk_mask = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask, bool)
    if not padded:
        g = np.pad(g, 1, mode="constant", constant_values=-1.0)
        sk_mask = None if sk_mask is None else np.pad(sk_mask, 1, mode="constant", constant_values=True)
    size = g.shape[0] - 2
    verts, faces, _normals, _values = sk_marching_cubes(g, level=0.0, mask=sk_mask, method=MC_METHOD)
    if index_out is not None:
        index_out.append(verts.astype(np.float64))
    if official_scale:
        verts = verts / (size + 1) * 2.0 - 1.0  # the official mapping through the padded size
    else:
        # Caps made by the padding sit a fraction of a voxel past the outer grid points: put them on the box.
        index = verts - 1.0  # (V, 3) grid-index units; two of the three are whole numbers (a vertex is on an edge)
        whole = np.rint(index)
        verts = np.clip(index / (size - 1) * 2.0 - 1.0, -1.0, 1.0)
        # Whole indices take the grid's own coordinates (the dense linspace, to the bit), so the colour queries
        # there can use the field's per-axis lattice tables.
        on = (whole == index) & (whole >= 0) & (whole <= size - 1)
        verts[on] = grid_points_axis(size).numpy()[whole[on].astype(np.int64)]
    faces = faces[:, [0, 2, 1]]  # skimage winds clockwise seen from outside for "inside = higher"
    return verts.astype(np.float32), faces.astype(np.int32)


def extract_mesh_from_field(sdf_fn: FieldFn, grid_size: int = 64, *, color_fn: FieldFn | None = None,
                            sdf_color_fn: FieldFn | None = None, vertex_colors: str = "query",
                            method: Literal["narrowband", "dense"] = "narrowband", official_scale: bool = False,
                            device=None, chunk: int = DEFAULT_CHUNK, coarse_step: int | None = None,
                            coarse_dilate: int = 0, stats: dict | None = None) -> MeshRecord:
    """Any SDF (points (M, 3) -> (M,), positive inside) -> MeshRecord. ``color_fn`` gives linear RGB (M, 3) at
    the final vertex positions (default: grey). ``vertex_colors='interpolate'`` (or 'auto', see the module
    docstring) with ``sdf_color_fn`` (points -> (M, 4): SDF and the same colour in one pass) takes the colours at
    the grid corners instead and interpolates them along each vertex's edge. No surface ->
    ``MeshRecord(empty=True)`` with zero vertices. ``stats`` (optional dict) receives query counts and the
    seconds spent in each stage."""
    stats = stats if stats is not None else {}
    mode = resolve_vertex_colors(vertex_colors, grid_size)
    corner_colors = [] if mode == "interpolate" and sdf_color_fn is not None and color_fn is not None else None
    on_cpu = device is None or torch.device(device).type == "cpu"
    with _one_intra_op_thread() if on_cpu else contextlib.nullcontext():
        t0 = time.perf_counter()
        grid, exact = sdf_grid(sdf_fn if corner_colors is None else sdf_color_fn, grid_size, method=method,
                               device=device, chunk=chunk, coarse_step=coarse_step, coarse_dilate=coarse_dilate,
                               stats=stats, padded=True, corner_colors=corner_colors)
        t1 = time.perf_counter()
        index_verts = []
        verts, faces = marching_cubes(grid, official_scale=official_scale, mask=exact, padded=True,
                                      index_out=index_verts)
        del grid, exact
        t2 = time.perf_counter()
        stats.update(sdf_seconds=t1 - t0, mc_seconds=t2 - t1, color_queries=0, color_seconds=0.0,
                     vertex_colors="query" if corner_colors is None else "interpolate")
        if len(faces) == 0:
            return MeshRecord(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros((0, 3)), grid_size=grid_size,
                              empty=True)
        if color_fn is None:
            colors = np.broadcast_to(np.asarray(DEFAULT_GREY, np.float32), verts.shape)
        else:
            if corner_colors is not None:
                colors, todo = interpolate_corner_colors(index_verts[0], corner_colors, grid_size)
            else:
                colors, todo = np.zeros(verts.shape, np.float32), np.ones(len(verts), bool)
            if todo.any():  # queried: every vertex in 'query' mode, none in practice when interpolating
                pts = torch.from_numpy(verts[todo]).to(device=device if device is not None else "cpu")
                colors[todo] = _evaluate(color_fn, pts, chunk).reshape(-1, 3).cpu().numpy()
            colors = np.clip(colors, 0.0, 1.0)
            stats.update(color_queries=int(todo.sum()), color_seconds=time.perf_counter() - t2)
    return MeshRecord(verts, faces, colors, grid_size=grid_size)


def decoder_field_fns(decoder, latent: torch.Tensor, *, device=None, grid_size: int | None = None,
                      threads: int | None = None) -> tuple[FieldFn, FieldFn, FieldFn]:
    """(sdf_fn, linear colour_fn, sdf_color_fn (M, 4): both in one pass) of one latent (d_latent,). The projection runs where the decoder lives; the
    small per-latent weights then move to ``device``. On the CPU the fields use ``PackedField`` (one GEMM per
    layer, fused swish, and per-axis layer-0 tables for the points of the ``grid_size`` grid); on CUDA
    ``query_field`` under fp16 autocast. ``threads``: the CPU field's worker threads (default: torch's setting)."""
    from ..models.implicit_decoder import PackedField, query_field, srgb_to_linear

    home = next(decoder.parameters()).device
    device = torch.device(device) if device is not None else home
    params = [p.to(device) for p in decoder.project(latent.reshape(1, -1).to(home))]
    static = decoder.static_weights()
    static = type(static)(tuple(b.to(device) for b in static.biases), static.w4.to(device), static.w5.to(device),
                          static.w6.to(device))
    if device.type == "cpu":
        lattice = grid_points_axis(grid_size, device=device) if grid_size else None
        packed = PackedField(params, static, lattice=lattice, threads=threads)

        def packed_sdf_color(points: torch.Tensor) -> torch.Tensor:
            out = packed.sdf_rgb(points)
            out[:, 1:] = srgb_to_linear(out[:, 1:])
            return out

        return packed.sdf, lambda points: srgb_to_linear(packed.stf_rgb(points)), packed_sdf_color

    def sdf_fn(points: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.float16):
            return query_field(params, points[None], weights=static, outputs=("sdf",))["sdf"][0]

    def color_fn(points: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.float16):
            rgb = query_field(params, points[None], weights=static, outputs=("stf_rgb",))["stf_rgb"][0]
        return srgb_to_linear(rgb.float())

    def sdf_color_fn(points: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.float16):
            out = query_field(params, points[None], weights=static, outputs=("sdf", "stf_rgb"))
        return torch.cat([out["sdf"][0, :, None].float(), srgb_to_linear(out["stf_rgb"][0].float())], 1)

    return sdf_fn, color_fn, sdf_color_fn


@torch.no_grad()
def extract_mesh(decoder, latent: torch.Tensor, *, grid_size: int = 64,
                 method: Literal["narrowband", "dense"] = "narrowband", official_scale: bool = False,
                 device=None, chunk: int = DEFAULT_CHUNK, coarse_step: int | None = None,
                 coarse_dilate: int = 0, stats: dict | None = None, vertex_colors: str = "auto") -> MeshRecord:
    """latent (d_latent,) -> coloured MeshRecord (linear vertex colours; Z up, front −Y). fp16 autocast on CUDA."""
    latent = torch.as_tensor(latent)
    if latent.numel() != decoder.d_latent:
        raise EngineError(f"latent has {latent.numel()} numbers but the decoder expects {decoder.d_latent}",
                          "decode it with the model that made it")
    if not torch.isfinite(latent).all():
        raise EngineError("the latent contains NaN or infinite values", "regenerate it (try fp32 precision)")
    dev = torch.device(device) if device is not None else next(decoder.parameters()).device
    threads = torch.get_num_threads()  # the field's workers; everything else runs on one thread (on the CPU)
    with _one_intra_op_thread() if dev.type == "cpu" else contextlib.nullcontext():
        sdf_fn, color_fn, sdf_color_fn = decoder_field_fns(decoder, latent.float(), device=device,
                                                           grid_size=grid_size, threads=threads)
        mesh = extract_mesh_from_field(sdf_fn, grid_size, color_fn=color_fn, sdf_color_fn=sdf_color_fn,
                                       vertex_colors=vertex_colors, method=method,
                                       official_scale=official_scale, device=dev, chunk=chunk,
                                       coarse_step=coarse_step, coarse_dilate=coarse_dilate, stats=stats)
    mesh.latent = latent.detach().float().reshape(-1).cpu().numpy()
    return mesh
