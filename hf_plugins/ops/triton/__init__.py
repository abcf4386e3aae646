"""Our own Triton kernels for the fused loss head (imported only when the `triton` backend runs)."""
