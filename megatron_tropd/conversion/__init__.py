"""Checkpoints in and out: HF safetensors (`hf_io`), megatron dist checkpoints (`megatron_io`), and the conversion
CLI behind tools/convert_*.py (`cli`)."""
