"""Preference training: DPO-family losses, reward models, preference data (see each module)."""
