// Memory-bound kernels around the UNet's GEMMs (included by kernels.cu, which defines
// to_float / from_float): LayerNorm, the image <-> tokens transposes of the attention blocks,
// the 2x nearest upsampling, and the convolution output's initial value (bias, a per-image
// channel bias such as the time embedding, and a residual).

// ---------------------------------------------------------------------------------------------
// LayerNorm over the last dimension of a contiguous (rows, columns) tensor, affine, biased
// variance (PyTorch's). One warp per row, four rows per block; mean first, then the mean of the
// squared deviations (two passes over values that stay in registers: no cancellation).
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float value) {
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffff, value, offset);
    return value;
}

// f16 with 16-byte loads: columns % 8 == 0, at most 32 * 8 * MAXV columns, aligned rows.
template <int MAXV>
__device__ void layer_norm_f16x8(const __half* x, const __half* w, const __half* b, __half* out, long rows,
                                 int columns, float eps) {
    const int lane = threadIdx.x % 32;
    const long row = (long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const int vectors = columns / 8;
    const uint4* in = reinterpret_cast<const uint4*>(x + row * columns);
    float values[MAXV][8];
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < MAXV; ++i) {
        int v = lane + i * 32;
        if (v < vectors) {
            uint4 raw = in[v];
            const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float2 f = __half22float2(h[e]);
                values[i][2 * e] = f.x;
                values[i][2 * e + 1] = f.y;
                sum += f.x + f.y;
            }
        }
    }
    const float mean = warp_sum(sum) / columns;
    float squares = 0.0f;
#pragma unroll
    for (int i = 0; i < MAXV; ++i) {
        if (lane + i * 32 < vectors) {
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                float d = values[i][e] - mean;
                squares += d * d;
            }
        }
    }
    const float inv_std = rsqrtf(warp_sum(squares) / columns + eps);
    const uint4* wv = reinterpret_cast<const uint4*>(w);
    const uint4* bv = reinterpret_cast<const uint4*>(b);
    uint4* o = reinterpret_cast<uint4*>(out + row * columns);
#pragma unroll
    for (int i = 0; i < MAXV; ++i) {
        int v = lane + i * 32;
        if (v < vectors) {
            uint4 wraw = wv[v], braw = bv[v], result;
            const __half2* wh = reinterpret_cast<const __half2*>(&wraw);
            const __half2* bh = reinterpret_cast<const __half2*>(&braw);
            __half2* r = reinterpret_cast<__half2*>(&result);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float2 wf = __half22float2(wh[e]), bf = __half22float2(bh[e]);
                r[e] = __floats2half2_rn((values[i][2 * e] - mean) * inv_std * wf.x + bf.x,
                                         (values[i][2 * e + 1] - mean) * inv_std * wf.y + bf.y);
            }
            o[v] = result;
        }
    }
}
extern "C" __global__ void layer_norm_f16x8_v2(const __half* x, const __half* w, const __half* b, __half* out,
                                               long rows, int columns, float eps) {
    layer_norm_f16x8<2>(x, w, b, out, rows, columns, eps);
}
extern "C" __global__ void layer_norm_f16x8_v8(const __half* x, const __half* w, const __half* b, __half* out,
                                               long rows, int columns, float eps) {
    layer_norm_f16x8<8>(x, w, b, out, rows, columns, eps);
}

// Any width and f32: the same per warp, reading the row again instead of keeping it.
template <typename T>
__device__ void layer_norm_any(const T* x, const T* w, const T* b, T* out, long rows, int columns, float eps) {
    const int lane = threadIdx.x % 32;
    const long row = (long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const T* in = x + row * columns;
    float sum = 0.0f;
    for (int c = lane; c < columns; c += 32) sum += to_float(in[c]);
    const float mean = warp_sum(sum) / columns;
    float squares = 0.0f;
    for (int c = lane; c < columns; c += 32) {
        float d = to_float(in[c]) - mean;
        squares += d * d;
    }
    const float inv_std = rsqrtf(warp_sum(squares) / columns + eps);
    T* o = out + row * columns;
    for (int c = lane; c < columns; c += 32) {
        o[c] = from_float<T>((to_float(in[c]) - mean) * inv_std * to_float(w[c]) + to_float(b[c]));
    }
}
extern "C" __global__ void layer_norm_f32(const float* x, const float* w, const float* b, float* out, long rows,
                                          int columns, float eps) {
    layer_norm_any<float>(x, w, b, out, rows, columns, eps);
}
extern "C" __global__ void layer_norm_f16(const __half* x, const __half* w, const __half* b, __half* out, long rows,
                                          int columns, float eps) {
    layer_norm_any<__half>(x, w, b, out, rows, columns, eps);
}

// ---------------------------------------------------------------------------------------------
// Transposes the last two dimensions of a contiguous (batch, rows, columns) tensor into
// (batch, columns, rows), adding `residual` (the output's shape) when it is not null: the
// attention blocks' image (channels, pixels) <-> tokens (pixels, channels). 32x32 tiles through
// shared memory (one padding column: no bank conflicts), blocks of 32x8 threads.
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ void transpose_rows(const T* x, const T* residual, T* out, int rows, int columns) {
    __shared__ float tile[32][33];
    const long batch_offset = (long)blockIdx.z * rows * columns;
    const int c0 = blockIdx.x * 32, r0 = blockIdx.y * 32;
    for (int i = threadIdx.y; i < 32; i += 8) {
        int r = r0 + i, c = c0 + threadIdx.x;
        if (r < rows && c < columns) tile[i][threadIdx.x] = to_float(x[batch_offset + (long)r * columns + c]);
    }
    __syncthreads();
    for (int i = threadIdx.y; i < 32; i += 8) {
        int c = c0 + i, r = r0 + threadIdx.x;
        if (r < rows && c < columns) {
            long index = batch_offset + (long)c * rows + r;
            float value = tile[threadIdx.x][i];
            if (residual) value += to_float(residual[index]);
            out[index] = from_float<T>(value);
        }
    }
}
extern "C" __global__ void transpose_rows_f32(const float* x, const float* residual, float* out, int rows,
                                              int columns) {
    transpose_rows<float>(x, residual, out, rows, columns);
}
extern "C" __global__ void transpose_rows_f16(const __half* x, const __half* residual, __half* out, int rows,
                                              int columns) {
    transpose_rows<__half>(x, residual, out, rows, columns);
}

// ---------------------------------------------------------------------------------------------
// Nearest-neighbour 2x upsampling of contiguous (planes, height, width): each thread writes the
// two output pixels that one input pixel becomes on each of its two output rows.
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ void upsample_nearest_2x(const T* x, T* out, long planes, int height, int width) {
    const int out_w = 2 * width;
    for (long plane = blockIdx.y; plane < planes; plane += gridDim.y) {
        const T* in = x + plane * height * width;
        T* o = out + plane * 4 * height * width;
        for (int p = blockIdx.x * blockDim.x + threadIdx.x; p < height * width; p += gridDim.x * blockDim.x) {
            int y = p / width, xx = p - y * width;
            T value = in[p];
            T* top = o + (2 * y) * out_w + 2 * xx;
            top[0] = value;
            top[1] = value;
            top[out_w] = value;
            top[out_w + 1] = value;
        }
    }
}
extern "C" __global__ void upsample_nearest_2x_f32(const float* x, float* out, long planes, int height, int width) {
    upsample_nearest_2x<float>(x, out, planes, height, width);
}
extern "C" __global__ void upsample_nearest_2x_f16(const __half* x, __half* out, long planes, int height, int width) {
    upsample_nearest_2x<__half>(x, out, planes, height, width);
}

// ---------------------------------------------------------------------------------------------
// A convolution's output before its GEMMs add onto it: bias[channel] (+ plane_bias[plane], one
// value per image and channel such as a ResNet block's time embedding) (+ residual).
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ void conv_init(T* out, const T* bias, const T* plane_bias, const T* residual, long planes, long channels,
                          long pixels) {
    for (long plane = blockIdx.y; plane < planes; plane += gridDim.y) {
        float b = to_float(bias[plane % channels]);
        if (plane_bias) b += to_float(plane_bias[plane]);
        long base = plane * pixels;
        for (int p = blockIdx.x * blockDim.x + threadIdx.x; p < pixels; p += gridDim.x * blockDim.x) {
            float value = b;
            if (residual) value += to_float(residual[base + p]);
            out[base + p] = from_float<T>(value);
        }
    }
}
extern "C" __global__ void conv_init_f32(float* out, const float* bias, const float* plane_bias,
                                         const float* residual, long planes, long channels, long pixels) {
    conv_init<float>(out, bias, plane_bias, residual, planes, channels, pixels);
}
extern "C" __global__ void conv_init_f16(__half* out, const __half* bias, const __half* plane_bias,
                                         const __half* residual, long planes, long channels, long pixels) {
    conv_init<__half>(out, bias, plane_bias, residual, planes, channels, pixels);
}
// f16 with 16-byte loads and stores: pixels % 8 == 0 and aligned planes.
extern "C" __global__ void conv_init_f16x8(__half* out, const __half* bias, const __half* plane_bias,
                                           const __half* residual, long planes, long channels, long pixels) {
    const int vectors = (int)(pixels / 8);
    for (long plane = blockIdx.y; plane < planes; plane += gridDim.y) {
        float b = __half2float(bias[plane % channels]);
        if (plane_bias) b += __half2float(plane_bias[plane]);
        uint4* o = reinterpret_cast<uint4*>(out + plane * pixels);
        const uint4* res = residual ? reinterpret_cast<const uint4*>(residual + plane * pixels) : nullptr;
        const __half2 b2 = __float2half2_rn(b);
        for (int v = blockIdx.x * blockDim.x + threadIdx.x; v < vectors; v += gridDim.x * blockDim.x) {
            uint4 result;
            __half2* r = reinterpret_cast<__half2*>(&result);
            if (res) {
                uint4 raw = res[v];
                const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float2 f = __half22float2(h[e]);
                    r[e] = __floats2half2_rn(b + f.x, b + f.y);
                }
            } else {
#pragma unroll
                for (int e = 0; e < 4; ++e) r[e] = b2;
            }
            o[v] = result;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Splits f32 values into a TF32 part (round to nearest, 10-bit mantissa) and the rest, for
// three-pass TF32 GEMMs (big * big + big * small + small * big), which come within f32's own
// rounding on tensor cores, as PyTorch's f32 attention kernels compute.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void split_tf32(const float* x, float* big, float* small, long n) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float value = x[i];
        uint32_t bits;
        asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(bits) : "f"(value));
        float high = __uint_as_float(bits);
        big[i] = high;
        small[i] = value - high;
    }
}
