"""Decoder fine-tune (stage b2): its keep-or-discard rule and one tiny run on a copy of the shipped weights."""

import hashlib
import json
import shutil
from pathlib import Path

from engine.training import finetune_decoder as fd

MINI = Path(fd.__file__).resolve().parents[1] / "weights" / "mini"


def _m(iou, col):
    return {"heldout_iou": iou, "heldout_color_acc": col}


def test_keeps_only_a_held_out_gain_without_a_loss():
    assert fd.improved(_m(0.80, 0.80), _m(0.81, 0.80))
    assert fd.improved(_m(0.80, 0.80), _m(0.797, 0.85))  # IoU within the tolerance, colour better
    assert not fd.improved(_m(0.80, 0.80), _m(0.80, 0.80))  # nothing better
    assert not fd.improved(_m(0.80, 0.80), _m(0.79, 0.90))  # IoU lost beyond the tolerance
    assert not fd.improved(_m(0.80, 0.80), _m(0.85, 0.79))  # colour lost


def test_with_prior_samples_scored_both_must_hold():
    def m(iou, col, piou, pcol):
        return {**_m(iou, col), "heldout_prior_iou": piou, "heldout_prior_color_acc": pcol}

    assert fd.improved(m(0.8, 0.8, 0.7, 0.7), m(0.8, 0.8, 0.72, 0.7))  # only the prior samples gained
    assert fd.improved(m(0.8, 0.8, 0.7, 0.7), m(0.82, 0.8, 0.7, 0.7))  # only the encoder latents gained
    assert not fd.improved(m(0.8, 0.8, 0.7, 0.7), m(0.85, 0.9, 0.7, 0.65))  # prior-sample colour lost
    assert not fd.improved(m(0.8, 0.8, 0.7, 0.7), m(0.7, 0.8, 0.8, 0.9))  # encoder IoU lost


def test_a_short_run_records_its_metrics_and_keeps_the_manifest_consistent(tmp_path):
    folder = tmp_path / "mini"
    shutil.copytree(MINI, folder)
    record = fd.main(["--weights", str(folder), "--seconds", "1", "--objects", "8", "--heldout", "8",
                      "--color-weight", "8", "--latent-noise", "0.1", "--record", "decoder_finetune_test",
                      "--prior-mix", "0.5", "--prior-objects", "4", "--prior-steps", "2"])
    for key in ("train_iou", "heldout_iou", "train_color_acc", "heldout_color_acc", "heldout_prior_iou",
                "heldout_prior_color_acc"):
        assert 0.0 <= record["before"][key] <= 1.0 and 0.0 <= record["after"][key] <= 1.0
    assert record["color_weight"] == 8 and record["steps"] >= 1 and record["prior_mix"] == 0.5
    manifest = json.loads((folder / "mini.json").read_text())
    data = (folder / "transmitter.safetensors").read_bytes()
    assert manifest["files"]["transmitter.safetensors"]["sha256"] == hashlib.sha256(data).hexdigest()
    kept = fd.improved(record["before"], record["after"])
    assert ("decoder_finetune_test" in manifest["training"]) == kept
    assert (data == (MINI / "transmitter.safetensors").read_bytes()) != kept


def test_the_color_head_mode_changes_colours_and_nothing_else():
    import torch

    from engine.mini_weights import load_mini
    from engine.models.implicit_decoder import OUTPUT_SLOTS

    decoder = load_mini("cpu", MINI)["transmitter"].float().decoder
    before = {k: v.clone() for k, v in decoder.state_dict().items()}
    params = fd.restrict_to_color_head(decoder)
    last = decoder.renderer.nerstf.mlp[-1]
    assert params == [last.weight, last.bias]  # (12, H) and (12,); a hook masks all but the 3 colour rows
    assert [p.requires_grad for p in decoder.parameters()].count(True) == 2
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(2, decoder.cfg.d_latent, generator=gen) * 0.3
    points = torch.rand(2, 64, 3, generator=gen) - 0.5
    for _ in range(3):
        out = decoder(latent, points, outputs=("sdf", "stf_rgb"))
        loss = (out["stf_rgb"] - 0.2).square().mean() + out["sdf"].square().mean()  # SDF term must not leak
        opt.zero_grad()
        loss.backward()
        opt.step()
    lo, hi = OUTPUT_SLOTS["stf_rgb"]
    for k, v in decoder.state_dict().items():
        if k.startswith("renderer.nerstf.mlp.6."):
            rows = torch.ones(v.shape[0], dtype=torch.bool)
            rows[lo:hi] = False
            assert torch.equal(v[rows], before[k][rows]), k
            assert not torch.equal(v[lo:hi], before[k][lo:hi]), k
        else:
            assert torch.equal(v, before[k]), k


def test_keep_sdf_targets_the_starting_decoders_own_field():
    """--keep-sdf: the SDF target is the frozen starting decoder's output, so before any step the SDF loss is zero
    (the colour loss is not), while the true-SDF target of the plain mode is not met by the decoder."""
    import copy

    import torch

    from engine.mini_weights import load_mini
    from engine.training.train_transmitter import TransmitterTrainConfig, make_bank

    parts = load_mini("cpu", MINI)
    transmitter = parts["transmitter"].float()
    tcfg = TransmitterTrainConfig(n_surface=32, n_near=64, n_uniform=32, bank_surface=256)
    bank = make_bank(4, "train", 0, parts["configs"]["text"].encoder, tcfg, "cpu")
    latents = fd.encode_bank(transmitter, bank)
    decoder = transmitter.decoder
    anchor = copy.deepcopy(decoder).eval().requires_grad_(False)
    idx = torch.arange(4)
    kept = fd.losses(decoder, latents, bank, idx, tcfg, torch.Generator().manual_seed(1), anchor=anchor)
    plain = fd.losses(decoder, latents, bank, idx, tcfg, torch.Generator().manual_seed(1))
    assert float(kept["sdf"].detach()) < 1e-6 < float(plain["sdf"].detach())
    assert torch.equal(kept["color"], plain["color"]) and float(kept["color"].detach()) > 0
    kept["loss"].backward()  # the colour term still trains the decoder
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in decoder.parameters())
