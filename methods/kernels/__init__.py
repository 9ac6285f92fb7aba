"""Triton kernels, shared by every method whose math they compute.

Under Triton's interpreter (`TRITON_INTERPRET=1`, set before import) they run
on CPU tensors for correctness tests; their timings then mean nothing.

Nothing here imports a method module. Method modules import a kernel inside
the call that launches it, so the references (and `import methods`) work where
Triton cannot be imported; the host-side PyTorch pieces both sides share
(`layout.py`: block layouts; `wy.py`: DeltaNet's WY factors) import no Triton.
"""
