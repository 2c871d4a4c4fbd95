"""Latent diffusion (docs/method.md §6-7): the denoising networks U-ViT and SiT."""
