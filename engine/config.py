"""Typed, frozen configurations for every model of the engine.

The official Shap-E YAML files (``engine/official/configs``) are translated into these dataclasses in exactly one
place, the ``*_from_official`` functions at the bottom; the rest of the engine only ever sees dataclasses.
Field names follow the official constructor arguments where one exists (SHAP-E.md §2).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

OFFICIAL_CONFIG_DIR = Path(__file__).parent / "official" / "configs"


@dataclass(frozen=True)
class DiffusionConfig:
    """Gaussian diffusion of the latent prior (SHAP-E.md §4.1)."""

    timesteps: int = 1024
    schedule: Literal["exp"] = "exp"  # alpha_bar(t) = exp(-12 t), t in [0, 1]
    mean_type: Literal["x_start"] = "x_start"  # the network predicts x0


@dataclass(frozen=True)
class SamplerConfig:
    """Karras sigma list and sampler choice (SHAP-E.md §4.2-4.3)."""

    sampler: Literal["heun", "euler", "dpmpp_2m"] = "heun"
    steps: int = 64
    sigma_min: float = 1e-3
    sigma_max: float = 160.0
    rho: float = 7.0
    guidance_scale: float = 15.0
    clip_denoised: bool = True  # clamp each x0 branch to [-1, 1] before guidance
    part_weight: float = 0.0  # text: share of composed guidance over the prompt's parts (PartsGuidance); 0 = off


@dataclass(frozen=True)
class PriorConfig:
    """Latent diffusion transformer (official SplitVectorDiffusion + CLIP*PointDiffusionTransformer, §3)."""

    cond: Literal["text", "image"]
    width: int = 1024
    layers: int = 24
    heads: int = 16  # text300M 16 (x64), image300M 8 (x128)
    latent_ctx: int = 1024  # latent tokens
    d_latent: int = 1024 * 1024  # flat latent size; channels per token = d_latent // latent_ctx
    clip_dim: int = 768  # text: CLIP embedding width; image: CLIP visual width (grid channels)
    clip_grid_tokens: int = 256  # image only: number of grid tokens
    init_scale: float = 0.25
    pos_emb_init_scale: float = 0.05
    cond_drop_prob: float = 0.1  # training only: probability of zeroing the condition
    learn_sigma: bool = True  # output has a second half of variance values (learned_range)

    @property
    def token_channels(self) -> int:
        return self.d_latent // self.latent_ctx

    @property
    def output_channels(self) -> int:
        return self.token_channels * (2 if self.learn_sigma else 1)


@dataclass(frozen=True)
class NeRSTFConfig:
    """The implicit MLP of the decoder (MLPNeRSTFModel, §5.2)."""

    d_hidden: int = 256
    n_hidden_layers: int = 6  # hidden layers; the MLP has n_hidden_layers + 1 Linear layers
    n_meta_layers: int = 4  # the first n layers take their weights from params_proj
    insert_direction_at: int = 4
    pos_octaves: int = 15  # posenc "nerf": 3 + 2*3*15 = 93 input features
    dir_octaves: int = 8  # direction posenc width 3 + 2*3*8 = 51 (always zeros in official use)
    d_out: int = 12  # [sdf, density_coarse, density_fine, stf_rgb(3), nerf_coarse_rgb(3), nerf_fine_rgb(3)]
    init_scale: float = 0.25
    initial_sdf_bias: float = -0.1
    initial_density_bias: float = 0.1

    @property
    def d_posenc(self) -> int:
        return 3 + 6 * self.pos_octaves

    @property
    def d_direction(self) -> int:
        return 3 + 6 * self.dir_octaves


@dataclass(frozen=True)
class ParamsProjConfig:
    """Latent tokens -> MLP weight rows (ChannelsParamsProj with LayerNorm, §5.1)."""

    d_latent: int = 1024  # channels per latent token
    learned_scale: float = 0.0625  # LayerNorm gain at init
    use_ln: bool = True
    init_scale: float = 1.0


@dataclass(frozen=True)
class DecoderConfig:
    """params_proj + NeRSTF renderer (the 'decoder' part of the transmitter, §5-§8)."""

    nerstf: NeRSTFConfig = field(default_factory=NeRSTFConfig)
    params_proj: ParamsProjConfig = field(default_factory=ParamsProjConfig)
    grid_size: int = 128
    n_coarse_samples: int = 64
    n_fine_samples: int = 128
    bbox_min: tuple[float, float, float] = (-1.0, -1.0, -1.0)
    bbox_max: tuple[float, float, float] = (1.0, 1.0, 1.0)
    background: tuple[float, float, float] = (0.0, 0.0, 0.0)  # black NeRF background

    @property
    def latent_ctx(self) -> int:
        """Latent tokens = rows of the meta layers (d_hidden rows each)."""
        return self.nerstf.n_meta_layers * self.nerstf.d_hidden

    @property
    def d_latent(self) -> int:
        return self.latent_ctx * self.params_proj.d_latent


@dataclass(frozen=True)
class EncoderConfig:
    """PointCloudPerceiverChannelsEncoder with the multiview branch (§10)."""

    width: int = 1024
    layers: int = 12  # 1 point cross-attention + 1 multiview cross-attention ... see encoder module
    heads: int = 8
    init_scale: float = 0.25
    data_ctx: int = 1024  # point-conv centre tokens
    latent_ctx: int = 1024  # latent tokens (= decoder latent_ctx)
    d_latent: int = 1024  # channels per latent token
    n_points: int = 16384  # inner_batch_size[0]
    n_views: int = 20  # inner_batch_size[1]
    input_channels: int = 6
    pos_octaves: int = 15
    pointconv_hidden: tuple[int, ...] = (1024, 1024)
    pointconv_samples: int = 64
    pointconv_patch_size: int = 8
    pointconv_stride: int = 4
    pointconv_radius: float = 0.5
    use_depth: bool = True
    max_depth: float = 9.0
    patch_size: int = 8
    image_size: int = 256
    bottleneck_diffusion_prob: float = 0.1  # training-only noisy tanh bottleneck
    bottleneck_power: float = 5.0  # inv_parabola schedule power


@dataclass(frozen=True)
class ClipConfig:
    """CLIP conditioner. ``arch`` is an open_clip model name or 'custom' with the fields below (mini CLIP)."""

    arch: str = "ViT-L-14"
    pretrained: str = "openai"  # open_clip tag; weights file resolved by the weights manager
    embed_dim: int = 768
    image_size: int = 224
    vision_width: int = 1024
    vision_layers: int = 24
    vision_patch_size: int = 14
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    context_length: int = 77
    vocab_size: int = 49408
    quick_gelu: bool = True
    # Pictures with transparency: None drops alpha as the official transform does (transparent pixels turn black
    # in its premultiplied resize); an sRGB colour in [0, 1] composites them onto that colour first.
    alpha_background: tuple[float, float, float] | None = None

    @property
    def grid_tokens(self) -> int:
        return (self.image_size // self.vision_patch_size) ** 2


@dataclass(frozen=True)
class ModelBundleConfig:
    """Everything one named model ('mini', 'text300M', ...) needs: conditioner, prior, diffusion, decoder."""

    name: str
    clip: ClipConfig
    prior: PriorConfig
    decoder: DecoderConfig
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    encoder: EncoderConfig | None = None


# ----------------------------------------------------------------------------------------------------------------
# JSON round trip (used for the shipped mini model's config file)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _build(cls, data: dict):
    kwargs = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in hints:
            raise ValueError(f"{cls.__name__}: unknown config field {key!r}")
        sub = _NESTED.get((cls, key))
        if sub is not None and value is not None:
            value = _build(sub, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


_NESTED: dict[tuple[type, str], type] = {
    (DecoderConfig, "nerstf"): NeRSTFConfig,
    (DecoderConfig, "params_proj"): ParamsProjConfig,
    (ModelBundleConfig, "clip"): ClipConfig,
    (ModelBundleConfig, "prior"): PriorConfig,
    (ModelBundleConfig, "decoder"): DecoderConfig,
    (ModelBundleConfig, "diffusion"): DiffusionConfig,
    (ModelBundleConfig, "sampler"): SamplerConfig,
    (ModelBundleConfig, "encoder"): EncoderConfig,
}


def from_dict(cls, data: dict):
    """Inverse of ``to_dict``; unknown keys raise."""
    return _build(cls, data)


def load_json(cls, path: str | Path):
    return from_dict(cls, json.loads(Path(path).read_text()))


# ----------------------------------------------------------------------------------------------------------------
# Official YAML / JSON (fixture) configs -> dataclasses: the only place that knows the official field names


def _read(source: str | Path | dict) -> dict:
    if isinstance(source, dict):
        return source
    text = Path(source).read_text()
    return json.loads(text) if str(source).endswith(".json") else yaml.safe_load(text)


def prior_from_official(source: str | Path | dict, *, clip_dim: int | None = None,
                        clip_grid_tokens: int = 256) -> PriorConfig:
    """SplitVectorDiffusion config -> PriorConfig. ``clip_dim`` defaults to ViT-L/14 (768 text, 1024 grid)."""
    d = _read(source)
    if d["name"] != "SplitVectorDiffusion":
        raise ValueError(f"unsupported prior config {d['name']!r}")
    inner = d["inner"]
    cond = {"CLIPImagePointDiffusionTransformer": "text",
            "CLIPImageGridPointDiffusionTransformer": "image"}[inner["name"]]
    if clip_dim is None:
        clip_dim = 768 if cond == "text" else 1024
    return PriorConfig(
        cond=cond, width=inner["width"], layers=inner["layers"], heads=inner["heads"],
        latent_ctx=d["latent_ctx"], d_latent=d["d_latent"], clip_dim=clip_dim,
        clip_grid_tokens=clip_grid_tokens, init_scale=inner.get("init_scale", 0.25),
        pos_emb_init_scale=inner.get("pos_emb_init_scale", 1.0),
        cond_drop_prob=inner.get("cond_drop_prob", 0.0),
    )


def diffusion_from_official(source: str | Path | dict) -> DiffusionConfig:
    d = _read(source)
    return DiffusionConfig(timesteps=d["timesteps"], schedule=d["schedule"], mean_type=d["mean_type"])


def _decoder_from_renderer(renderer: dict, params_proj: dict, d_latent: int) -> DecoderConfig:
    n = renderer["nerstf"]
    nerstf = NeRSTFConfig(
        d_hidden=n["d_hidden"], n_hidden_layers=n["n_hidden_layers"], n_meta_layers=n["n_meta_layers"],
        insert_direction_at=n["insert_direction_at"], init_scale=n.get("init_scale", 0.25),
        initial_density_bias=n.get("initial_density_bias", 0.1),
    )
    pp = ParamsProjConfig(d_latent=d_latent, learned_scale=params_proj.get("learned_scale", 0.0625),
                          use_ln=params_proj.get("use_ln", True), init_scale=params_proj.get("init_scale", 1.0))
    vol = renderer.get("volume", {})
    return DecoderConfig(
        nerstf=nerstf, params_proj=pp, grid_size=renderer.get("grid_size", 128),
        n_coarse_samples=renderer.get("n_coarse_samples", 64), n_fine_samples=renderer.get("n_fine_samples", 128),
        bbox_min=tuple(vol.get("bbox_min", (-1.0, -1.0, -1.0))), bbox_max=tuple(vol.get("bbox_max", (1.0, 1.0, 1.0))),
        background=tuple(float(c) for c in renderer.get("void", {}).get("background", (0, 0, 0))),
    )


def transmitter_from_official(source: str | Path | dict) -> tuple[EncoderConfig, DecoderConfig]:
    """Transmitter config -> (EncoderConfig, DecoderConfig)."""
    d = _read(source)
    for wrapper in ("config", "transmitter_config"):  # fixture JSON files nest the official dict
        if wrapper in d and "name" not in d:
            d = d[wrapper]
    e = d["encoder"]
    bottleneck = e.get("latent_bottleneck", {})
    enc = EncoderConfig(
        width=e["width"], layers=e["layers"], heads=e["heads"], init_scale=e.get("init_scale", 0.25),
        data_ctx=e["data_ctx"], d_latent=e["d_latent"],
        latent_ctx=4 * d["renderer"]["nerstf"]["d_hidden"],
        n_points=e["inner_batch_size"][0], n_views=e["inner_batch_size"][1],
        input_channels=e.get("input_channels", 6), pointconv_hidden=tuple(e["pointconv_hidden"]),
        pointconv_samples=e["pointconv_samples"], pointconv_patch_size=e["pointconv_patch_size"],
        pointconv_stride=e["pointconv_stride"], pointconv_radius=e.get("pointconv_radius", 0.5),
        use_depth=e.get("use_depth", True), max_depth=e.get("max_depth", 9.0), patch_size=e.get("patch_size", 8),
        image_size=e.get("image_size", 256),
        bottleneck_diffusion_prob=bottleneck.get("diffusion_prob", 0.0),
        bottleneck_power=bottleneck.get("diffusion", {}).get("schedule_args", {}).get("power", 5.0),
    )
    dec = _decoder_from_renderer(d["renderer"], e["params_proj"], e["d_latent"])
    return enc, dec


def vector_decoder_from_official(source: str | Path | dict) -> DecoderConfig:
    d = _read(source)
    return _decoder_from_renderer(d["renderer"], d["params_proj"], d["d_latent"])


def official_bundle(name: Literal["text300M", "image300M"]) -> ModelBundleConfig:
    """The full-size official model: prior config + transmitter decoder + diffusion + notebook sampler settings."""
    prior_file = {"text300M": "text_cond_config.yaml", "image300M": "image_cond_config.yaml"}[name]
    prior = prior_from_official(OFFICIAL_CONFIG_DIR / prior_file)
    _, decoder = transmitter_from_official(OFFICIAL_CONFIG_DIR / "transmitter_config.yaml")
    guidance = 15.0 if prior.cond == "text" else 3.0
    return ModelBundleConfig(
        name=name, clip=ClipConfig(), prior=prior, decoder=decoder,
        diffusion=diffusion_from_official(OFFICIAL_CONFIG_DIR / "diffusion_config.yaml"),
        sampler=SamplerConfig(guidance_scale=guidance),
    )
