"""QDPO training: prompts, pairs, losses, trainer."""
