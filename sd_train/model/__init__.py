"""The Stable Diffusion model: `family` tells SD 1.x/2.x from SDXL by the folder's JSON files
(torch-free); `parts` loads the trainable UNet and the frozen VAE, text encoder(s) and tokenizer(s)
from a local diffusers folder; `tokenize` turns captions into each encoder's ids; `conditioning`
is what the UNet is conditioned on (text embeddings, and SDXL's pooled embedding and size/crop
ids); `parallelize` names the UNet's FSDP units."""
