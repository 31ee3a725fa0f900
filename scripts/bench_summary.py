"""Ratios of one family's figures from scripts/bench-vs-diffusers.sh (same call, same weights)."""
import json
import re
import sys

arch, out = sys.argv[1], sys.argv[2]


def last_json(path):
    try:
        lines = [l for l in open(path).read().splitlines() if l.startswith("{")]
        return json.loads(lines[-1]) if lines else {}
    except FileNotFoundError:
        return {}


ref = last_json(f"{out}/diffusers-{arch}.json")
ours = last_json(f"{out}/atelier-bench-{arch}.json")
report = ours.get("report", {})
warm = open(f"{out}/atelier-warm-{arch}.txt").read()
cold = open(f"{out}/atelier-cold-{arch}.txt").read()
step_ms = [float(x) for x in re.findall(r"\(([0-9.]+) ms/step\)", warm)]
job = re.findall(r"run (\d+) of (\d+): ([0-9.]+) s \(job ([0-9.]+) s\)", warm)
print(f"== {arch} ({ref.get('gpu', '?')}, torch {ref.get('torch', '?')})")
unet_ms = report.get("unet_step_ms")
if ref.get("eager") and unet_ms:
    eager = ref["eager"]["ms_step"]
    print(f"UNet step with CFG: diffusers eager {eager:.1f} ms, Atelier {unet_ms:.1f} ms: {eager / unet_ms:.2f}x")
    if "compiled" in ref:
        compiled = ref["compiled"]["ms_step"]
        print(f"  torch.compile (default mode): {compiled:.1f} ms/step, compile + first loop "
              f"{ref['compiled']['compile_and_first_loop_s']:.0f} s: Atelier {compiled / unet_ms:.2f}x")
    else:
        print("  torch.compile: did not finish (see diffusers-*.err)")
if unet_ms:
    submit = report.get("unet_submit_ms")
    print(f"CPU enqueue of one step {submit:.1f} ms = {submit / unet_ms:.2f} of the step "
          f"(steps ran as: {report.get('cuda_graphs')})")
eager_report = last_json(f"{out}/atelier-bench-eager-{arch}.json").get("report", {})
if eager_report.get("unet_step_ms") and unet_ms:
    eager_ms, eager_submit = eager_report["unet_step_ms"], eager_report["unet_submit_ms"]
    print(f"  without CUDA graphs: step {eager_ms:.1f} ms, enqueue {eager_submit:.1f} ms = "
          f"{eager_submit / eager_ms:.2f} of the step; graphs make the step {eager_ms / unet_ms:.2f}x faster")
if step_ms and unet_ms:
    real = step_ms[-1]
    print(f"real job (generate, preview every step, warm): {real:.1f} ms/step = {real / unet_ms:.3f}x bench's step")
if job and ref.get("pipeline_s"):
    total = float(job[-1][3])
    print(f"whole job (warm): diffusers pipeline {ref['pipeline_s']:.2f} s, Atelier {total:.2f} s: {ref['pipeline_s'] / total:.2f}x")
first = re.search(r"first preview after ([0-9.]+) s", cold)
text = re.search(r"text encoding ([0-9.]+) s", cold)
warm_text = re.findall(r"text encoding ([0-9.]+) s", warm)
real_time = re.search(r"real\s+(\S+)", cold)
if first and text:
    print(f"fresh process, first job: text encoding {float(text.group(1)) * 1e3:.0f} ms "
          f"(warm {float(warm_text[-1]) * 1e3 if warm_text else float('nan'):.0f} ms), first preview "
          f"after {float(first.group(1)):.2f} s; whole process {real_time.group(1) if real_time else '?'}")
vae_ref = ref.get("vae_ms", {})
for tiled in ours.get("tiled_decode", []):
    side = str(tiled["side_px"])
    untiled = tiled["untiled_ms"].get("Ok") if isinstance(tiled["untiled_ms"], dict) else None
    line = f"VAE decode {side}x{side}: Atelier untiled {untiled if untiled is None else round(untiled, 1)} ms"
    if side in vae_ref and untiled:
        line += f", diffusers {vae_ref[side]:.1f} ms: {untiled / vae_ref[side]:.2f}x the time"
    gib = lambda b: f"{b / 2**30:.2f} GiB" if b else "-"
    line += (f"; tiled ({tiled['tile_px']} px tiles) {tiled['tiled_ms']:.0f} ms, peak "
             f"{gib(tiled['tiled_peak_bytes'])} (untiled peak {gib(tiled['untiled_peak_bytes'])})")
    print(line)
peak = report.get("peak_gpu_memory_bytes")
if peak and ref.get("eager"):
    print(f"peak memory (bench): Atelier {peak / 2**30:.2f} GiB, diffusers eager loop {ref['eager']['peak_gib']:.2f} GiB")
for path, label in [(f"{out}/atelier-warm-{arch}.txt", "generate"),
                    (f"{out}/atelier-cpu-encoders-{arch}.txt", "generate, text encoders on the CPU")]:
    try:
        found = re.findall(r"peak GPU memory ([0-9.]+) GiB allocated, ([0-9.]+) GiB held", open(path).read())
        texts = re.findall(r"text encoding ([0-9.]+) s", open(path).read())
        if found:
            print(f"{label}: peak {found[-1][0]} GiB allocated, {found[-1][1]} GiB held by the pool; "
                  f"text encoding {float(texts[-1]):.2f} s")
    except FileNotFoundError:
        pass
if ref.get("pipeline_peak_gib"):
    print(f"diffusers pipeline call peak {ref['pipeline_peak_gib']:.2f} GiB allocated")
