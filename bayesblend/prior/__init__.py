"""The learned prior (galaxy model v2): canonical VAE, latent flow, amortised pose encoder, model bundles."""
