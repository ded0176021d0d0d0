"""The Wan family: the Wan2.x transformer, VAE and UMT5 text encoder."""
