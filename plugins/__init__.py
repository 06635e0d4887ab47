"""Engine plugins behind one interface (`plugins.base.Engine`).

- `plugins.torch_engine`: the reference PyTorch engine (default; CPU and CUDA).
- `plugins.trtllm`: TensorRT-LLM adapter for NGC containers with a GPU.
"""
