"""Language models: data, pre-training, LoRA, task vectors, merging and evaluation."""
