"""Vanilla GAN of the latent-disentanglement experiments (networks, losses, training)."""
