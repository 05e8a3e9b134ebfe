"""megatron-tropd."""
