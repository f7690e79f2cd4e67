"""Model checkpoints: what `--model` names, their architecture configs, weights and tokenizers."""
