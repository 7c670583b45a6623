"""The Stable Diffusion model: `parts` loads the trainable UNet and the frozen VAE, text encoder and
tokenizer from a local diffusers folder; `parallelize` names the UNet's FSDP units."""
