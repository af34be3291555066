"""The transmitter: encoder + decoder in the official checkpoint layout (SHAP-E.md §1, §2.4, §9).

The official ``transmitter.pt`` holds ``encoder.*`` (the point-cloud/multiview perceiver *and*, under
``encoder.params_proj.*``, the latent -> MLP-weights projection) and ``renderer.*`` (the NeRSTF field). Our decoder
(``ImplicitDecoder``) owns ``params_proj`` and ``renderer``; here the very same module objects are registered at the
official paths (``encoder.params_proj``, ``renderer``), so ``Transmitter.state_dict()`` has exactly the official
keys, ``load_state_dict(torch.load('transmitter.pt'), strict=True)`` works, and ``transmitter.decoder`` is a
standalone decoder (vector-decoder keys) sharing those parameters — training the transmitter trains it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..config import DecoderConfig, EncoderConfig, transmitter_from_official
from ..records import EngineError
from .encoder import PointCloudEncoder
from .implicit_decoder import ImplicitDecoder


class Transmitter(nn.Module):
    def __init__(self, encoder_cfg: EncoderConfig, decoder_cfg: DecoderConfig, *,
                 device: torch.device | str | None = None):
        super().__init__()
        if encoder_cfg.latent_ctx != decoder_cfg.latent_ctx or encoder_cfg.d_latent != decoder_cfg.params_proj.d_latent:
            raise EngineError(
                f"encoder latent ({encoder_cfg.latent_ctx} x {encoder_cfg.d_latent}) does not match the decoder "
                f"({decoder_cfg.latent_ctx} x {decoder_cfg.params_proj.d_latent})",
                "latent_ctx must be 4 x NeRSTF d_hidden and d_latent the params_proj token width")
        self.encoder = PointCloudEncoder(encoder_cfg, device=device)
        decoder = ImplicitDecoder(decoder_cfg, device=device)
        self.encoder.add_module("params_proj", decoder.params_proj)  # official key path encoder.params_proj.*
        self.renderer = decoder.renderer
        self._decoder = (decoder,)  # a tuple keeps it out of the module tree (its modules are registered above)

    @classmethod
    def from_official_config(cls, source: str | Path | dict, *,
                             device: torch.device | str | None = None) -> "Transmitter":
        """From an official transmitter YAML / fixture JSON config."""
        enc, dec = transmitter_from_official(source)
        return cls(enc, dec, device=device)

    @property
    def decoder(self) -> ImplicitDecoder:
        return self._decoder[0]

    def encode_to_latent(self, points, views, depths, alphas, rays, camera_z, *, training: bool | None = None,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """Inputs as ``PointCloudEncoder.encode`` (see encoder_inputs.py) -> latent (B, latent_ctx·d_latent) after
        the bottleneck (tanh; plus diffusion noise when ``training``, default: the module's training mode)."""
        x = self.encoder.encode(points, views, depths, alphas, rays, camera_z, generator=generator)
        return self.encoder.bottleneck(x, training=self.training if training is None else training,
                                       generator=generator)

    def encode_batch(self, batch, **kwargs) -> torch.Tensor:
        """``encode_to_latent`` on an ``encoder_inputs.EncoderBatch``."""
        return self.encode_to_latent(*batch.tensors(), **kwargs)

    def latent_to_params(self, latent: torch.Tensor) -> list[torch.Tensor]:
        """latent (B, d_latent) -> the four per-latent NeRSTF weight matrices (B, out, in) (official
        ``bottleneck_to_params``)."""
        return self.decoder.project(latent)

    def forward(self, *inputs, **kwargs) -> torch.Tensor:
        return self.encode_to_latent(*inputs, **kwargs)
