"""Vision-language models: data (image + text rows), a tiny ViT + projector + mlx-lm decoder,
contrastive / matching / LM losses on the shared training loop, retrieval and zero-shot metrics.

README "Vision-language" describes the formats, the config keys and measured numbers.
"""
