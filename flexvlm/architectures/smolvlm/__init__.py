"""SmolVLM / Idefics3 (transformers' SmolVLMForConditionalGeneration, Idefics3ForConditionalGeneration)"""
