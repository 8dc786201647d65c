"""Token-level constants shared by the data pipeline and the model (the LLaVA conventions)."""

IGNORE_INDEX = -100  # label value that the loss skips
IMAGE_TOKEN_INDEX = -200  # placeholder id in input_ids, replaced by the image tokens in the model
IMAGE_PLACEHOLDER = "<image>"  # its spelling in prompt text
