"""GSM8K reinforcement learning: rewards, GRPO objective, rollout and update (no Prefect here)."""
