"""Clean, state-dict-compatible port of Open-Sora 1.2 (STDiT3, video VAE, rectified-flow sampler, T5 text)."""
