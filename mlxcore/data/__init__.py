"""Data stages: synthetic generation, tokenizers, pretokenized shards and batch loaders."""
