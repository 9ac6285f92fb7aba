"""Triton kernels, shared by every method whose math they compute.

Under Triton's interpreter (`TRITON_INTERPRET=1`, set before import) they run
on CPU tensors for correctness tests; their timings then mean nothing.
"""
