"""The diffusion process itself, independent of any network: noise schedules, samplers (pure
functions over a schedule) and the denoiser wrappers that turn a network into what samplers call."""
