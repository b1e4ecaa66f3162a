"""Tiny stand-ins for your own diffusers folders, built from configs alone (no hub, seconds on a CPU), to try every
route of ``docs/your-model.md`` offline: a pixel ``DDPMPipeline``, a v-prediction zero-terminal-SNR UNet folder, a
Stable-Diffusion-style pipeline (a CLIP tokenizer over letters, a one-layer text encoder, a ``UNet2DConditionModel``
and a VAE), and a folder of RGB images (scikit-learn's 8×8 digits, upsampled). Their weights are random: what they
show is that the commands run and what they write, not image quality. The tests use them too.

Each builder writes into ``directory`` (``save_pretrained`` layouts) and returns it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .._utils import require

__all__ = ["PROMPT", "image_folder", "pixel_pipeline", "sd3_pipeline", "sd_pipeline", "tiny_tokenizer",
           "vpred_zero_snr_unet"]

SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
PROMPT = "ab"


def image_folder(directory: str | Path, n: int = 40, size: int = 16) -> Path:
    """``n`` RGB PNGs of ``size`` pixels: scikit-learn's 8×8 digits, upsampled."""
    from PIL import Image

    load_digits = require("sklearn.datasets", "data", "the tiny image folder").load_digits
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    images = load_digits().images
    for i in range(n):
        grey = Image.fromarray((images[i] / 16 * 255).astype("uint8"))
        grey.convert("RGB").resize((size, size)).save(directory / f"{i:03d}.png")
    return directory


def tiny_tokenizer(directory: str | Path) -> Any:
    """A CLIP tokenizer from a local vocabulary of letters (written into ``directory``)."""
    CLIPTokenizer = require("transformers", "test", "the tiny text pipeline").CLIPTokenizer
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=8)


def _pixel_unet(size: int = 8, channels: int = 3, seed: int = 0) -> Any:
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()


def pixel_pipeline(directory: str | Path) -> Path:
    """A ``DDPMPipeline`` folder (model_index.json, unet/, scheduler/): ε-prediction, linear betas."""
    from diffusers import DDPMPipeline, DDPMScheduler

    DDPMPipeline(unet=_pixel_unet(), scheduler=DDPMScheduler()).save_pretrained(directory)
    return Path(directory)


def vpred_zero_snr_unet(directory: str | Path) -> Path:
    """A UNet folder with its ``scheduler_config.json`` beside: v-prediction, scaled-linear betas rescaled to zero
    terminal SNR, trailing timesteps (the setting of Lin et al. 2024)."""
    from diffusers import DDPMScheduler

    _pixel_unet(seed=1).save_pretrained(directory)
    DDPMScheduler(**SD_SCHEDULER, rescale_betas_zero_snr=True, prediction_type="v_prediction",
                  timestep_spacing="trailing").save_pretrained(directory)
    return Path(directory)


def sd_pipeline(directory: str | Path) -> Path:
    """A ``StableDiffusionPipeline`` folder: 16×16 RGB images, 4×8×8 latents (VAE f = 2), PNDM scheduler (SD's)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    transformers = require("transformers", "test", "the tiny text pipeline")
    CLIPTextConfig, CLIPTextModel = transformers.CLIPTextConfig, transformers.CLIPTextModel
    directory = Path(directory)
    tokenizer = tiny_tokenizer(directory.parent / f"{directory.name}-tokenizer")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=4, sample_size=16).eval()
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                            scheduler=PNDMScheduler(**SD_SCHEDULER, skip_prk_steps=True), safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(directory)
    return directory


def sd3_pipeline(directory: str | Path) -> Path:
    """A ``StableDiffusion3Pipeline`` folder without text encoders (give ``prompt_embeds`` and
    ``pooled_prompt_embeds`` of width 16 directly): a one-layer ``SD3Transformer2DModel`` on 4×8×8 latents, a VAE with
    SD3's ``shift_factor`` (16×16 RGB images), ``FlowMatchEulerDiscreteScheduler(shift=3)``."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                        pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8], layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, shift_factor=0.0609, scaling_factor=1.5035,
                        use_quant_conv=False, use_post_quant_conv=False, sample_size=16)
    StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                             text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                             text_encoder_3=None, tokenizer_3=None).save_pretrained(directory)
    return Path(directory)
