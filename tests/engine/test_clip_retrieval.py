"""`eval --clip-retrieval`: what the mini CLIP itself reads off the evaluation's image prompts."""

import json

import numpy as np
import torch

from engine.eval.clip_retrieval import image_prompt_retrieval
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
    assert "image prompts' CLIP retrieval, held-out: n 42" in capsys.readouterr().out
    res = json.loads(out.read_text())
    held, trained = res["image prompt CLIP retrieval held-out"], res["image prompt CLIP retrieval trained"]
    assert held["n"] == 42 and trained["n"] == 2
    assert 0.0 <= held["shape_acc"] <= 1.0 and held["color_acc"] > 0.8  # the mini CLIP reads colours well
