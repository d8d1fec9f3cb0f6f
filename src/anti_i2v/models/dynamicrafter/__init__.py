"""Clean, state-dict-compatible port of DynamiCrafter (UNet, Resampler, schedule, DDIM sampler)."""
