"""Images in the runtime: the vision config of a multimodal checkpoint, image input (decoding, size caps,
preprocessing equal to the model's Hugging Face image processor), and the embeddings that go in place of
the image tokens of a prompt."""
