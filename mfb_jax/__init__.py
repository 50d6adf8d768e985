"""mfb-jax: multi-modal factorized bilinear fusion for YouTube-8M video classification."""
