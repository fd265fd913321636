"""The learned prior: VAE encoder/decoder, latent flow, amortised deblender, model bundles."""
