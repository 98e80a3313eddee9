"""Token ids with a meaning of their own, shared by the data (which writes them) and the model
(which reads them); a leaf module, so neither imports the other."""

IMAGE_TOKEN_ID = -200  # in input_ids: the image's tokens stand here (LLaVA's IMAGE_TOKEN_INDEX)
