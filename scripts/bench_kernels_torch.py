"""PyTorch's operations at the shapes that benches/gpu_kernels.rs times for Atelier's kernels:
SDPA attention (as diffusers calls it), cuDNN convolutions (NCHW as diffusers runs them, and
channels-last), GroupNorm + SiLU; f16 on the GPU. Prints the same CSV columns:
    python3 scripts/bench_kernels_torch.py
"""

import torch
import torch.nn.functional as F


def time_ms(f, runs):
    for _ in range(2):
        f()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        f()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[runs // 2]


def time_back_to_back_ms(f, runs):
    """Mean time of one call over `runs` calls enqueued back to back, after two warm-ups."""
    for _ in range(2):
        f()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(runs):
        f()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / runs


def main():
    torch.backends.cudnn.benchmark = False  # diffusers' default
    dev, dt = "cuda", torch.float16
    print("kind,shape,ms,tflops")
    attention_cases = [
        ("sd15 self 64x64", 2, 4096, 4096, 8, 40),
        ("sd15 cross 64x64", 2, 4096, 77, 8, 40),
        ("sd15 self 32x32", 2, 1024, 1024, 8, 80),
        ("sd21 self 96x96", 2, 9216, 9216, 5, 64),
        ("sd21 self 48x48", 2, 2304, 2304, 10, 64),
        ("sdxl self 64x64", 2, 4096, 4096, 10, 64),
        ("sdxl self 32x32", 2, 1024, 1024, 20, 64),
        ("sdxl cross 32x32", 2, 1024, 77, 20, 64),
        ("vae mid 64x64", 1, 4096, 4096, 1, 512),
    ]
    for label, b, nq, nk, h, d in attention_cases:
        q = torch.randn(b, nq, h * d, device=dev, dtype=dt)
        k = torch.randn(b, nk, h * d, device=dev, dtype=dt)
        v = torch.randn(b, nk, h * d, device=dev, dtype=dt)

        def run():
            qh = q.view(b, nq, h, d).transpose(1, 2)
            kh = k.view(b, nk, h, d).transpose(1, 2)
            vh = v.view(b, nk, h, d).transpose(1, 2)
            o = F.scaled_dot_product_attention(qh, kh, vh)
            return o.transpose(1, 2).reshape(b, nq, h * d)

        ms = time_ms(run, 20)
        print(f"attention,{label},{ms:.3},{4 * b * h * nq * nk * d / ms / 1e9:.1}")
    linear_cases = [
        ("sdxl 32x32 qkv", 2048, 1280, 3840, False),
        ("sdxl 32x32 out", 2048, 1280, 1280, True),
        ("sdxl 32x32 ff in", 2048, 1280, 10240, True),
        ("sdxl 32x32 ff out", 2048, 5120, 1280, True),
        ("sdxl 64x64 qkv", 8192, 640, 1920, False),
        ("sdxl 64x64 out", 8192, 640, 640, True),
        ("sdxl 64x64 ff in", 8192, 640, 5120, True),
        ("sdxl 64x64 ff out", 8192, 2560, 640, True),
        ("sd21 96x96 qkv", 18432, 320, 960, False),
        ("sd21 96x96 out", 18432, 320, 320, True),
        ("sd21 96x96 ff in", 18432, 320, 2560, True),
        ("sd21 96x96 ff out", 18432, 1280, 320, True),
    ]
    for label, rows, n_in, n_out, has_bias in linear_cases:
        x = torch.randn(rows, n_in, device=dev, dtype=dt)
        w = torch.randn(n_out, n_in, device=dev, dtype=dt) * 0.02
        bias = torch.randn(n_out, device=dev, dtype=dt) if has_bias else None
        ms = time_back_to_back_ms(lambda: F.linear(x, w, bias), 50)
        print(f"linear,{label},{ms:.4},{2 * rows * n_in * n_out / ms / 1e9:.1f}")
    conv_cases = [
        ("vae 512ch 64px", 1, 512, 512, 64, 3),
        ("vae 512ch 128px", 1, 512, 512, 128, 3),
        ("vae 512ch 256px", 1, 512, 512, 256, 3),
        ("vae 512->256 256px", 1, 512, 256, 256, 3),
        ("vae 256ch 256px", 1, 256, 256, 256, 3),
        ("vae 256ch 512px", 1, 256, 256, 512, 3),
        ("vae 256->128 512px", 1, 256, 128, 512, 3),
        ("vae 128ch 512px", 1, 128, 128, 512, 3),
        ("unet 320ch 64px", 2, 320, 320, 64, 3),
        ("unet 640ch 64px", 2, 640, 640, 64, 3),
        ("unet 1280ch 32px", 2, 1280, 1280, 32, 3),
    ]
    for layout in ("nchw", "nhwc"):
        for label, b, cin, cout, side, kk in conv_cases:
            x = torch.randn(b, cin, side, side, device=dev, dtype=dt)
            w = torch.randn(cout, cin, kk, kk, device=dev, dtype=dt) * 0.02
            bias = torch.randn(cout, device=dev, dtype=dt)
            if layout == "nhwc":
                x = x.to(memory_format=torch.channels_last)
                w = w.to(memory_format=torch.channels_last)
            ms = time_ms(lambda: F.conv2d(x, w, bias, padding=kk // 2), 10)
            flops = 2 * b * cin * cout * kk * kk * side * side
            print(f"conv {layout},{label},{ms:.3},{flops / ms / 1e9:.1}")
    for label, b, c, side in [
        ("vae 128ch 512px", 1, 128, 512),
        ("vae 256ch 256px", 1, 256, 256),
        ("unet 320ch 64px", 2, 320, 64),
    ]:
        x = torch.randn(b, c, side, side, device=dev, dtype=dt)
        w = torch.randn(c, device=dev, dtype=dt)
        bias = torch.randn(c, device=dev, dtype=dt)
        ms = time_ms(lambda: F.silu(F.group_norm(x, 32, w, bias, 1e-6)), 20)
        print(f"group_norm_silu,{label},{ms:.3},{4 * b * c * side * side / ms / 1e6:.0f} GB/s")


if __name__ == "__main__":
    main()
