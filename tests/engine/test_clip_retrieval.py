"""`eval --clip-retrieval`: what the mini CLIP itself reads off the evaluation's image prompts."""

import json

import numpy as np
import torch

from engine.eval.clip_retrieval import image_prompt_retrieval, text_prompt_probe
from engine.training import world as W


class _ColourOnlyClip:
    """Reads the colour at the image centre and nothing else: always answers 'a <that colour> cube'."""

    def embed_text(self, captions):
        return torch.eye(W.N_KINDS)[: len(captions)]

    def embed_image(self, images):
        pal = torch.tensor([c.srgb for c in W.COLORS])
        rows = []
        for im in images:
            centre = torch.from_numpy(np.asarray(im)[60:68, 60:68].reshape(-1, 3).astype(np.float32) / 255).mean(0)
            colour = int((pal - centre).norm(dim=1).argmin())
            rows.append(torch.eye(W.N_KINDS)[W.kind_index(0, 0, colour)])
        return torch.stack(rows)


class _TextClip:
    """Text vectors by kind: (shape-aspect part + colour part) when ``additive``, else the held-out kinds get
    vectors of their own, unrelated to their shape and colour; each phrasing adds a little noise."""

    def __init__(self, additive: bool):
        from engine.eval.run import text_prompts

        g = torch.Generator().manual_seed(0)
        n_c = len(W.COLORS)
        sa, col = torch.randn(W.N_KINDS // n_c, 48, generator=g), torch.randn(n_c, 48, generator=g)
        base = torch.stack([sa[k // n_c] + col[k % n_c] for k in range(W.N_KINDS)])
        if not additive:
            held = torch.tensor(W.allowed_kinds("heldout"))
            base[held] = 2 * torch.randn(len(held), 48, generator=g)
        self.table = {}
        for k in range(W.N_KINDS):
            for p in text_prompts(W.ObjectSpec(*W.kind_from_index(k)), 3):
                self.table[p] = base[k] + 0.05 * torch.randn(48, generator=g)

    def embed_text(self, prompts):
        return torch.nn.functional.normalize(torch.stack([self.table[p] for p in prompts]), dim=-1)


def test_text_probe_reads_an_additive_space_and_not_an_arbitrary_one():
    good = text_prompt_probe(_TextClip(additive=True), phrasings=3, steps=300)
    assert good["n"] == 42 * 3
    assert good["probe_shape_aspect_acc"] == good["probe_color_acc"] == good["analogy_top1"] == 1.0
    bad = text_prompt_probe(_TextClip(additive=False), phrasings=3, steps=300)
    assert bad["probe_shape_aspect_train_acc"] == 1.0  # trained kinds are still read
    assert bad["probe_shape_aspect_acc"] < 0.5 and bad["probe_color_acc"] < 0.6 and bad["analogy_top1"] < 0.2


def test_retrieval_scores_shape_and_colour_separately():
    kinds = [W.kind_index(0, 0, 0), W.kind_index(1, 0, 4), W.kind_index(3, 2, 9)]  # cube, sphere, flat cone
    res = image_prompt_retrieval(kinds, _ColourOnlyClip(), seeds=2)
    assert res["n"] == 6
    assert res["color_acc"] == 1.0  # the plain colour of each render is read back
    assert res["shape_acc"] == res["shape_aspect_acc"] == res["kind_acc"] == 2 / 6  # only the cube's two prompts
    assert res["confusions"] == {"blue sphere -> blue cube": 2, "flat green cone -> green cube": 2}


def test_eval_cli_prints_and_stores_the_retrieval(tmp_path, capsys):
    from engine.cli import main

    out = tmp_path / "r.json"
    assert main(["eval", "--model", "mini", "--mode", "none", "--clip-retrieval", "--seeds", "1",
                 "--trained-sample", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "image prompts' CLIP retrieval, held-out: n 42" in printed
    assert "held-out text prompts' CLIP vectors (n 462)" in printed
    res = json.loads(out.read_text())
    held, trained = res["image prompt CLIP retrieval held-out"], res["image prompt CLIP retrieval trained"]
    assert held["n"] == 42 and trained["n"] == 2
    assert 0.0 <= held["shape_acc"] <= 1.0 and held["color_acc"] > 0.8  # the mini CLIP reads colours well
    probe = res["text prompt CLIP probe held-out"]  # shipped CLIP: 100 % / 100 %, analogies 97.6 %
    assert probe["probe_shape_aspect_acc"] > 0.9 and probe["probe_color_acc"] > 0.9
