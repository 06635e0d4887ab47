"""Engine plugins behind one interface (`plugins.base.Engine`).

- `plugins.torch_engine`: the reference PyTorch engine (the default; CPU and CUDA).
"""
