"""Training stages (b) transmitter, (c) prior, dataset encoding and the mini-weights export, at tiny sizes on CPU.

Each check can fail: losses must fall on a fixed batch, a resumed run must equal an uninterrupted one, the export
must round-trip through the SHA-256-verifying loader and refuse a tampered file, the encoded dataset must hold no
held-out (shape, colour) pair, and two gloo processes must train the prior together.
"""

from __future__ import annotations

import os
import socket
from dataclasses import replace

import pytest
import torch

from engine.config import DecoderConfig, EncoderConfig, NeRSTFConfig, ParamsProjConfig, PriorConfig
from engine.records import EngineError

DEC = DecoderConfig(nerstf=NeRSTFConfig(d_hidden=8), params_proj=ParamsProjConfig(d_latent=4), grid_size=16)
ENC = EncoderConfig(width=32, layers=2, heads=2, data_ctx=16, latent_ctx=DEC.latent_ctx, d_latent=4, n_points=64,
                    n_views=1, pointconv_hidden=(32, 32), pointconv_samples=8, image_size=8, patch_size=8)
PRIOR = PriorConfig(cond="text", width=32, layers=1, heads=2, latent_ctx=8, d_latent=32, clip_dim=16)


def _blob(n=24, kinds=6, seed=0):
    """A latent set where each kind has its own latent pattern (learnable) and two caption embeddings."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(kinds, PRIOR.d_latent, generator=g) * 1.6 - 0.8
    kind = torch.arange(n) % kinds
    emb = torch.nn.functional.normalize(torch.randn(2 * kinds, PRIOR.clip_dim, generator=g), dim=-1)
    return {"latents": centres[kind] + 0.02 * torch.randn(n, PRIOR.d_latent, generator=g), "kind": kind,
            "caption_emb": emb, "caption_kind": torch.arange(2 * kinds) % kinds}


# ------------------------------------------------------------------------------------------------ stage (c)

def test_prior_loss_falls_on_fixed_batch():
    from engine.diffusion.schedules import exp_alphas_cumprod, sigmas_from_alphas_cumprod
    from engine.models.latent_transformer import LatentPrior
    from engine.training.train_prior import LatentSet, diffusion_loss

    torch.manual_seed(0)
    model = LatentPrior(PRIOR)
    ds = LatentSet(_blob(), "text", torch.device("cpu"))
    x0, cond = ds.batch(16, torch.Generator().manual_seed(1))
    table = sigmas_from_alphas_cumprod(exp_alphas_cumprod(1024)).float()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = diffusion_loss(model, x0, cond, torch.Generator().manual_seed(2), sigma_table=table)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_prior_network_input_is_vp_q_sample():
    """c_in(σ)·(x0 + σε) == sqrt(ᾱ) x0 + sqrt(1-ᾱ) ε for the exp schedule (train/sample consistency)."""
    from engine.diffusion.schedules import c_in, exp_alphas_cumprod, sigmas_from_alphas_cumprod

    ac = exp_alphas_cumprod(1024)
    sig = sigmas_from_alphas_cumprod(ac)
    x0, eps = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    for t in (0, 300, 1023):
        lhs = c_in(sig[t]) * (x0 + sig[t] * eps)
        rhs = ac[t].sqrt() * x0 + (1 - ac[t]).sqrt() * eps
        assert torch.allclose(lhs, rhs, atol=1e-9)


def test_prior_resume_equals_uninterrupted(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from engine.training import train_prior as tp

    cfg = tp.PriorTrainConfig(steps=4, batch=4, warmup=1, ckpt_every=2, log_every=100)
    tp.train_prior(_blob(), str(tmp_path / "a"), cfg, device="cpu", prior_cfg=PRIOR)

    calls = {"n": 0}
    original = tp.LatentSet.batch

    def flaky(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # interrupted after the step-2 checkpoint
        return original(self, *args)

    monkeypatch.setattr(tp.LatentSet, "batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        tp.train_prior(_blob(), str(tmp_path / "b"), cfg, device="cpu", prior_cfg=PRIOR)
    monkeypatch.setattr(tp.LatentSet, "batch", original)
    summary = tp.train_prior(_blob(), str(tmp_path / "b"), cfg, device="cpu", prior_cfg=PRIOR, resume=True)
    assert summary["start_step"] == 2
    a = load_file(str(tmp_path / "a" / "prior.safetensors"))
    b = load_file(str(tmp_path / "b" / "prior.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_prior_snapshots_keep_the_ema_weights_along_the_run(tmp_path):
    import json

    from safetensors.torch import load_file

    from engine.training import train_prior as tp

    out = str(tmp_path / "run")
    cfg = tp.PriorTrainConfig(steps=4, batch=4, warmup=1, log_every=100, snapshot_every=2)
    tp.train_prior(_blob(), out, cfg, device="cpu", prior_cfg=PRIOR)
    snaps = sorted(os.listdir(os.path.join(out, "snapshots")))
    assert snaps == ["step_000002", "step_000004"]
    final = load_file(os.path.join(out, "prior.safetensors"))
    last = load_file(os.path.join(tp.snapshot_dir(out, 4), "prior.safetensors"))
    mid = load_file(os.path.join(tp.snapshot_dir(out, 2), "prior.safetensors"))
    assert last.keys() == final.keys() == mid.keys()
    assert all(torch.equal(last[k], final[k]) for k in final)  # the last snapshot is the run's own output
    assert any(not torch.equal(mid[k], final[k]) for k in final)  # an earlier one differs
    cfg_json = json.loads(open(os.path.join(tp.snapshot_dir(out, 2), "prior_config.json")).read())
    assert cfg_json["training"] == {"step": 2} and cfg_json["prior"]["width"] == PRIOR.width
    tp.train_prior(_blob(), str(tmp_path / "plain"), tp.PriorTrainConfig(steps=2, batch=4, warmup=1, log_every=100),
                   device="cpu", prior_cfg=PRIOR)
    assert not os.path.exists(tmp_path / "plain" / "snapshots")  # off by default


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from engine.training import train_prior as tp

    tp.train_prior(_blob(), out, tp.PriorTrainConfig(steps=3, batch=4, warmup=1, log_every=100), device="cpu",
                   prior_cfg=PRIOR)


def test_prior_ddp_two_processes_gloo(tmp_path):
    import json

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert (tmp_path / "prior.safetensors").exists()


# ------------------------------------------------------------------------------------------------ stage (b)

def _tiny_bank(n=2, split="train", seed=0):
    from engine.training.object_bank import build_bank, sample_specs

    g = torch.Generator().manual_seed(seed)
    return build_bank(sample_specs(n, g, split=split), g, n_points=ENC.n_points, data_ctx=ENC.data_ctx,
                      n_surface=128, n_views=ENC.n_views, image_size=ENC.image_size)


def test_object_bank_surface_is_exact_and_fps_first():
    from engine.training.world import signed_distance_tensors

    bank = _tiny_bank()
    idx = torch.arange(len(bank))
    shape, prm, yaw = bank.params(idx)
    assert signed_distance_tensors(shape, prm, yaw, bank.surface).abs().max() < 1e-4
    pts = bank.points[:, :3].transpose(1, 2)  # (B, N, 3)
    assert signed_distance_tensors(shape, prm, yaw, pts).abs().max() < 1e-4
    # the FPS prefix spreads out: its minimum pairwise distance beats the same number of raw points
    k = ENC.data_ctx
    d_fps = torch.cdist(pts[:, :k], pts[:, :k]) + 10 * torch.eye(k)
    d_raw = torch.cdist(pts[:, -k:], pts[:, -k:]) + 10 * torch.eye(k)
    assert (d_fps.amin(dim=(1, 2)) > d_raw.amin(dim=(1, 2))).all()
    assert torch.allclose(bank.points[:, 3:], bank.srgb[:, :, None].expand(-1, -1, ENC.n_points))


def test_transmitter_loss_falls_on_fixed_batch():
    from engine.models.transmitter import Transmitter
    from engine.training.train_transmitter import TransmitterTrainConfig, field_losses

    torch.manual_seed(0)
    bank = _tiny_bank()
    model = Transmitter(ENC, DEC)
    tcfg = TransmitterTrainConfig(n_surface=64, n_near=64, n_uniform=64)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    idx = torch.arange(len(bank))
    first = last = None
    for i in range(40):
        m = field_losses(model, bank, idx, tcfg, torch.Generator().manual_seed(3), training=False)
        opt.zero_grad()
        m["loss"].backward()
        opt.step()
        first = first or {k: v.item() for k, v in m.items()}
        last = {k: v.item() for k, v in m.items()}
    # At these toy sizes the colour term learns first; the SDF's zero set is checked by the IoU metrics of the
    # real run (see train_transmitter's held-out validation).
    assert last["loss"] < 0.85 * first["loss"], (first, last)
    assert last["color_mse"] < 0.7 * first["color_mse"], (first, last)


def test_train_transmitter_writes_official_keys_and_heldout_metrics(tmp_path):
    import json

    from safetensors.torch import load_file

    from engine.models.transmitter import Transmitter
    from engine.training.train_transmitter import TransmitterTrainConfig, train_transmitter

    tcfg = TransmitterTrainConfig(steps=2, batch=2, bank=2, bank_surface=128, n_surface=32, n_near=32,
                                  n_uniform=32, eval_objects=2, eval_every=0, warmup=1)
    summary = train_transmitter(str(tmp_path), tcfg, device="cpu", encoder_cfg=ENC, decoder_cfg=DEC)
    sd = load_file(str(tmp_path / "transmitter.safetensors"))
    assert set(sd) == set(Transmitter(ENC, DEC).state_dict())
    assert any(k.startswith("encoder.params_proj.") for k in sd) and any(k.startswith("renderer.") for k in sd)
    assert {"heldout_iou", "heldout_sign_acc", "val_iou"} <= set(summary["eval_ema"])
    assert json.loads((tmp_path / "transmitter_config.json").read_text())["encoder"]["width"] == ENC.width
    # a time budget (fake clock: 1 s per read, timed every 2 steps) cuts a 40-step run to what 8 s allow
    from engine.training import loop

    with pytest.MonkeyPatch.context() as mp:
        clock = iter(range(1, 10_000))
        mp.setattr(loop.StepBudget, "clock", staticmethod(lambda: float(next(clock))))
        mp.setattr(loop.StepBudget, "skip", 1)
        mp.setattr(loop.StepBudget, "check_every", 2)
        short = train_transmitter(str(tmp_path / "short"), replace(tcfg, steps=40, max_seconds=8.0), device="cpu",
                                  encoder_cfg=ENC, decoder_cfg=DEC)
    assert short["planned_steps"] == 40 and 3 <= short["steps"] <= 8
    assert (tmp_path / "short" / "transmitter.safetensors").exists()


# ------------------------------------------------------------------------------------------------ encoding

def test_train_specs_exclude_held_out_pairs():
    from engine.training.encode_dataset import train_specs
    from engine.training.world import allowed_kinds, is_held_out

    specs = train_specs(1, torch.Generator().manual_seed(0))
    assert len(specs) == len(allowed_kinds("train")) == 288 - len(allowed_kinds("heldout"))
    assert not any(is_held_out(s.shape, s.color) for s in specs)


def test_encode_dataset_holds_only_train_kinds(tmp_path):
    from engine.models.transmitter import Transmitter
    from engine.training.encode_dataset import encode_dataset
    from engine.training.world import is_held_out, kind_from_index

    torch.manual_seed(0)
    model = Transmitter(ENC, DEC).eval()
    out = tmp_path / "latents.pt"
    blob = encode_dataset(model, str(out), per_kind=1, cond_views=2, kind_stride=60, cond_size=8, supersample=1)
    n = len(blob["latents"])
    assert n == 5 and blob["latents"].shape == (n, DEC.d_latent)
    assert blob["latents"].abs().max() <= 1  # tanh bottleneck, no training noise
    assert blob["cond_images"].shape == (n, 2, 8, 8, 3) and blob["cond_images"].dtype == torch.uint8
    for k in blob["kind"].tolist() + blob["caption_kind"].tolist():
        s, _, c = kind_from_index(k)
        assert not is_held_out(s, c)
    assert set(blob["caption_kind"].tolist()) == set(blob["kind"].tolist())
    assert torch.load(out, weights_only=False)["kind"].tolist() == blob["kind"].tolist()


# ------------------------------------------------------------------------------------------------ export

def _fake_run(root):
    """Stage outputs at the real mini sizes with random weights (what export_mini consumes)."""
    from safetensors.torch import save_file

    from engine.conditioning.clip import build_open_clip
    from engine.mini_config import MINI_CLIP, MINI_DECODER, MINI_ENCODER, MINI_IMAGE_PRIOR, MINI_TEXT_PRIOR
    from engine.models.latent_transformer import LatentPrior
    from engine.models.transmitter import Transmitter

    torch.manual_seed(0)
    mods = {"clip/clip.safetensors": build_open_clip(MINI_CLIP),
            "transmitter/transmitter.safetensors": Transmitter(MINI_ENCODER, MINI_DECODER),
            "text_prior/prior.safetensors": LatentPrior(MINI_TEXT_PRIOR),
            "image_prior/prior.safetensors": LatentPrior(MINI_IMAGE_PRIOR)}
    for rel, m in mods.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(root / rel))
    return mods


def test_export_and_load_mini_round_trip_with_sha_check(tmp_path):
    from engine.mini_weights import load_mini
    from engine.training.export import MAX_TOTAL_BYTES, export_mini

    mods = _fake_run(tmp_path / "run")
    out = tmp_path / "weights"
    meta = export_mini(tmp_path / "run", out, training={"steps": 0})
    assert meta["total_bytes"] <= MAX_TOTAL_BYTES
    assert sorted(p.name for p in out.iterdir()) == ["clip.safetensors", "image_prior.safetensors", "mini.json",
                                                     "text_prior.safetensors", "transmitter.safetensors"]
    loaded = load_mini("cpu", out)
    ref = mods["text_prior/prior.safetensors"].state_dict()
    got = loaded["text_prior"].state_dict()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k].half().float())
    assert set(loaded["transmitter"].state_dict()) == set(mods["transmitter/transmitter.safetensors"].state_dict())

    path = out / "transmitter.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(EngineError, match="corrupted"):
        load_mini("cpu", out)


def test_export_refuses_missing_stage(tmp_path):
    from engine.training.export import export_mini

    with pytest.raises(EngineError, match="missing stage outputs"):
        export_mini(tmp_path, tmp_path / "w")
    assert not (tmp_path / "w" / "mini.json").exists()


def test_reproduce_priors_only_from_shipped_weights(tmp_path):
    """--from-weights keeps the exported CLIP and transmitter bit for bit and retrains only encode + priors."""
    from safetensors.torch import load_file

    from engine.mini_weights import MINI_DIR, load_mini
    from engine.training.__main__ import reproduce

    with pytest.raises(SystemExit, match="--from-weights"):
        reproduce(str(tmp_path / "refused"), device="cpu", preset="gpu-priors")
    export = tmp_path / "export"
    record = reproduce(str(tmp_path / "run"), device="cpu", preset="smoke", export_to=str(export),
                       from_weights=str(MINI_DIR), time_budget=900.0)
    assert record["from_weights"] == str(MINI_DIR) and "decoder_finetune" in record
    assert record["text_prior"]["result"]["steps"] == 2 and record["time_budget_s"] == 900.0
    assert 0 < record["text_prior"]["result"]["time_budget_s"] < record["image_prior"]["result"]["time_budget_s"]
    for name in ("clip.safetensors", "transmitter.safetensors", "text_prior.safetensors"):
        old, new = load_file(str(MINI_DIR / name)), load_file(str(export / name))
        same = all(torch.equal(old[k], new[k]) for k in old)
        assert same == (name != "text_prior.safetensors"), name
    parts = load_mini("cpu", export)  # SHA-256 verified
    assert parts["manifest"]["training"]["from_weights"] == str(MINI_DIR)


def test_prior_init_continues_from_given_weights(tmp_path):
    """--init: 0 steps writes the given weights back unchanged; 2 more steps stay next to them, far from the
    random init that the same run would otherwise start from."""
    from safetensors.torch import load_file

    from engine.training import train_prior as tp

    def run(name, **kw):
        tp.train_prior(_blob(), str(tmp_path / name), tp.PriorTrainConfig(batch=8, warmup=1, log_every=1000, **kw),
                       device="cpu", prior_cfg=PRIOR)
        return load_file(str(tmp_path / name / "prior.safetensors"))

    trained = run("a", steps=60, lr=3e-3, seed=1)
    init = str(tmp_path / "a" / "prior.safetensors")
    assert all(torch.equal(trained[k], v) for k, v in run("b", steps=0, init=init).items())
    cont, fresh = run("c", steps=2, init=init), run("d", steps=0)

    def dist(x, y):
        return sum(float((x[k] - y[k]).square().sum()) for k in x) ** 0.5

    assert dist(cont, trained) < 0.1 * dist(fresh, trained)


def test_export_from_weights_swaps_in_separately_trained_priors(tmp_path):
    """`export --from-weights`: a run holding only prior folders gets the exported CLIP + transmitter bit for bit
    and the training record of that folder; a run with its own CLIP stage is refused."""
    from safetensors.torch import load_file, save_file

    from engine.mini_weights import MINI_DIR, load_mini, read_manifest
    from engine.training.__main__ import main

    run, export = tmp_path / "run", tmp_path / "export"
    shipped = {m: load_file(str(MINI_DIR / f"{m}_prior.safetensors")) for m in ("text", "image")}
    for mode, state in shipped.items():
        (run / f"{mode}_prior").mkdir(parents=True)
        if mode == "text":  # a "fine-tuned" text prior
            state = {k: v.float() + 0.01 if v.is_floating_point() else v for k, v in state.items()}
        save_file({k: v.float().contiguous() for k, v in state.items()}, str(run / f"{mode}_prior" / "prior.safetensors"))
    main(["export", "--out", str(run), "--export-to", str(export), "--from-weights", str(MINI_DIR)])
    parts = load_mini("cpu", export)  # SHA-256 verified
    assert parts["manifest"]["training"]["decoder_finetune"] == read_manifest()["training"]["decoder_finetune"]
    for name in ("clip.safetensors", "transmitter.safetensors", "image_prior.safetensors", "text_prior.safetensors"):
        old, new = load_file(str(MINI_DIR / name)), load_file(str(export / name))
        assert old.keys() == new.keys(), name
        same = all(torch.equal(old[k], new[k]) for k in old)
        assert same == (name != "text_prior.safetensors"), name
    with pytest.raises(SystemExit, match="its own clip"):
        main(["export", "--out", str(run), "--export-to", str(tmp_path / "again"), "--from-weights", str(MINI_DIR)])
    # a run that fine-tuned only the text prior: the image prior comes over from the folder, value for value
    only_text = tmp_path / "only_text"
    (only_text / "text_prior").mkdir(parents=True)
    (only_text / "text_prior" / "prior.safetensors").write_bytes((run / "text_prior" / "prior.safetensors").read_bytes())
    main(["export", "--out", str(only_text), "--export-to", str(tmp_path / "export2"), "--from-weights", str(MINI_DIR)])
    for name in ("image_prior.safetensors", "text_prior.safetensors"):
        a, b = load_file(str(export / name)), load_file(str(tmp_path / "export2" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_prior_trains_with_analogies_and_refuses_them_for_images(tmp_path):
    """--analogy-frac runs end to end on text conditions (the tiny blob's kinds are too few for analogies, so
    rows fall back to plain ones and training still proceeds) and is refused for image conditions."""
    from engine.training import train_prior as tp

    cfg = tp.PriorTrainConfig(steps=2, batch=8, warmup=1, log_every=1000, analogy_frac=0.5)
    assert tp.train_prior(_blob(), str(tmp_path / "t"), cfg, device="cpu", prior_cfg=PRIOR)["steps"] == 2
    with pytest.raises(EngineError, match="text conditions only"):
        tp.train_prior(_blob(), str(tmp_path / "i"), replace(cfg, cond="image"), device="cpu", prior_cfg=PRIOR)
