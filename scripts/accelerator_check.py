"""The device check for a session with a GPU or TPU: one command, at most ~9 minutes, one JSON and one table.

    python scripts/accelerator_check.py --out_dir OUT            # on the accelerator host, from the repo root
    python scripts/accelerator_check.py --out_dir OUT --dry_run  # the same parts, tiny sizes, on a CPU

Parts, in order of importance, each a subprocess with its own timeout inside one overall budget (a part that
would start with less than `MIN_PART_S` left is skipped and says so):
  1. the train step as `launch.py` runs it (`python -m usf_mae_jax.bench`: ViT-B/16, bf16, 256 images per
     device, attention=auto, guard=auto), with images/s and MFU against the targets of docs/accelerators.md;
  2. the attention kernels alone (`python -m usf_mae_jax.attention_bench`: custom, xla, cudnn);
  3. the same step with the conditional guard (cudnn + cond: the cost of the per-step host sync);
  4. the host input pipeline: synthetic shards (`python -m data_prep synthetic`), then
     `python -m usf_mae_jax.data.bench` with 1 thread and with every core, giving images/s per core and the
     cores each device needs at the step's rate;
  5. the step with attention=custom and attention=xla (guard select), against cuDNN's;
  6. data-parallel scaling 1 -> N devices, when the host has N > 1 (the step at 256 per device on one device,
     then on all).
Without an accelerator visible to jax (the CPU build of jax), the full check stops after the probe, exit code 2.
Everything a part printed is kept in OUT/logs/. Results: OUT/accelerator_check.json and OUT/accelerator_check.md.
The dry run swaps in a `mu` model at 32 px, batches of 4, a few steps and, for part 6, two fake CPU devices, so
that the whole script runs on a CPU in a couple of minutes (tests/test_accelerator_check.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MFU_TARGET, SCALING_TARGET = 0.5, 0.9  # docs/accelerators.md, "Targets"
PLANNING_IMAGES_PER_CORE = 1000.0  # loader planning figure until this host's is measured
MIN_PART_S = 20

PROBE = """
import json, os
import jax
from jax._src.lib import cuda_versions
device = jax.devices()[0]
print(json.dumps({"platform": device.platform, "device_kind": device.device_kind, "devices": jax.device_count(),
                  "jax": jax.__version__, "cores": len(os.sched_getaffinity(0)),
                  "cudnn": cuda_versions.cudnn_get_version() if cuda_versions and device.platform == "gpu" else None}))
"""


class Check:
    """Runs the parts within the budget and collects their records."""

    def __init__(self, out_dir: str, budget_s: float, dry_run: bool):
        self.out_dir, self.dry_run = out_dir, dry_run
        self.deadline = time.monotonic() + budget_s
        self.records: list[dict] = []
        os.makedirs(os.path.join(out_dir, "logs"), exist_ok=True)

    def run(self, name: str, command: list[str], timeout_s: float, env: dict | None = None) -> dict:
        """Runs one part; its record holds status (ok / failed / timeout / skipped), seconds and its output."""
        left = self.deadline - time.monotonic()
        record = {"name": name, "command": " ".join(command)}
        if left < MIN_PART_S:
            record.update(status="skipped", reason=f"{left:.0f} s of the budget left")
            self.records.append(record)
            return record
        full_env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
        log = os.path.join(self.out_dir, "logs", re.sub(r"\W+", "_", name).strip("_") + ".log")
        started = time.monotonic()
        try:
            proc = subprocess.run(command, cwd=ROOT, env=full_env, capture_output=True, text=True,
                                  timeout=min(timeout_s, left))
            output, status = proc.stdout, "ok" if proc.returncode == 0 else "failed"
            if status == "failed":
                record["reason"] = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1][:400]
            errors = proc.stderr
        except subprocess.TimeoutExpired as expired:
            output, status, errors = expired.stdout or "", "timeout", expired.stderr or ""
            output = output.decode() if isinstance(output, bytes) else output
            errors = errors.decode() if isinstance(errors, bytes) else errors
            record["reason"] = f"stopped after {min(timeout_s, left):.0f} s"
        with open(log, "w") as f:
            f.write(f"$ {record['command']}\n{output}\n--- stderr ---\n{errors}")
        record.update(status=status, seconds=round(time.monotonic() - started, 1), output=output, log=log)
        self.records.append(record)
        print(f"[{status}] {name} ({record['seconds']} s)", flush=True)
        return record


def key_values(output: str) -> dict:
    """The `key=value` lines of the benchmark's output, numbers as floats."""
    values = {}
    for line in output.splitlines():
        key, sep, value = line.partition("=")
        if sep and re.fullmatch(r"[a-z_]+", key):
            try:
                values[key] = float(value)
            except ValueError:
                values[key] = value
    return values


def step_command(args, attention: str, guard: str, batch: int | None = None) -> list[str]:
    command = [sys.executable, "-m", "usf_mae_jax.bench", "--attention", attention, "--guard", guard]
    if args.dry_run:
        command += ["--config=configs/pretrain.py:demo", "--variant", "mu", "--img_size", "32", "--batch_size",
                    str(batch or 4), "--steps", "2", "--rounds", "1", "--warmup", "1"]
    else:
        command += ["--steps", "20", "--rounds", "3", "--warmup", "3"]
        if batch:
            command += ["--batch_size", str(batch)]
    return command


def step_part(check: Check, args, attention: str, guard: str, timeout_s: float, env: dict | None = None,
              batch: int | None = None, label: str = "") -> dict:
    record = check.run(f"step {attention}/{guard}{label}", step_command(args, attention, guard, batch), timeout_s, env)
    record["result"] = key_values(record.get("output", ""))
    return record


def loader_part(check: Check, args, cores: int) -> dict:
    shards = os.path.join(check.out_dir, "shards")
    count, size, batch, steps, img = (32, 64, 8, 2, 32) if args.dry_run else (3000, 256, 64, 30, 224)
    made = check.run("loader shards", [sys.executable, "-m", "data_prep", "synthetic", "--out_dir", shards, "--count",
                                       str(count), "--size", str(size), "--no_progress"], 120)
    results = {}
    for threads in sorted({1, cores}):
        if made["status"] != "ok":
            break
        record = check.run(f"loader {threads} threads", [
            sys.executable, "-m", "usf_mae_jax.data.bench", "--data_dir", shards, "--augment", "usf_mae",
            "--batch_size", str(batch), "--batches", str(steps), "--rounds", "1", "--baseline", "none", "--img_size",
            str(img), "--threads", str(threads)], 120)
        values = key_values(record.get("output", ""))
        record["result"] = values
        if "images_per_s" in values:
            results[threads] = values["images_per_s"]
    return {"images_per_s_by_threads": results,
            "images_per_s_per_core": results.get(1),
            "images_per_s_all_cores": results.get(cores)}


def summarize(host: dict, parts: dict, loader: dict) -> dict:
    main = parts["main"]["result"]
    per_device = main.get("images_per_s_per_device")
    summary = {"images_per_s_per_device": per_device, "mfu": main.get("mfu"), "mfu_target": MFU_TARGET,
               "model_flops_per_image": main.get("model_flops_per_image")}
    if main.get("peak_bf16_tflops_per_device") and main.get("model_flops_per_image"):
        summary["target_images_per_s_per_device"] = (MFU_TARGET * main["peak_bf16_tflops_per_device"] * 1e12
                                                     / main["model_flops_per_image"])
    if summary["mfu"] is not None:
        summary["meets_mfu_target"] = summary["mfu"] >= MFU_TARGET
    per_core = loader.get("images_per_s_per_core")
    summary["loader_images_per_s_per_core"] = per_core
    rate = per_core or PLANNING_IMAGES_PER_CORE
    summary["cores_per_device_basis"] = "measured" if per_core else "planning figure"
    target = summary.get("target_images_per_s_per_device")
    for name, images in (("at_measured_step", per_device), ("at_target", target)):
        if images:
            summary[f"cores_per_device_{name}"] = images / rate
    guard = parts.get("cond", {}).get("result", {})
    if guard.get("images_per_s") and main.get("images_per_s"):
        summary["select_over_cond"] = main["images_per_s"] / guard["images_per_s"]
    scaling = parts.get("scaling")
    if scaling:
        summary["scaling_efficiency"] = scaling["efficiency"]
        summary["meets_scaling_target"] = scaling["efficiency"] >= SCALING_TARGET
    return summary


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def markdown(report: dict) -> str:
    host, summary = report["host"], report["summary"]
    lines = [f"# Accelerator check{' (dry run)' if report['dry_run'] else ''}", "",
             f"{host.get('devices')} x {host.get('device_kind')} ({host.get('platform')}), {host.get('cores')} cores, "
             f"jax {host.get('jax')}; {report['seconds']:.0f} s of a {report['budget_s']:.0f} s budget.", "",
             "| quantity | value | target |", "|---|---|---|",
             f"| images/s per device (attention=auto, guard=auto) | {fmt(summary.get('images_per_s_per_device'))} | "
             f"{fmt(summary.get('target_images_per_s_per_device'))} |",
             f"| MFU | {fmt(summary.get('mfu'))} | {MFU_TARGET} |",
             f"| model FLOPs per image | {fmt(summary.get('model_flops_per_image'))} | |",
             f"| select guard / cond guard speed | {fmt(summary.get('select_over_cond'))} | > 1 |",
             f"| scaling efficiency 1 -> N | {fmt(summary.get('scaling_efficiency'))} | {SCALING_TARGET} |",
             f"| loader images/s per core | {fmt(summary.get('loader_images_per_s_per_core'))} | |",
             f"| cores per device at the measured step ({summary.get('cores_per_device_basis')}) | "
             f"{fmt(summary.get('cores_per_device_at_measured_step'))} | |",
             f"| cores per device at the MFU target | {fmt(summary.get('cores_per_device_at_target'))} | |",
             "", "| part | status | s | images/s | step ms | MFU | XLA FLOPs/image | kernels |",
             "|---|---|---|---|---|---|---|---|"]
    for record in report["parts"]:
        result = record.get("result", {})
        kernels = (f"{result['encoder_kernel']}/{result['decoder_kernel']}" if "encoder_kernel" in result else "")
        status = " ".join(filter(None, (record["status"], record.get("reason"))))
        lines.append(f"| {record['name']} | {status} | "
                     f"{fmt(record.get('seconds'))} | {fmt(result.get('images_per_s'))} | {fmt(result.get('step_ms'))} "
                     f"| {fmt(result.get('mfu'))} | {fmt(result.get('xla_flops_per_image'))} | {kernels} |")
    if report.get("attention"):
        lines += ["", "| attention | kernel | tokens | status | ms fwd+bwd | TFLOP/s |", "|---|---|---|---|---|---|"]
        for r in report["attention"]:
            status = " ".join(filter(None, (r["status"], r.get("reason"))))
            lines.append(f"| {r['where']} | {r['kernel']} | {r['tokens']} | {status} | "
                         f"{fmt(r.get('ms'))} | {fmt(r.get('tflops'))} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--dry_run", action="store_true", help="tiny sizes, for a CPU")
    parser.add_argument("--budget_s", type=float, default=None, help="overall time limit (default 510, dry run 400)")
    args = parser.parse_args(argv)
    budget = args.budget_s or (400.0 if args.dry_run else 510.0)
    check = Check(args.out_dir, budget, args.dry_run)
    started = time.monotonic()
    probe = check.run("probe", [sys.executable, "-c", PROBE], 120)
    host = json.loads(probe["output"].strip().splitlines()[-1]) if probe["status"] == "ok" else {}
    devices, cores = int(host.get("devices", 1)), int(host.get("cores", os.cpu_count() or 1))
    if not args.dry_run and host.get("platform") in (None, "cpu"):
        reason = (f"jax sees no accelerator ({probe.get('reason') or host.get('platform')}): install the CUDA or TPU "
                  "build of jax, or pass --dry_run")
        with open(os.path.join(args.out_dir, "accelerator_check.json"), "w") as f:
            json.dump({"dry_run": False, "host": host, "error": reason, "parts": check.records}, f, indent=2,
                      default=str)
        print(reason, file=sys.stderr)
        return 2
    step_s = 60 if args.dry_run else 150
    parts = {"main": step_part(check, args, "auto", "auto", step_s)}
    attention_args = (["--batch", "2", "--dtype", "float32", "--steps", "2", "--variant", "mu", "--img_size", "32"]
                      if args.dry_run else [])
    record = check.run("attention kernels", [sys.executable, "-m", "usf_mae_jax.attention_bench", *attention_args],
                       60 if args.dry_run else 120)
    attention = [json.loads(line) for line in record.get("output", "").splitlines()
                 if line.startswith("{") and '"kernel"' in line]
    if host.get("platform") == "gpu":
        parts["cond"] = step_part(check, args, "cudnn", "cond", step_s)
    else:  # no cuDNN: the conditional guard with the default kernel
        parts["cond"] = step_part(check, args, "auto", "cond", step_s)
    loader = loader_part(check, args, cores)
    for kernel in ("custom", "xla"):
        parts[kernel] = step_part(check, args, kernel, "select", step_s)
    scale_to = 2 if args.dry_run and host.get("platform") == "cpu" else devices
    if scale_to > 1 and host.get("platform") in ("cpu", "gpu"):
        per_device = 4 if args.dry_run else 256

        def env_for(n: int) -> dict:
            if host["platform"] == "cpu":
                return {"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}
            return {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(n))}

        one = step_part(check, args, "auto", "auto", step_s, env_for(1), per_device, " on 1 device")
        many = step_part(check, args, "auto", "auto", step_s, env_for(scale_to), per_device * scale_to,
                         f" on {scale_to} devices")
        rates = one["result"].get("images_per_s"), many["result"].get("images_per_s")
        if all(rates):
            parts["scaling"] = {"devices": scale_to, "efficiency": rates[1] / (scale_to * rates[0])}
    report = {"dry_run": args.dry_run, "budget_s": budget, "seconds": time.monotonic() - started, "host": host,
              "summary": summarize(host, parts, loader), "loader": loader, "attention": attention,
              "parts": [{k: v for k, v in r.items() if k != "output"} for r in check.records]}
    with open(os.path.join(args.out_dir, "accelerator_check.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(args.out_dir, "accelerator_check.md"), "w") as f:
        f.write(markdown(report))
    print(markdown(report))
    return 0 if parts["main"]["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
