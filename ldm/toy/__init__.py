"""The toy world's model-side tools: the attribute scorer that grades generated samples (issue 6)."""
