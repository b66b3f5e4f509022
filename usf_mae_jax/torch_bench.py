"""The PyTorch side of `usf_mae_jax.bench --torch`: the reference MAE step, timed in its own process.

The reference model is `usf_mae_jax/torch_reference.py` (plain torch, the reference MAE function, SDPA attention,
exact GELU) with `torch.optim.AdamW`: forward, backward and update, the step the official code runs.

It runs in a separate Python process that the benchmark drives over a pipe, one timing round at a time, so
that the two frameworks take turns under the same background load but never share a process. Sharing one
costs the second framework: after a torch step has run in the process, the jitted JAX step measured 5-10%
slower on the 2-core CI VM (more kernel time per step), which would bias the ratio the issue asks for.

Protocol (text lines): the parent starts `python -m usf_mae_jax.torch_bench '<json spec>'`; the worker
answers `ready <torch threads>`, then for each `run <steps>` line it runs the steps and answers
`<seconds> <minor page faults>`; `quit` or end of input stops it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def minor_faults() -> float | None:
    """This process's minor page faults so far (None where getrusage does not exist, i.e. Windows)."""
    try:
        import resource
    except ImportError:
        return None
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


class TorchStep:
    """The reference MAE in plain PyTorch: forward, backward and torch.optim.AdamW, on random images."""

    def __init__(self, spec: dict):
        import torch

        from usf_mae_jax.torch_reference import build_reference_mae

        torch.manual_seed(0)
        self.torch = torch
        self.model = build_reference_mae(spec["img_size"], spec["patch_size"], spec["in_chans"], spec["width"],
                                         spec["depth"], spec["heads"], spec["decoder_width"], spec["decoder_depth"],
                                         spec["decoder_heads"], spec["mlp_ratio"], spec["norm_pix_loss"])
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(spec["b1"], spec["b2"]),
                                           weight_decay=spec["weight_decay"])
        self.mask_ratio = spec["mask_ratio"]
        self.images = torch.randn(spec["batch_size"], spec["in_chans"], spec["img_size"], spec["img_size"])

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            loss, _, _ = self.model(self.images, self.mask_ratio)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return time.perf_counter() - start


class TorchProcess:
    """Parent-side handle: starts the worker and times rounds in it; `run` mirrors `JaxStep.run`."""

    def __init__(self, model_config, opt_cfg, batch_size: int, mask_ratio: float):
        c = model_config
        spec = {"img_size": c.img_size, "patch_size": c.patch_size, "in_chans": c.in_chans, "width": c.width,
                "depth": c.depth, "heads": c.heads, "decoder_width": c.decoder_width,
                "decoder_depth": c.decoder_depth, "decoder_heads": c.decoder_heads, "mlp_ratio": c.mlp_ratio,
                "norm_pix_loss": c.norm_pix_loss, "b1": opt_cfg.b1, "b2": opt_cfg.b2,
                "weight_decay": opt_cfg.weight_decay, "mask_ratio": mask_ratio, "batch_size": batch_size}
        env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.process = subprocess.Popen([sys.executable, "-m", "usf_mae_jax.torch_bench", json.dumps(spec)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        reply = self._read()
        if not reply.startswith("ready "):
            raise SystemExit(f"the torch benchmark worker did not start: {reply!r}")
        self.threads = int(reply.split()[1])

    def _read(self) -> str:
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            raise SystemExit(f"the torch benchmark worker exited with status {code}; --torch needs the test "
                             f"requirements (torch==2.13.0 CPU), which usf_mae_jax/torch_reference.py needs")
        return line.strip()

    def run(self, steps: int) -> tuple[float, float | None]:
        """Runs `steps` torch steps in the worker; returns (seconds, the worker's minor page faults)."""
        self.process.stdin.write(f"run {steps}\n")
        self.process.stdin.flush()
        seconds, faults = self._read().split()
        return float(seconds), None if faults == "none" else float(faults)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
            self.process.wait(timeout=60)


def worker_main(argv: list[str]) -> None:
    step = TorchStep(json.loads(argv[1]))
    print(f"ready {step.torch.get_num_threads()}", flush=True)
    for line in sys.stdin:
        command = line.split()
        if not command or command[0] == "quit":
            break
        before = minor_faults()
        seconds = step.run(int(command[1]))
        faults = "none" if before is None else f"{minor_faults() - before:.0f}"
        print(f"{seconds:.6f} {faults}", flush=True)


if __name__ == "__main__":
    worker_main(sys.argv)
