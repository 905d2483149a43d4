"""Distillation from a teacher model served over HTTP (Ollama or an OpenAI-compatible server)."""
