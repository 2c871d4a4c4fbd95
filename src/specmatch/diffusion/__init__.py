"""Latent diffusion (SPEC.md sections 6-7): the denoising networks U-ViT and SiT."""
