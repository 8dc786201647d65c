"""VLM architectures other than LLaVA-1.5, one package each: their preprocessing (and, as they are
assembled, their builders and weight conversion)."""
