"""bfloat16 on CPUs that compute it natively: the same networks, about twice as fast, for inference and training.

A CPU with AVX512-BF16 or AMX-BF16 runs nnU-Net's 3D convolutions in bfloat16 at about twice the float32 speed
(measured on this project's 2-core AMD EPYC: one 80^3 forward pass of the bundled 1 mm network 0.049 s instead of
0.111 s; one training step of 2 patches 0.59 s instead of 1.10 s). Only the network's forward pass runs under
PyTorch's autocast, and its outputs come back in float32: weights, optimizer, losses, softmax and nnU-Net's data
augmentation stay in float32 (augmentation under autocast would compute its sampling grids in bfloat16, a fraction
of a voxel off). Where bfloat16 would be emulated (older x86, Apple CPUs) it is slower than float32, so float32 is
kept there; on CUDA nnU-Net autocasts to float16 itself.
"""

from __future__ import annotations

from typing import Any


def native_bfloat16() -> bool:
    """Whether this x86 CPU has bfloat16 instructions (AVX512-BF16 or AMX-BF16)."""
    import torch

    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def bfloat16_forward(network, device, enabled: bool = True) -> bool:
    """Run ``network``'s forward pass in bfloat16 from now on, if ``enabled`` and ``device`` is a CPU with native
    bfloat16; returns whether it does. The module, its state dict and its checkpoints are unchanged."""
    import torch

    if not (enabled and getattr(device, "type", device) == "cpu" and native_bfloat16()):
        return False
    forward = network.forward

    def forward_in_bfloat16(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = forward(*args, **kwargs)
        return _float32(output)

    network.forward = forward_in_bfloat16
    return True


def _float32(output: Any) -> Any:
    """The network's output (a tensor, or one per deep-supervision level) in float32."""
    if isinstance(output, (list, tuple)):
        return type(output)(_float32(item) for item in output)
    return output.float()
