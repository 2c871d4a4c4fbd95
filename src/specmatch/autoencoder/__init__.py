"""SD-VAE-style KL autoencoder and its PatchGAN discriminator (SPEC.md section 5)."""
