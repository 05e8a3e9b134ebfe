"""Model architecture (`arch`), the megatron-core GPTModel builder (`gpt`), the HF <-> megatron name and tensor
mapping (`hf_mapping`), TP/PP sharding of full tensors (`sharding`) and the built-in offline models (`builtin`)."""
