"""The mini world: palette, numbering, held-out rule, exact SDFs, captions (MINI-DATASET.md)."""

import math

import pytest
import torch

from engine.training import data as D
from engine.training import captions as C
from engine.training import world as W


def test_palette_and_numbering():
    assert len(W.SHAPES) == 8 and len(W.ASPECTS) == 3 and len(W.COLORS) == 12 and W.N_KINDS == 288
    assert W.COLOR_NAMES[:6] == ("red", "cyan", "white", "orange", "blue", "black")
    assert W.COLORS[10].name == "pink" and W.COLORS[10].hex == "#F7A1C4"
    assert W.COLORS[0].srgb == pytest.approx((0xD6 / 255, 0x27 / 255, 0x28 / 255))
    # linear <-> sRGB round trip
    x = torch.linspace(0, 1, 101)
    assert torch.allclose(W.linear_to_srgb(W.srgb_to_linear(x)), x, atol=1e-5)
    for k in range(W.N_KINDS):
        assert W.kind_index(*W.kind_from_index(k)) == k


def test_held_out_rule():
    assert W.is_held_out(0, 3) and W.is_held_out(1, 2) and W.is_held_out(7, 3)  # 0+3, 1+2, 7+3=10
    assert not W.is_held_out(0, 0) and not W.is_held_out(3, 10)
    held = W.allowed_kinds("heldout")
    assert len(held) == 3 * sum(W.is_held_out(s, c) for s in range(8) for c in range(12))
    assert sorted(held + W.allowed_kinds("train")) == W.allowed_kinds("all") == list(range(288))


def test_sampling_respects_splits():
    g = torch.Generator().manual_seed(0)
    train = [W.sample_spec(g) for _ in range(3000)]
    assert not any(s.held_out for s in train)
    assert len({s.kind for s in train}) == len(W.allowed_kinds("train"))  # every training kind appears
    held = [W.sample_spec(g, split="heldout") for _ in range(500)]
    assert all(s.held_out for s in held)
    for s in train[:200]:
        assert (s.yaw != 0) == (s.shape in W.YAWED_SHAPES) and 0 <= s.yaw < math.pi / 2
        assert abs(s.value_jitter) <= 0.05
    # the training batches of the CLIP trainer and of data.py exclude held-out pairs too
    from engine.training.train_clip import draw_batch

    specs, caps = draw_batch(300, torch.Generator().manual_seed(1))
    assert not any(s.held_out for s in specs) and len(caps) == 300
    assert not any(s.held_out for s in D.sample_object_specs(500, torch.Generator().manual_seed(2)))


def test_sampling_is_deterministic():
    a = [W.sample_spec(torch.Generator().manual_seed(5)) for _ in range(3)]
    b = [W.sample_spec(torch.Generator().manual_seed(5)) for _ in range(3)]
    assert a == b


@pytest.mark.parametrize("shape", range(8))
def test_canonical_size_and_sign(shape):
    lin = torch.linspace(-0.8, 0.8, 161, dtype=torch.float64)  # step 0.01, contains 0
    u, w = torch.meshgrid(lin, lin, indexing="ij")
    for aspect in range(3):
        half = W.aabb_half_extents(shape, aspect)
        assert 2 * half.max() == pytest.approx(1.5)
        spec = W.ObjectSpec(shape, aspect, 0)
        for axis in range(3):  # the AABB is tight: solid just inside each face plane, nothing beyond it
            for sign in (1.0, -1.0):
                def plane(c):
                    cols = [u.reshape(-1), w.reshape(-1)]
                    cols.insert(axis, torch.full_like(cols[0], c))
                    return W.object_sdf(spec, torch.stack(cols, -1), fast=True)
                assert plane(sign * (float(half[axis]) - 0.01)).max() > -1e-3
                assert (plane(sign * (float(half[axis]) + 1e-3)) < 0).all()
        spec = W.ObjectSpec(shape, aspect, 0)
        far = torch.tensor([[0.9, 0.9, 0.9]], dtype=torch.float64)
        assert W.object_sdf(spec, far) < 0 and W.signed_distance(spec, far) > 0
        inside = torch.tensor([[0.0, 0.0, 0.0]], dtype=torch.float64)
        if shape == 4:  # the torus hole
            inside = torch.tensor([[float(W.shape_params(4, aspect)[0]), 0.0, 0.0]], dtype=torch.float64)
        assert W.object_sdf(spec, inside) > 0


@pytest.mark.parametrize("shape", range(8))
def test_sdf_is_a_distance(shape):
    """Exact distance: never more than the distance to any true surface point, and close to the nearest of many."""
    g = torch.Generator().manual_seed(shape)
    for aspect in range(3):
        spec = W.ObjectSpec(shape, aspect, 0, yaw=0.4 if shape in W.YAWED_SHAPES else 0.0)
        surf, normals = D.surface_points([spec], 12000, g)
        surf = surf[0].double()
        assert W.signed_distance(spec, surf).abs().max() < 1e-5  # projected points lie on the surface
        idx = torch.randint(len(surf), (200,), generator=g)
        q = surf[idx] + torch.randn(200, 3, generator=g, dtype=torch.float64) * 0.06
        d = W.signed_distance(spec, q)
        brute = torch.cdist(q, surf).min(1).values
        assert (d.abs() <= brute + 1e-6).all()
        # 12k points on a surface of area <= ~8: spacing ~0.03, so the nearest sample is within ~0.03
        # the capsule is a union of exact pieces: exact outside, a lower bound of the depth inside
        close = d > 0 if shape == 6 else torch.ones_like(d, dtype=torch.bool)
        assert (brute - d.abs())[close].max() < 0.035
        # the fast bound has the same sign and never exceeds the exact distance
        f = W.signed_distance(spec, q, fast=True)
        assert ((f > 0) == (d > 0)).all() and (f.abs() <= d.abs() + 1e-6).all()
        # normals point outward: stepping along them increases the distance
        n = normals[0].double()[idx]
        assert (W.signed_distance(spec, surf[idx] + 0.01 * n) > 0).all()


def test_yaw_rotates_about_z():
    p = torch.randn(100, 3, dtype=torch.float64) * 0.6
    a = W.ObjectSpec(0, 1, 0, yaw=0.3)
    b = W.ObjectSpec(0, 1, 0, yaw=0.0)
    rot = W.rotate_z(p[None], torch.tensor([-0.3], dtype=torch.float64))[0]
    assert torch.allclose(W.signed_distance(a, p), W.signed_distance(b, rot), atol=1e-9)


def test_captions():
    caps = C.all_kind_captions()
    assert len(caps) == 288 and len(set(caps)) == 288
    assert caps[W.kind_index(0, 0, 0)] == "a red cube"
    assert caps[W.kind_index(3, 1, 3)] == "a tall orange cone"
    assert caps[W.kind_index(7, 0, 3)] == "an orange octahedron"
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        s = W.sample_spec(g)
        c = C.caption(s, g)
        assert W.COLOR_NAMES[s.color] in c
        assert W.SHAPES[s.shape] in c or any(w in c for w in C.SHAPE_SYNONYMS.get(s.shape, ()))
        if s.aspect:
            assert any(w in c.split() for w in C.ASPECT_SYNONYMS[s.aspect])
        else:
            assert not any(w in c.split() for ws in C.ASPECT_SYNONYMS.values() for w in ws)
        assert " a o" not in f" {c}" and " a e" not in f" {c}"


def test_analogies_compose_the_kind_from_the_given_kinds_only():
    n_c = len(W.COLORS)
    train = frozenset(W.allowed_kinds("train"))
    for k in W.allowed_kinds("heldout")[:5]:
        triples = W.analogies(k, train)
        assert len(triples) > 100
        g, c = divmod(k, n_c)
        for a, b, cc in triples:
            assert {a, b, cc} <= train and k not in (a, b, cc)
            assert a // n_c == g and b % n_c == a % n_c and cc // n_c == b // n_c and cc % n_c == c
            assert b // n_c != g and a % n_c != c
    assert W.analogies(0, frozenset({0, 1, 12, 13})) == [(1, 13, 12)]  # (g0,c1) - (g1,c1) + (g1,c0)
