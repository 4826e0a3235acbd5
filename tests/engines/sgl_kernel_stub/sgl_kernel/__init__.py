"""Stand-in for `sgl_kernel` so that SGLang starts on a CPU-only machine (tests/engines only).

The published sgl-kernel / sglang-kernel wheels hold CUDA kernels only, yet SGLang's CPU path imports a
few names from `sgl_kernel` at start-up (e.g. mem_cache/memory_pool.py: `copy_all_layer_kv_cache_cpu`).
With `--device cpu --attention-backend torch_native` none of them is called, so every attribute here is
a function that raises NotImplementedError naming itself: a call would fail loudly, not silently.
SGLang 0.5.23 asks it for: copy_all_layer_kv_cache_cpu, assign_req_to_token_pool_cpu,
assign_extend_cache_locs_cpu, assign_draft_cache_locs_contiguous_cpu, build_tree_kernel_efficient_cpu,
fill_accept_out_cache_loc_cpu, fill_bonus_tokens_cpu, verify_tree_greedy_cpu and rmsnorm.
The real wheel (sglang-kernel, installed with sglang) fails to import without CUDA (libcuda.so.1), so
tests/engines puts this directory first on SGLang's PYTHONPATH, where it shadows that wheel.
"""


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def missing(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name} is a stand-in (tests/engines/sgl_kernel_stub): "
                                  "the CPU test tier must not call it")

    missing.__name__ = missing.__qualname__ = name
    return missing
