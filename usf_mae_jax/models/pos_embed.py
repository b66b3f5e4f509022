"""Fixed 2-D sin-cos position tables, as the reference MAE builds them.

The tables are constants: they are computed in float64 NumPy, cast to float32 and added inside the forward
pass, so they never enter the parameter tree, the optimizer or the weight decay. Only fine-tuning turns the
encoder table into a learned parameter (initialised from this one), as the reference fine-tune code does.

Reference behaviour reproduced (facebookresearch/mae `util/pos_embed.py`, described in
docs/mae_fidelity.md):
  * the grid is `meshgrid(grid_w, grid_h)`, so channel block 0 embeds the column (x) coordinate and block 1
    the row (y) coordinate;
  * each 1-D half is `[sin(pos * w), cos(pos * w)]` with `w_k = 1 / 10000 ** (k / (D / 4))`;
  * a zero row is prepended for the cls token.
big_vision's `posemb_sincos_2d` uses another denominator and is *not* this table.
"""

from __future__ import annotations

import functools

import numpy as np


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """Returns the (M, dim) float64 table `[sin(p * w), cos(p * w)]` for M positions."""
    if dim % 2:
        raise ValueError(f"the 1-D sin-cos embedding needs an even width, got {dim}")
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000.0**omega
    angles = np.einsum("m,d->md", np.asarray(positions, np.float64).reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


@functools.lru_cache(maxsize=64)
def sincos_2d(dim: int, grid_h: int, grid_w: int | None = None, cls_token: bool = True) -> np.ndarray:
    """Returns the float32 table of shape (cls + grid_h * grid_w, dim), row-major patch order.

    The result is cached and read-only, so calling it inside a traced function costs nothing after the first
    call and embeds the table as a compile-time constant.
    """
    grid_w = grid_h if grid_w is None else grid_w
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    cols, rows = np.meshgrid(np.arange(grid_w, dtype=np.float64), np.arange(grid_h, dtype=np.float64))
    table = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
    if cls_token:
        table = np.concatenate([np.zeros((1, dim)), table], axis=0)
    table = table.astype(np.float32)
    table.flags.writeable = False
    return table


def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.75, the coefficient PyTorch's bicubic uses."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _bicubic_axis(values: np.ndarray, out_len: int, axis: int) -> np.ndarray:
    """Resizes one axis like torch.nn.functional.interpolate(mode='bicubic', align_corners=False)."""
    in_len = values.shape[axis]
    src = (np.arange(out_len) + 0.5) * (in_len / out_len) - 0.5  # no clamping of negatives for cubic
    base = np.floor(src).astype(np.int64)
    frac = src - base
    out = 0.0
    for offset, weight in ((-1, _cubic(frac + 1)), (0, _cubic(frac)), (1, _cubic(1 - frac)), (2, _cubic(2 - frac))):
        taps = np.take(values, np.clip(base + offset, 0, in_len - 1), axis=axis)  # border taps are clamped
        shape = [1] * values.ndim
        shape[axis] = out_len
        out = out + taps * weight.reshape(shape)
    return out


def resize_patch_table(table: np.ndarray, new_grid: tuple[int, int], num_prefix: int = 1) -> np.ndarray:
    """Resizes a (prefix + h*w, D) position table to a new patch grid by bicubic interpolation.

    Mirrors the reference fine-tune code (`interpolate_pos_embed`, which calls torch's bicubic interpolate with
    align_corners=False): the prefix rows (cls) are kept as they are, and the patch rows are reshaped to their
    square grid and resized with the same cubic kernel (a = -0.75), the same source-pixel mapping and the same
    clamped borders, without antialiasing. This lets a checkpoint trained at 224 px fine-tune at 384 or 512 px.
    """
    table = np.asarray(table, np.float32)
    prefix, patches = table[:num_prefix], table[num_prefix:]
    side = int(round(np.sqrt(patches.shape[0])))
    if side * side != patches.shape[0]:
        raise ValueError(f"position table with {patches.shape[0]} patch rows is not a square grid")
    if (side, side) == tuple(new_grid):
        return table
    grid = patches.reshape(side, side, -1).astype(np.float64)
    resized = _bicubic_axis(_bicubic_axis(grid, new_grid[0], 0), new_grid[1], 1)
    return np.concatenate([prefix, resized.reshape(-1, grid.shape[-1]).astype(np.float32)], axis=0)
