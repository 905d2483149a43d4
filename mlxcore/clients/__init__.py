"""Clients of model servers: the chat client for Ollama / OpenAI-compatible APIs (`chat`) and where
their API keys come from (`secrets`). Used by distillation (the teacher) and the bench (endpoint targets)."""
