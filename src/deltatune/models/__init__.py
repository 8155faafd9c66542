"""Model-family knowledge, kept small: where the attention and feed-forward parts live."""
