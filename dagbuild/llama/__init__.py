"""Llama decode step: NumPy references for the kernels in ``kernels/llama.cu`` (see :mod:`.reference`)."""
