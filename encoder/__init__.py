"""The Fundus2Video model library: generator, discriminators, losses, synthesis, metrics.

The only package that imports torch.nn layers. Tensor-level: arrays in, arrays out;
it never imports `index` or `retrieval`. Training lives in `encoder.train`.
"""

from .augment import AugmentConfig, augment_cf, augment_video
from .backbones import BackboneSpec
from .checkpoint import (
    create_generator,
    create_scale,
    load_generator,
    read_checkpoint_config,
    save_generator,
)
from .configs import (
    DiscriminatorConfig,
    GeneratorConfig,
    NCEConfig,
    ScaleConfig,
    get_scale,
    list_scales,
)
from .data import PairedVideos, estimate_fov, fit_square
from .discriminator import MultiscaleDiscriminator
from .embedder import (
    Embedder,
    EmbedderConfig,
    create_embedder,
    embed_cf_array,
    embed_ffa_array,
    embedder_id,
    fit_training_statistics,
    load_embedder,
    read_embedder_config,
    save_embedder,
)
from .errors import CheckpointError, ConfigError, DataError, EncoderError, UnknownModel
from .evaluate import cf_green_videos, evaluate_generation, train_mean_videos
from .fov import (
    FovCircle,
    detect_fov,
    detect_video_fov,
    fov_square,
    fov_square_video,
)
from .losses import (
    PatchSampleMLP,
    VGGLoss,
    feature_matching_loss,
    gradient_variance_loss,
    knowledge_mask,
    load_vgg19_features,
    lsgan_loss,
    masked_l1,
    patch_nce_loss,
)
from .metrics import (
    frechet_distance,
    fvd,
    fvd_proxy,
    i3d_features,
    lesion_psnr,
    load_i3d,
    proxy_features,
    psnr,
    ssim,
    temporal_consistency_gap,
)
from .networks import Generator, count_parameters, gem_pool
from .ranking import recall_at_k
from .synthesis import synthesize, synthesize_batch, synthesize_tensor

__all__ = [
    "AugmentConfig",
    "BackboneSpec",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DiscriminatorConfig",
    "Embedder",
    "EmbedderConfig",
    "FovCircle",
    "EncoderError",
    "Generator",
    "GeneratorConfig",
    "MultiscaleDiscriminator",
    "NCEConfig",
    "PairedVideos",
    "PatchSampleMLP",
    "ScaleConfig",
    "UnknownModel",
    "VGGLoss",
    "augment_cf",
    "augment_video",
    "cf_green_videos",
    "count_parameters",
    "create_embedder",
    "create_generator",
    "create_scale",
    "detect_fov",
    "detect_video_fov",
    "embed_cf_array",
    "embed_ffa_array",
    "embedder_id",
    "estimate_fov",
    "evaluate_generation",
    "feature_matching_loss",
    "fit_training_statistics",
    "fit_square",
    "fov_square",
    "fov_square_video",
    "frechet_distance",
    "fvd",
    "fvd_proxy",
    "gem_pool",
    "get_scale",
    "gradient_variance_loss",
    "i3d_features",
    "knowledge_mask",
    "lesion_psnr",
    "list_scales",
    "load_embedder",
    "load_generator",
    "load_i3d",
    "load_vgg19_features",
    "lsgan_loss",
    "masked_l1",
    "patch_nce_loss",
    "proxy_features",
    "psnr",
    "read_checkpoint_config",
    "read_embedder_config",
    "recall_at_k",
    "save_embedder",
    "save_generator",
    "ssim",
    "synthesize",
    "synthesize_batch",
    "synthesize_tensor",
    "temporal_consistency_gap",
    "train_mean_videos",
]
