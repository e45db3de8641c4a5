"""Hand-written kernels, one op family per file. Leaf code: tensors in, tensors out, no nn.Module, no config."""
