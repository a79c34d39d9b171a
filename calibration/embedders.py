"""The image and text embedders lorasched measures with unless told otherwise (hub ids; a folder works too): EST's
probe β, and `eval`'s and `--balance auto`'s fidelity scores. Names only, so the CLI can show them without loading
the embedding code."""

DEFAULT_EMBEDDER = "facebook/dino-vits16"  # EST-LoRA's probe images: DINO's CLS token
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_DINO = DEFAULT_EMBEDDER
