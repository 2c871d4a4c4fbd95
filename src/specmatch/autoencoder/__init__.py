"""SD-VAE-style KL autoencoder and its PatchGAN discriminator (docs/method.md §5)."""
