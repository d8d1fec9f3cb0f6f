"""Small image-to-video models that really learned, trained here from photos that ship with
scikit-image, in the official diffusers layouts: the only way to measure protection strength
without downloading real weights. See README.md."""
