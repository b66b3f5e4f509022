"""Attention microbenchmark (not a test): forward + backward time of each kernel at the ViT-B MAE shapes.

    python -m usf_mae_jax.attention_bench [--batch 256] [--dtype bfloat16] [--steps 20] [--variant base]

For the encoder (1 + 49 kept tokens) and the decoder (1 + 196 tokens) of the chosen variant at 224 px, it
times `jax.value_and_grad` of each kernel of models/attention.py on a (batch, tokens, 3, heads, head_dim) qkv
array: 'custom' (the hand-written VJP), 'xla' (jax.nn.dot_product_attention's XLA path) and 'cudnn' (flash
attention, with the decoder's odd length padded), the last only on NVIDIA GPUs with a 16-bit dtype. A kernel
that fails to compile or run is reported with its error instead of stopping the others. Each line of output is
one JSON record; the attention FLOPs (4 * B * H * N^2 * hd forward, 3x that with the backward) give TFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp

from usf_mae_jax.models import attention, mae, vit

KERNELS = ("custom", "xla", "cudnn")


def shapes(variant: str, img_size: int, mask_ratio: float) -> dict[str, tuple[int, int, int]]:
    """{'encoder'|'decoder': (tokens, heads, head_dim)} of a variant's pretraining step."""
    config = vit.model_config(variant, img_size=img_size)
    kept = mae.num_kept(config.num_patches, mask_ratio)
    return {"encoder": (kept + 1, config.heads, config.width // config.heads),
            "decoder": (config.num_patches + 1, config.decoder_heads, config.decoder_width // config.decoder_heads)}


def time_kernel(kernel: str, qkv: jax.Array, steps: int) -> dict:
    """Compiles and times forward + backward of one kernel; the record of the measurement."""
    step = jax.jit(jax.value_and_grad(lambda x: jnp.sum(attention.multi_head_attention(x, kernel)
                                                        .astype(jnp.float32))))
    start = time.perf_counter()
    jax.block_until_ready(step(qkv))
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        out = step(qkv)
    jax.block_until_ready(out)
    seconds = (time.perf_counter() - start) / steps
    batch, tokens, _, heads, head_dim = qkv.shape
    flops = 3 * 4 * batch * heads * tokens**2 * head_dim
    return {"ms": 1000 * seconds, "tflops": flops / seconds / 1e12, "compile_s": compile_s}


def run(batch: int, dtype: str, steps: int, variant: str, img_size: int, mask_ratio: float) -> list[dict]:
    platform = attention.current_platform()
    records = []
    for where, (tokens, heads, head_dim) in shapes(variant, img_size, mask_ratio).items():
        qkv = jax.random.normal(jax.random.key(0), (batch, tokens, 3, heads, head_dim), jnp.dtype(dtype))
        for kernel in KERNELS:
            record = {"where": where, "kernel": kernel, "batch": batch, "tokens": tokens, "heads": heads,
                      "head_dim": head_dim, "dtype": dtype}
            if kernel == "cudnn" and not (platform == "cuda" and attention.cudnn_supports(dtype, head_dim)):
                record.update(status="skipped", reason=f"cuDNN flash attention needs an NVIDIA GPU and a 16-bit "
                                                       f"dtype ({platform}, {dtype})")
            else:
                try:
                    record.update(status="ok", **time_kernel(kernel, qkv, steps))
                except Exception as error:  # a kernel the platform rejects is a result, not a crash
                    record.update(status="failed", reason=f"{type(error).__name__}: {str(error)[:300]}")
            records.append(record)
            print(json.dumps(record), flush=True)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m usf_mae_jax.attention_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--variant", default="base", choices=sorted(vit.SIZES))
    parser.add_argument("--img_size", type=int, default=224)
    parser.add_argument("--mask_ratio", type=float, default=0.75)
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    print(json.dumps({"device": f"{device.platform}:{device.device_kind}", "platform": attention.current_platform()}),
          flush=True)
    records = run(args.batch, args.dtype, args.steps, args.variant, args.img_size, args.mask_ratio)
    return 0 if any(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
