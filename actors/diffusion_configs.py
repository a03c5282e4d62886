"""Model configurations written in code, so `tiny` and `sdxl-random` need no download.

Plain dicts only (no torch import): `actors.diffusion_models` turns them into diffusers /
transformers models. The full-size ones copy the published configs of
`stabilityai/stable-diffusion-xl-base-1.0` (unet, vae, text_encoder, text_encoder_2, scheduler)
and `diffusers/controlnet-canny-sdxl-1.0`; the tiny ones follow diffusers' own
`get_dummy_components()` of its SDXL / SD ControlNet pipeline tests.
"""

from __future__ import annotations

# --- full-size SDXL (sdxl-random) ---------------------------------------------------------
SDXL_UNET: dict = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,  # 6 * 256 (size/crop/target ids) + 1280 pooled
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

SDXL_CONTROLNET: dict = {
    key: SDXL_UNET[key]
    for key in (
        "act_fn", "addition_embed_type", "addition_embed_type_num_heads", "addition_time_embed_dim",
        "attention_head_dim", "block_out_channels", "cross_attention_dim", "down_block_types",
        "flip_sin_to_cos", "freq_shift", "in_channels", "layers_per_block", "norm_eps",
        "norm_num_groups", "projection_class_embeddings_input_dim",
        "transformer_layers_per_block", "use_linear_projection",
    )
} | {
    "conditioning_channels": 3,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb",
}

SDXL_VAE: dict = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,  # the SDXL VAE overflows in fp16; diffusers upcasts it to fp32 to decode
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# CLIP ViT-L/14 text tower (SDXL text_encoder, also SD1.5's only text encoder).
CLIP_L_TEXT: dict = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "layer_norm_eps": 1e-05,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

# OpenCLIP ViT-bigG/14 text tower with projection (SDXL text_encoder_2).
CLIP_BIGG_TEXT: dict = CLIP_L_TEXT | {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}

# The scheduler config SDXL and SD1.5 were trained with (betas and timesteps).
LDM_SCHEDULER: dict = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}

# --- tiny (tests; random weights) ---------------------------------------------------------
TINY_SDXL_UNET: dict = {
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": [2, 4],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "transformer_layers_per_block": [1, 2],
    "projection_class_embeddings_input_dim": 80,  # 6 * 8 + 32 (text_encoder_2 projection)
    "cross_attention_dim": 64,  # 32 + 32: both text encoders' hidden states concatenated
}

TINY_SDXL_CONTROLNET: dict = {
    key: TINY_SDXL_UNET[key]
    for key in (
        "block_out_channels", "layers_per_block", "in_channels", "down_block_types",
        "attention_head_dim", "use_linear_projection", "addition_embed_type",
        "addition_time_embed_dim", "transformer_layers_per_block",
        "projection_class_embeddings_input_dim", "cross_attention_dim",
    )
} | {"conditioning_embedding_out_channels": [16, 32]}  # one stride-2 conv = VAE factor 2

TINY_SD15_UNET: dict = {
    "block_out_channels": [4, 8],
    "layers_per_block": 2,
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 32,
    "norm_num_groups": 2,
}

TINY_SD15_CONTROLNET: dict = {
    key: TINY_SD15_UNET[key]
    for key in ("block_out_channels", "layers_per_block", "in_channels", "down_block_types",
                "cross_attention_dim", "norm_num_groups")
} | {"conditioning_embedding_out_channels": [16, 32]}

TINY_VAE: dict = {
    "block_out_channels": [32, 64],
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "latent_channels": 4,
}

TINY_SD15_VAE: dict = TINY_VAE | {"block_out_channels": [4, 8], "norm_num_groups": 2}

# Token ids are set by diffusion_models from the in-memory tokenizer it builds.
TINY_CLIP_TEXT: dict = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "layer_norm_eps": 1e-05,
    "num_attention_heads": 4,
    "num_hidden_layers": 5,
    "max_position_embeddings": 77,
    "vocab_size": 1000,
    "hidden_act": "gelu",
    "projection_dim": 32,
}
