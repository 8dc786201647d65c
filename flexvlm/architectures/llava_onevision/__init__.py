"""LLaVA-OneVision (transformers' LlavaOnevisionForConditionalGeneration)"""
