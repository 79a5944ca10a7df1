"""The CUDA path: the Triton-kernel model, packed linears, CUDA graphs and the kernels."""
