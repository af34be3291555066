"""Training utilities, on-the-fly data, and the CLIP trainer (single process and 2-process gloo DDP via torchrun)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from engine.training import data as D
from engine.training import loop
from engine.training import world as W
from engine.training.train_clip import MINI_CLIP_CONFIG, build_clip, main, multi_positive_infonce

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_step_generator_streams():
    a = torch.rand(4, generator=loop.step_generator(0, 0, 5))
    assert torch.equal(a, torch.rand(4, generator=loop.step_generator(0, 0, 5)))
    assert not torch.equal(a, torch.rand(4, generator=loop.step_generator(0, 1, 5)))
    assert not torch.equal(a, torch.rand(4, generator=loop.step_generator(0, 0, 6)))


def test_schedule_and_ema():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = loop.warmup_cosine(opt, warmup=4, total=14, min_ratio=0.1)
    lrs = []
    for _ in range(14):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)  # half way through the cosine
    assert sched.get_last_lr()[0] == pytest.approx(0.1)
    m = torch.nn.Linear(2, 2)
    ema = loop.EMA(m, decay=0.5)
    with torch.no_grad():
        m.weight.add_(2.0)
    ema.update(m)
    assert torch.allclose(ema.shadow["weight"], m.weight - 1.0)


def test_checkpointer_roundtrip(tmp_path):
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters(), lr=0.1)
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    ck = loop.Checkpointer(str(tmp_path))
    ck.save(7, m, opt, extra={"note": 1})
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temp file left behind
    m2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=0.1)
    step, extra = ck.load(m2, opt2)
    assert step == 7 and extra == {"note": 1}
    assert torch.equal(m.weight, m2.weight)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], opt2.state_dict()["state"][0]["exp_avg"])
    from engine.records import EngineError

    with pytest.raises(EngineError):
        loop.Checkpointer(str(tmp_path / "none")).load(m2)


def test_metric_logger(tmp_path, capsys):
    log = loop.MetricLogger(str(tmp_path / "m.jsonl"), every=2)
    for step in range(1, 5):
        log.add(loss=float(step))
        log.maybe_log(step)
    recs = [json.loads(line) for line in open(tmp_path / "m.jsonl")]
    assert [r["step"] for r in recs] == [2, 4] and [r["loss"] for r in recs] == [1.5, 3.5]
    assert "loss=1.5" in capsys.readouterr().out


def test_multi_positive_infonce():
    f = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    kinds = torch.tensor([0, 1, 1, 2])
    scale = torch.tensor(50.0)
    perfect = multi_positive_infonce(f, f, kinds, scale)
    swapped = multi_positive_infonce(f, f[[1, 0, 2, 3]], kinds, scale)
    assert perfect < swapped
    # two same-kind pairs with identical features: the soft target is exactly the softmax -> entropy of 1/2
    g = torch.nn.functional.normalize(torch.eye(3)[[0, 1, 1]], dim=-1)
    loss = multi_positive_infonce(g, g, torch.tensor([0, 1, 1]), torch.tensor(100.0))
    assert loss == pytest.approx(2 / 3 * torch.log(torch.tensor(2.0)).item(), abs=1e-4)


def test_sdf_samples_and_determinism():
    specs = D.sample_object_specs(2, torch.Generator().manual_seed(3))
    a = D.sdf_samples(specs, torch.Generator().manual_seed(4), n_surface=64, n_near=64, n_uniform=64)
    b = D.sdf_samples(specs, torch.Generator().manual_seed(4), n_surface=64, n_near=64, n_uniform=64)
    assert a["points"].shape == (2, 192, 3) and a["sdf"].shape == (2, 192)
    assert torch.equal(a["points"], b["points"]) and torch.equal(a["sdf"], b["sdf"])
    exact = W.object_sdf(specs, a["points"].double()).float()
    assert torch.allclose(exact, a["sdf"], atol=1e-5)
    assert (a["points"][:, 128:].abs() <= 1).all()
    assert torch.allclose(a["colors_linear"][:, 0], D.object_colors(specs))


def test_point_cloud_fps_prefix():
    specs = [W.ObjectSpec(1, 0, 4), W.ObjectSpec(0, 2, 9, yaw=0.2)]
    pc = D.point_clouds(specs, 512, torch.Generator().manual_seed(0), fps_k=32)
    assert pc.shape == (2, 6, 512)
    assert torch.allclose(pc[0, 3:, 0], torch.tensor(W.COLORS[4].srgb, dtype=torch.float32))
    xyz = pc[:, :3].permute(0, 2, 1)
    assert W.signed_distance(specs, xyz.double()).abs().max() < 1e-4
    # the FPS prefix is spread out: its minimum pairwise distance beats that of any random 32 points
    def min_gap(p):
        d = torch.cdist(p, p) + torch.eye(len(p)) * 10
        return d.min()
    assert min_gap(xyz[0, :32]) > 2 * min_gap(xyz[0, 100:132])


def test_multiview_depth_and_cameras():
    spec = [W.ObjectSpec(1, 0, 0)]  # sphere of radius 0.75
    mv = D.multiview(spec, torch.Generator().manual_seed(0), n_views=2, size=33)
    assert mv["rgba"].shape == (1, 2, 33, 33, 4) and mv["origin"].shape == (1, 2, 3)
    assert torch.allclose(mv["origin"].norm(dim=-1), torch.tensor(4.0))
    assert torch.allclose(mv["depth"][0, :, 16, 16], torch.tensor(3.25), atol=2e-3)  # centre pixel
    hit = mv["rgba"][..., 3] > 0
    assert torch.isfinite(mv["depth"][hit]).all() and torch.isinf(mv["depth"][~hit]).all()
    # silhouette area of a sphere of radius 0.75 at distance 4 (tan(0.35) half-width): within 5 %
    radius_px = torch.asin(torch.tensor(0.75 / 4)).tan() / torch.tan(torch.tensor(0.35)) * 16
    assert hit[0, 0].sum().item() == pytest.approx(3.1416 * radius_px.item() ** 2, rel=0.05)


def test_partial_captions_and_their_positives():
    from engine.training.train_clip import PART_COLOR, PART_SHAPE, partial_captions, positives
    from engine.training.world import COLOR_NAMES, ObjectSpec, SHAPES

    specs = [ObjectSpec(0, 2, 3), ObjectSpec(0, 2, 5), ObjectSpec(2, 0, 3)]  # flat cube x2 colours, cylinder
    caps, parts = partial_captions(specs, ["full"] * 3, 1.0, torch.Generator().manual_seed(0))
    for spec, cap, part in zip(specs, caps, parts.tolist()):
        assert part in (PART_SHAPE, PART_COLOR)
        names_colour = COLOR_NAMES[spec.color] in cap
        assert names_colour == (part == PART_COLOR) and (SHAPES[spec.shape] in cap) == (part == PART_SHAPE)
    same, none = partial_captions(specs, ["full"] * 3, 0.0, torch.Generator())
    assert same == ["full"] * 3 and not none.any()
    kinds = torch.tensor([s.kind for s in specs])
    assert torch.equal(positives(kinds), torch.eye(3, dtype=torch.bool))
    # a shape-only caption of the first flat cube describes the second one too; a colour-only one the cylinder
    shape_first = positives(kinds, torch.tensor([PART_SHAPE, 0, 0]))
    assert shape_first[:, 0].tolist() == [True, True, False] and torch.equal(shape_first[:, 1:], torch.eye(3)[:, 1:] > 0)
    colour_first = positives(kinds, torch.tensor([PART_COLOR, 0, 0]))
    assert colour_first[:, 0].tolist() == [True, False, True]
    # the loss uses them: with both cubes embedded alike, a shape-only first caption costs less than a full one
    f = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    t = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.2], [0.0, 1.0]]), dim=-1)
    scale = torch.tensor(100.0)
    assert multi_positive_infonce(f, t, kinds, scale, torch.tensor([PART_SHAPE, 0, 0])) < \
        multi_positive_infonce(f, t, kinds, scale)


def test_clip_fine_tune_starts_from_init(tmp_path):
    from safetensors.torch import load_file

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    main(["--out", a, "--steps", "1", "--batch", "4", "--no-eval", "--device", "cpu", "--seed", "1"])
    main(["--out", b, "--steps", "1", "--batch", "4", "--no-eval", "--device", "cpu", "--lr", "0",
          "--init", os.path.join(a, "clip.safetensors"), "--partial-captions", "0.5"])
    sa, sb = load_file(os.path.join(a, "clip.safetensors")), load_file(os.path.join(b, "clip.safetensors"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # lr 0: the init comes back unchanged


def test_clip_layout_and_resume(tmp_path):
    from open_clip.model import build_model_from_openai_state_dict
    from safetensors.torch import load_file

    out = str(tmp_path / "a")
    main(["--out", out, "--steps", "2", "--batch", "4", "--no-eval", "--device", "cpu", "--log-every", "1"])
    sd = load_file(os.path.join(out, "clip.safetensors"))
    cfg = json.load(open(os.path.join(out, "clip_config.json")))
    from engine.config import to_dict

    assert cfg == json.loads(json.dumps(to_dict(MINI_CLIP_CONFIG)))
    ref = build_model_from_openai_state_dict(dict(sd)).float()
    ref.load_state_dict(sd, strict=True)  # same keys and shapes as the OpenAI layout
    mine = build_clip(MINI_CLIP_CONFIG)
    mine.load_state_dict(sd)
    x = torch.randn(1, 3, 64, 64)
    assert torch.allclose(ref.eval().encode_image(x), mine.eval().encode_image(x), atol=1e-6)
    if MINI_CLIP_CONFIG.text_width // 64 == MINI_CLIP_CONFIG.text_heads:  # the OpenAI loader infers width // 64
        from engine.training.train_clip import tokenize

        tok = tokenize(["a red cube"])
        assert torch.allclose(ref.encode_text(tok), mine.encode_text(tok), atol=1e-6)
    # resuming after step 1 reproduces the uninterrupted run exactly
    out_b = str(tmp_path / "b")
    main(["--out", out_b, "--steps", "1", "--batch", "4", "--no-eval", "--device", "cpu", "--warmup", "1"])
    main(["--out", out_b, "--steps", "2", "--batch", "4", "--no-eval", "--device", "cpu", "--warmup", "1",
          "--resume"])
    out_c = str(tmp_path / "c")
    main(["--out", out_c, "--steps", "2", "--batch", "4", "--no-eval", "--device", "cpu", "--warmup", "1"])
    sb, sc = load_file(os.path.join(out_b, "clip.safetensors")), load_file(os.path.join(out_c, "clip.safetensors"))
    assert all(torch.equal(sb[k], sc[k]) for k in sc)
    # a time budget cuts the steps and ends the schedule there (fake clock: 1 s per read, timed every 2 steps)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop.StepBudget, "clock", staticmethod(_Clock()))
        mp.setattr(loop.StepBudget, "skip", 1)
        mp.setattr(loop.StepBudget, "check_every", 2)
        res = main(["--out", str(tmp_path / "d"), "--steps", "40", "--batch", "4", "--no-eval", "--device", "cpu",
                    "--warmup", "1", "--max-seconds", "8", "--log-every", "1000"])
    assert res["planned_steps"] == 40 and 3 <= res["steps"] <= 8
    assert torch.load(str(tmp_path / "d" / "checkpoint.pt"), weights_only=False)["step"] == res["steps"]


def test_torchrun_two_process_gloo(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "engine.training.train_clip", "--out", str(tmp_path), "--steps", "3", "--batch", "4",
           "--device", "cpu", "--no-eval", "--log-every", "1"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=170)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [x["step"] for x in recs] == [1, 2, 3]  # rank 0 alone logs
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in recs)
    assert (tmp_path / "clip.safetensors").exists() and (tmp_path / "checkpoint.pt").exists()


def test_perturb_condition_text_and_image():
    from engine.training.train_prior import perturb_condition

    g = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(256, 64), dim=-1)
    assert perturb_condition(text, 0.0, g) is text  # off by default: the official recipe
    out = perturb_condition(text, 0.05, g)
    assert torch.allclose(out.norm(dim=-1), torch.ones(256), atol=1e-5)  # still CLIP-like unit vectors
    cos = (out * text).sum(-1)
    # 64 components of std 0.05 -> noise norm ~0.4 -> cosine ~0.93 on average, never the same vector
    assert 0.88 < float(cos.mean()) < 0.97 and float(cos.max()) < 0.999
    grid = torch.randn(8, 128, 64) * 3.0
    rel = (perturb_condition(grid, 0.1, g) - grid).std() / grid.std()
    assert 0.08 < float(rel) < 0.12  # image grids: noise relative to the grid's own scale


def test_analogies_compose_trained_kinds_only():
    """LatentSet.analogy: for a result kind (g, c) it picks kinds (g, c'), (g', c'), (g', c) of the dataset only,
    with g' != g and c' != c; the condition is the unit sum e_A - e_B + e_C and the target z_A - z_B + z_C, so in
    an exactly additive world the target is the result kind's own latent. Kinds absent from the dataset (held-out
    pairs) are never drawn; a result with no usable analogy is flagged, and batch() then keeps its plain row."""
    from engine.training.train_prior import LatentSet
    from engine.training.world import COLORS, N_KINDS, allowed_kinds

    n_c = len(COLORS)
    g = torch.Generator().manual_seed(0)
    shape_part, colour_part = torch.randn(N_KINDS // n_c, 32, generator=g), torch.randn(n_c, 32, generator=g)
    shape_emb, colour_emb = torch.randn(N_KINDS // n_c, 16, generator=g), torch.randn(n_c, 16, generator=g)
    kinds = torch.tensor(allowed_kinds("train"))
    kind = kinds.repeat(2)
    blob = {"latents": shape_part[kind // n_c] + colour_part[kind % n_c], "kind": kind,
            "caption_emb": shape_emb[kinds // n_c] + colour_emb[kinds % n_c], "caption_kind": kinds}
    ds = LatentSet(blob, "text", torch.device("cpu"))
    result = kind[torch.randint(len(kind), (400,), generator=g)]
    cond, x0, ok = ds.analogy(result, torch.Generator().manual_seed(1))
    assert bool(ok.all())
    # exact in an additive world; a held-out kind (absent here) drawn as a source would have no object and no
    # caption of its own (row 0's would stand in) and break both equalities
    assert torch.allclose(x0, blob["latents"][torch.searchsorted(kinds, result)], atol=1e-4)
    raw = shape_emb[result // n_c] + colour_emb[result % n_c]
    assert torch.allclose(cond, torch.nn.functional.normalize(raw, dim=-1), atol=1e-4)
    assert float((ds.analogy(result, torch.Generator().manual_seed(4))[0] - cond).abs().max()) < 1e-4

    # a dataset of one shape-aspect has no analogies: flagged, and the batch falls back to plain rows
    one = kinds[kinds // n_c == 0]
    lone = {"latents": shape_part[0] + colour_part[one % n_c], "kind": one,
            "caption_emb": shape_emb[0] + colour_emb[one % n_c], "caption_kind": one}
    ds1 = LatentSet(lone, "text", torch.device("cpu"))
    assert not bool(ds1.analogy(one, torch.Generator().manual_seed(2))[2].any())
    x0b, _ = ds1.batch(16, torch.Generator().manual_seed(3), analogy_frac=1.0)
    assert any(torch.allclose(r, row) for r in x0b for row in lone["latents"])


def test_partial_caption_rows_name_their_kinds_shape_or_colour():
    """LatentSet.partial: each row's condition becomes one of the partial captions (encode_dataset's bank) of its
    own (shape, aspect) or of its own colour, about half each; the target stays the row's latent; the bank holds
    only parts of the dataset's kinds, and a dataset without it says how to add it."""
    from engine.records import EngineError
    from engine.training.captions import N_PART_KEYS, part_key_of_kind, partial_caption_bank
    from engine.training.train_prior import LatentSet
    from engine.training.world import allowed_kinds

    kinds = torch.tensor(allowed_kinds("train"))
    texts, keys = partial_caption_bank(kinds.tolist())
    assert set(keys.tolist()) == set(range(N_PART_KEYS)) and len(texts) == len(set(texts)) == 4 * N_PART_KEYS
    assert "a tall cube" in texts and "a pink object" in texts and "an orange object" in texts
    blob = {"latents": torch.randn(len(kinds), 8), "kind": kinds, "caption_emb": torch.zeros(len(kinds), 4),
            "caption_kind": kinds}
    with pytest.raises(EngineError, match="partial captions"):
        LatentSet(blob, "text", torch.device("cpu")).batch(4, torch.Generator(), partial_frac=0.5)
    # embed each partial caption as (its key, its index) so a condition tells which caption it is
    blob.update(partial_emb=torch.stack([keys.float(), torch.arange(len(keys)).float(), torch.zeros(len(keys)),
                                         torch.zeros(len(keys))], 1), partial_key=keys)
    ds = LatentSet(blob, "text", torch.device("cpu"))
    k = kinds[torch.randint(len(kinds), (2000,), generator=torch.Generator().manual_seed(0))]
    got = ds.partial(k, torch.Generator().manual_seed(1))[:, 0].long()
    is_shape = got == part_key_of_kind(k, "shape")
    assert bool((is_shape | (got == part_key_of_kind(k, "color"))).all())
    assert 0.45 < float(is_shape.float().mean()) < 0.55
    x0, cond = ds.batch(2000, torch.Generator().manual_seed(2), partial_frac=0.3)
    partial_rows = cond.abs().sum(1) > 0  # plain captions embed to zeros here
    assert 0.25 < float(partial_rows.float().mean()) < 0.35
    kind_of_row = kinds[(x0[:, None] == blob["latents"][None]).all(-1).float().argmax(1)]
    k_used = cond[partial_rows, 0].long()
    assert bool(((k_used == part_key_of_kind(kind_of_row[partial_rows], "shape"))
                 | (k_used == part_key_of_kind(kind_of_row[partial_rows], "color"))).all())


class _Clock:
    """A fake monotonic clock: ``tick`` seconds pass at every read."""

    def __init__(self, tick: float = 1.0):
        self.t, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.t += self.tick
        return self.t


def test_step_budget_fits_the_steps_and_ends_the_cosine_there(monkeypatch):
    clock = _Clock()  # one read per step after the first 5: each step "takes" 1 s
    monkeypatch.setattr(loop.StepBudget, "clock", staticmethod(clock))
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = loop.warmup_cosine(opt, warmup=2, total=100, min_ratio=0.1)
    budget = loop.StepBudget(100, 40.0, sched=sched)
    done = 0
    while done < budget.total:
        opt.step()
        sched.step()
        done += 1
        budget.update(done)
    assert 30 <= done < 45 and budget.total == done  # 40 s at 1 s per step, far fewer than the 100 planned
    assert sched.get_last_lr()[0] == pytest.approx(0.1)  # the schedule reached its floor at the shortened end
    assert budget.record() == {"planned_steps": 100, "time_budget_s": 40.0}
    # a budget that is large enough changes nothing; none at all neither
    for seconds in (1e9, 0.0):
        b = loop.StepBudget(60, seconds, sched=loop.warmup_cosine(opt, 2, 60))
        assert all(b.update(n) == 60 for n in range(1, 61)) and b.sched.lr_lambdas[0].total == 60
    assert loop.StepBudget(60).record() == {}


def test_time_budget_shortens_a_prior_run(tmp_path, monkeypatch):
    from tests.engine.test_training_stages import PRIOR, _blob

    from engine.training import train_prior as tp

    monkeypatch.setattr(loop.StepBudget, "clock", staticmethod(_Clock()))
    cfg = tp.PriorTrainConfig(steps=200, batch=4, warmup=2, log_every=1000, ckpt_every=1000, max_seconds=45.0)
    summary = tp.train_prior(_blob(), str(tmp_path / "p"), cfg, device="cpu", prior_cfg=PRIOR)
    steps = summary["steps"]
    assert 30 <= steps < 60 and summary["planned_steps"] == 200 and summary["time_budget_s"] == 45.0
    state = torch.load(str(tmp_path / "p" / "checkpoint.pt"), weights_only=False)
    assert state["step"] == steps and state["scheduler"]["_last_lr"][0] == pytest.approx(0.1 * cfg.lr)
    assert (tmp_path / "p" / "prior.safetensors").exists()


def test_reproduce_shares_the_time_budget_by_estimated_cost():
    from engine.training.__main__ import PRESETS, estimated_seconds, stage_seconds

    gpu = PRESETS["gpu"]
    est = {s: estimated_seconds(s, gpu[s]) for s in ("clip", "transmitter", "encode", "text_prior", "image_prior")}
    assert 600 < sum(est.values()) < 900  # about 13 min on one H100
    shares = {s: stage_seconds(gpu, s, list(est), 520.0) for s in est}
    assert sum(shares.values()) == pytest.approx(500.0)  # 20 s stay for the export
    assert shares["transmitter"] > shares["clip"] > shares["text_prior"] == shares["image_prior"] > shares["encode"]
    # the last stage gets all that is left
    assert stage_seconds(gpu, "image_prior", ["image_prior"], 100.0) == pytest.approx(80.0)
