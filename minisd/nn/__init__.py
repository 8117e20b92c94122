"""Building blocks shared by every model: attention, ResNet blocks, up/down-sampling, timestep embeddings."""
