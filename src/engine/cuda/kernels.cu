// Atelier's own CUDA kernels: fused GroupNorm (+SiLU), GEGLU, im2col for the convolutions'
// GEMMs, LayerNorm, transposes and other memory-bound helpers (elementwise.cuh), and a
// flash-style attention on the tensor cores (f16 in, f32 accumulation, no materialised score
// matrix). Compiled to PTX by build.rs with nvcc; launched from cuda.rs.
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }

// Sum over the block; every thread gets the result. `scratch` holds 32 floats.
__device__ __forceinline__ float block_sum(float value, float* scratch) {
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffff, value, offset);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) scratch[warp] = value;
    __syncthreads();
    int warps = (blockDim.x + 31) / 32;
    value = lane < warps ? scratch[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffff, value, offset);
    return value;
}

#include "elementwise.cuh"
#include "flash_common.cuh"

// ---------------------------------------------------------------------------------------------
// GroupNorm over contiguous (batch, channels, pixels). The elements of group g of batch item b
// are contiguous: [(b * groups + g) * n, + n) with n = channels / groups * pixels. Each group is
// split over `splits` blocks. Pass 1 writes (count, mean, M2) per block; pass 2 merges them
// (Chan et al.) and normalises, applies the affine weights and, if asked, SiLU.
// ---------------------------------------------------------------------------------------------
// Merges the (count, mean, M2) partials of one group (Chan et al.) into (mean, 1 / std).
__device__ void merge_group_stats(const float* partials, long group, int splits, float eps, float* stats) {
    float count = 0.0f, mean = 0.0f, m2 = 0.0f;
    for (int s = 0; s < splits; ++s) {
        const float* p = partials + (group * splits + s) * 3;
        float nb = p[0];
        if (nb <= 0.0f) continue;
        float total = count + nb;
        float delta = p[1] - mean;
        mean += delta * nb / total;
        m2 += p[2] + delta * delta * count * nb / total;
        count = total;
    }
    stats[0] = mean;
    stats[1] = rsqrtf(m2 / count + eps);
}

template <typename T>
__device__ void group_norm_stats(const T* x, float* partials, long n, int splits) {
    __shared__ float scratch[32];
    long group = blockIdx.x;
    int split = blockIdx.y;
    long chunk = (n + splits - 1) / splits;
    long start = split * chunk;
    long end = min(n, start + chunk);
    const T* base = x + group * n;
    float sum = 0.0f;
    for (long i = start + threadIdx.x; i < end; i += blockDim.x) sum += to_float(base[i]);
    sum = block_sum(sum, scratch);
    float count = (float)max(end - start, 0L);
    float mean = count > 0.0f ? sum / count : 0.0f;
    float m2 = 0.0f;
    for (long i = start + threadIdx.x; i < end; i += blockDim.x) {
        float d = to_float(base[i]) - mean;
        m2 += d * d;
    }
    m2 = block_sum(m2, scratch);
    if (threadIdx.x == 0) {
        float* p = partials + (group * splits + split) * 3;
        p[0] = count;
        p[1] = mean;
        p[2] = m2;
    }
}

template <typename T>
__device__ void group_norm_apply(const T* x, const T* weight, const T* bias, T* out,
                                 const float* partials, long n, int splits, long pixels,
                                 int channels_per_group, int groups, float eps, int silu) {
    __shared__ float stats[2];
    long group = blockIdx.x;
    int split = blockIdx.y;
    if (threadIdx.x == 0) merge_group_stats(partials, group, splits, eps, stats);
    __syncthreads();
    float mean = stats[0], rstd = stats[1];
    // Within a group every index fits in 32 bits (the host checks), so no 64-bit division.
    int chunk = (int)((n + splits - 1) / splits);
    int start = split * chunk;
    int end = min((int)n, start + chunk);
    int pixels32 = (int)pixels;
    int first_channel = (int)(group % groups) * channels_per_group;
    const T* in = x + group * n;
    T* o = out + group * n;
    for (int i = start + threadIdx.x; i < end; i += blockDim.x) {
        int c = first_channel + i / pixels32;
        float y = (to_float(in[i]) - mean) * rstd * to_float(weight[c]) + to_float(bias[c]);
        if (silu) y = y / (1.0f + __expf(-y));
        o[i] = from_float<T>(y);
    }
}

// The same two passes for f16 with 16-byte loads and stores: needs pixels % 8 == 0 (so 8
// consecutive elements share a channel) and 16-byte aligned data; chunks are multiples of 8.
__device__ __forceinline__ long group_chunk_x8(long n, int splits) { return ((n + splits - 1) / splits + 7) / 8 * 8; }

extern "C" __global__ void group_norm_stats_f16x8(const __half* x, float* partials, long n, int splits) {
    __shared__ float scratch[32];
    long group = blockIdx.x;
    int split = blockIdx.y;
    long chunk = group_chunk_x8(n, splits);
    long start = min(n, split * chunk);
    long end = min(n, start + chunk);
    const uint4* base = reinterpret_cast<const uint4*>(x + group * n + start);
    int vectors = (int)((end - start) / 8);
    float sum = 0.0f;
    for (int i = threadIdx.x; i < vectors; i += blockDim.x) {
        uint4 v = base[i];
        const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            float2 f = __half22float2(h[j]);
            sum += f.x + f.y;
        }
    }
    sum = block_sum(sum, scratch);
    float count = (float)(end - start);
    float mean = count > 0.0f ? sum / count : 0.0f;
    float m2 = 0.0f;
    for (int i = threadIdx.x; i < vectors; i += blockDim.x) {
        uint4 v = base[i];
        const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            float2 f = __half22float2(h[j]);
            m2 += (f.x - mean) * (f.x - mean) + (f.y - mean) * (f.y - mean);
        }
    }
    m2 = block_sum(m2, scratch);
    if (threadIdx.x == 0) {
        float* p = partials + (group * splits + split) * 3;
        p[0] = count;
        p[1] = mean;
        p[2] = m2;
    }
}

extern "C" __global__ void group_norm_apply_f16x8(const __half* x, const __half* weight, const __half* bias,
                                                  __half* out, const float* partials, long n, int splits,
                                                  long pixels, int channels_per_group, int groups, float eps,
                                                  int silu) {
    __shared__ float stats[2];
    long group = blockIdx.x;
    int split = blockIdx.y;
    if (threadIdx.x == 0) merge_group_stats(partials, group, splits, eps, stats);
    __syncthreads();
    const float mean = stats[0], rstd = stats[1];
    long chunk = group_chunk_x8(n, splits);
    long start = min(n, split * chunk);
    long end = min(n, start + chunk);
    int vectors = (int)((end - start) / 8);
    int pixels32 = (int)pixels;
    int first_channel = (int)(group % groups) * channels_per_group;
    const uint4* in = reinterpret_cast<const uint4*>(x + group * n + start);
    uint4* o = reinterpret_cast<uint4*>(out + group * n + start);
    for (int i = threadIdx.x; i < vectors; i += blockDim.x) {
        int c = first_channel + (int)((start + 8 * (long)i) / pixels32);
        float scale = rstd * __half2float(weight[c]);
        float shift = __half2float(bias[c]) - mean * scale;
        uint4 v = in[i];
        __half2* h = reinterpret_cast<__half2*>(&v);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            float2 f = __half22float2(h[j]);
            f.x = f.x * scale + shift;
            f.y = f.y * scale + shift;
            if (silu) {
                f.x = f.x / (1.0f + __expf(-f.x));
                f.y = f.y / (1.0f + __expf(-f.y));
            }
            h[j] = __floats2half2_rn(f.x, f.y);
        }
        o[i] = v;
    }
}

extern "C" __global__ void group_norm_stats_f32(const float* x, float* partials, long n, int splits) {
    group_norm_stats<float>(x, partials, n, splits);
}
extern "C" __global__ void group_norm_stats_f16(const __half* x, float* partials, long n, int splits) {
    group_norm_stats<__half>(x, partials, n, splits);
}
extern "C" __global__ void group_norm_apply_f32(const float* x, const float* w, const float* b, float* out,
                                                const float* partials, long n, int splits, long pixels,
                                                int cpg, int groups, float eps, int silu) {
    group_norm_apply<float>(x, w, b, out, partials, n, splits, pixels, cpg, groups, eps, silu);
}
extern "C" __global__ void group_norm_apply_f16(const __half* x, const __half* w, const __half* b, __half* out,
                                                const float* partials, long n, int splits, long pixels,
                                                int cpg, int groups, float eps, int silu) {
    group_norm_apply<__half>(x, w, b, out, partials, n, splits, pixels, cpg, groups, eps, silu);
}

// ---------------------------------------------------------------------------------------------
// GEGLU: rows of [hidden | gate] -> hidden * gelu_erf(gate).
// ---------------------------------------------------------------------------------------------
// One block row per grid row (blockIdx.y, looping), columns across threads: no division.
template <typename T>
__device__ void geglu(const T* x, T* out, long rows, long half) {
    for (long r = blockIdx.y; r < rows; r += gridDim.y) {
        const T* row = x + r * 2 * half;
        T* o = out + r * half;
        for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < half; j += gridDim.x * blockDim.x) {
            float h = to_float(row[j]);
            float g = to_float(row[half + j]);
            float gelu = 0.5f * g * (1.0f + erff(g * 0.70710678118654752f));
            o[j] = from_float<T>(h * gelu);
        }
    }
}
// f16 with 16-byte loads and stores: needs half % 8 == 0 and 16-byte aligned rows.
extern "C" __global__ void geglu_f16x8(const __half* x, __half* out, long rows, long half) {
    int vectors = (int)(half / 8);
    for (long r = blockIdx.y; r < rows; r += gridDim.y) {
        const uint4* hidden = reinterpret_cast<const uint4*>(x + r * 2 * half);
        const uint4* gate = reinterpret_cast<const uint4*>(x + r * 2 * half + half);
        uint4* o = reinterpret_cast<uint4*>(out + r * half);
        for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < vectors; j += gridDim.x * blockDim.x) {
            uint4 hv = hidden[j], gv = gate[j], ov;
            const __half2* h = reinterpret_cast<const __half2*>(&hv);
            const __half2* g = reinterpret_cast<const __half2*>(&gv);
            __half2* res = reinterpret_cast<__half2*>(&ov);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float2 hf = __half22float2(h[e]), gf = __half22float2(g[e]);
                float a = hf.x * 0.5f * gf.x * (1.0f + erff(gf.x * 0.70710678118654752f));
                float b = hf.y * 0.5f * gf.y * (1.0f + erff(gf.y * 0.70710678118654752f));
                res[e] = __floats2half2_rn(a, b);
            }
            o[j] = ov;
        }
    }
}
extern "C" __global__ void geglu_f32(const float* x, float* out, long rows, long half) { geglu<float>(x, out, rows, half); }
extern "C" __global__ void geglu_f16(const __half* x, __half* out, long rows, long half) { geglu<__half>(x, out, rows, half); }

// ---------------------------------------------------------------------------------------------
// Convolution helpers. im2col writes (batch, channels * kh * kw, out_h * out_w), so that one
// GEMM per batch item, weight (out, k) x columns (k, pixels), lands directly in NCHW.
// conv_init (elementwise.cuh) fills the output with the bias (and a residual) so that the GEMM
// adds onto it.
// ---------------------------------------------------------------------------------------------
// Columns for output pixels [p_start, p_start + p_count) of `batch` items starting at x:
// col is (batch * channels, kh * kw, p_count). One thread per output pixel of one channel plane
// (grid rows walk the planes); it writes the kh * kw entries of that pixel. 32-bit index math
// within a plane: the host keeps planes and bands below 2^31 elements.
template <typename T>
__device__ void im2col(const T* x, T* col, int batch, int channels, int height, int width, int kh, int kw,
                       int stride, int pad, int out_w, int p_start, int p_count) {
    for (int plane = blockIdx.y; plane < batch * channels; plane += gridDim.y) {
        const T* in = x + (long)plane * height * width;
        T* out = col + (long)plane * kh * kw * p_count;
        for (int q = blockIdx.x * blockDim.x + threadIdx.x; q < p_count; q += gridDim.x * blockDim.x) {
            int p = p_start + q;
            int oy = p / out_w, ox = p - oy * out_w;
            int y0 = oy * stride - pad, x0 = ox * stride - pad;
            for (int i = 0; i < kh; ++i) {
                int y = y0 + i;
                bool row_ok = y >= 0 && y < height;
                for (int j = 0; j < kw; ++j) {
                    int xx = x0 + j;
                    T value = from_float<T>(0.0f);
                    if (row_ok && xx >= 0 && xx < width) value = in[y * width + xx];
                    out[(i * kw + j) * p_count + q] = value;
                }
            }
        }
    }
}
extern "C" __global__ void im2col_f32(const float* x, float* col, int b, int c, int h, int w, int kh, int kw,
                                      int stride, int pad, int ow, int p_start, int p_count) {
    im2col<float>(x, col, b, c, h, w, kh, kw, stride, pad, ow, p_start, p_count);
}
extern "C" __global__ void im2col_f16(const __half* x, __half* col, int b, int c, int h, int w, int kh, int kw,
                                      int stride, int pad, int ow, int p_start, int p_count) {
    im2col<__half>(x, col, b, c, h, w, kh, kw, stride, pad, ow, p_start, p_count);
}

// The same columns for f16, a 3x3 kernel at stride 1, and out_w, p_start and p_count multiples
// of 8 (the UNet's 3x3 convolutions but the downsamplers, at widths divisible by 8): one thread
// per 8 consecutive output pixels of one row; per kernel row it reads the 10 input values the 8
// pixels see once and writes each tap's 8 values as one 16-byte store (the generic kernel's
// 2-byte stores: 106 MB of columns in 87 us under ncu on SD 2.1's 96x96 level, about 1.2 TB/s).
// Same arguments as im2col_f16; kh, kw and stride are 3, 3 and 1.
extern "C" __global__ void im2col_f16x8_k3(const __half* x, __half* col, int batch, int channels, int height,
                                           int width, int, int, int, int pad, int out_w, int p_start,
                                           int p_count) {
    const int groups = p_count / 8;
    for (int plane = blockIdx.y; plane < batch * channels; plane += gridDim.y) {
        const __half* in = x + (long)plane * height * width;
        __half* out = col + (long)plane * 9 * p_count;
        for (int group = blockIdx.x * blockDim.x + threadIdx.x; group < groups; group += gridDim.x * blockDim.x) {
            const int q = group * 8;
            const int p = p_start + q;
            const int oy = p / out_w, ox = p - oy * out_w;
            const int y0 = oy - pad, x0 = ox - pad;
#pragma unroll
            for (int i = 0; i < 3; ++i) {
                const int y = y0 + i;
                const bool row_ok = y >= 0 && y < height;
                __half window[10];
#pragma unroll
                for (int e = 0; e < 10; ++e) {
                    const int xx = x0 + e;
                    window[e] = row_ok && xx >= 0 && xx < width ? in[y * width + xx] : __float2half(0.0f);
                }
#pragma unroll
                for (int j = 0; j < 3; ++j) {
                    uint4 packed;
                    __half2* halves = reinterpret_cast<__half2*>(&packed);
#pragma unroll
                    for (int e = 0; e < 4; ++e) halves[e] = __halves2half2(window[j + 2 * e], window[j + 2 * e + 1]);
                    *reinterpret_cast<uint4*>(out + (long)(i * 3 + j) * p_count + q) = packed;
                }
            }
        }
    }
}

// Adds bias[column] to every row of a contiguous (rows, columns) matrix, in place.
template <typename T>
__device__ void add_bias_rows(T* out, const T* bias, long rows, int columns) {
    for (long r = blockIdx.y; r < rows; r += gridDim.y) {
        T* row = out + r * columns;
        for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < columns; c += gridDim.x * blockDim.x) {
            row[c] = from_float<T>(to_float(row[c]) + to_float(bias[c]));
        }
    }
}
extern "C" __global__ void add_bias_rows_f32(float* out, const float* bias, long rows, int columns) {
    add_bias_rows<float>(out, bias, rows, columns);
}
extern "C" __global__ void add_bias_rows_f16(__half* out, const __half* bias, long rows, int columns) {
    add_bias_rows<__half>(out, bias, rows, columns);
}

// ---------------------------------------------------------------------------------------------
// Flash-style attention (FlashAttention-2's scheme) on mma.sync tensor-core instructions:
// f16 q, k, v and output; f32 scores, softmax statistics and output accumulator, all in
// registers. q: (batch, nq, *) with head h at columns [h * d, h * d + d) and row stride q_stride;
// k, v: the same with kv_stride; out: row stride o_stride. A block of 8 warps takes 128 queries
// of one head, each warp 16 of them; keys and values pass through shared memory in tiles of 64,
// double-buffered: the next tile is copied (cp.async) while this one is computed.
// DP is d rounded up to 16 (zero padded); d must be a multiple of 8 and rows 16-byte aligned.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void mma_16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const __half* smem_row) {
    uint32_t address = (uint32_t)__cvta_generic_to_shared(smem_row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
}

constexpr int FLASH_WARPS = 8;
constexpr int FLASH_BM = 16 * FLASH_WARPS;
constexpr int FLASH_BN = 64;

template <int DP>
__device__ void flash_attention(const __half* q, const __half* k, const __half* v, __half* out, int nq, int nk,
                                int d, long q_stride, long kv_stride, long o_stride, long q_batch, long kv_batch,
                                long o_batch, float scale_log2) {
    constexpr int LDH = DP + 8;  // shared row stride in halves: 16-byte rows, no bank conflicts
    constexpr int KSTEPS = DP / 16;
    constexpr int DBLOCKS = DP / 8;
    constexpr int NBLOCKS = FLASH_BN / 8;
    constexpr int CHUNKS = DP / 8;
    extern __shared__ __align__(128) unsigned char smem[];
    __half* const tiles = reinterpret_cast<__half*>(smem);  // [stage][k, v][FLASH_BN][LDH]

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, t = lane % 4;
    const int head = blockIdx.y, b = blockIdx.z;
    const int row0 = blockIdx.x * FLASH_BM + warp * 16;
    const __half* qb = q + b * q_batch + (long)head * d;
    const __half* kb = k + b * kv_batch + (long)head * d;
    const __half* vb = v + b * kv_batch + (long)head * d;

    // This warp's 16 query rows as A fragments, zero beyond nq and d.
    uint32_t qa[KSTEPS][4];
#pragma unroll
    for (int s = 0; s < KSTEPS; ++s) {
#pragma unroll
        for (int part = 0; part < 4; ++part) {
            int r = row0 + g + (part % 2) * 8;
            int c = s * 16 + 2 * t + (part / 2) * 8;
            uint32_t value = 0;
            if (r < nq && c < d) value = *reinterpret_cast<const uint32_t*>(qb + (long)r * q_stride + c);
            qa[s][part] = value;
        }
    }

    float o[DBLOCKS][4];
#pragma unroll
    for (int i = 0; i < DBLOCKS; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float max_lo = -INFINITY, max_hi = -INFINITY;  // rows g and g + 8
    float sum_lo = 0.0f, sum_hi = 0.0f;            // this thread's share of the row sums

    auto load_tile = [&](int key0, int stage) {
        __half* kt = tiles + stage * 2 * FLASH_BN * LDH;
        __half* vt = kt + FLASH_BN * LDH;
        for (int idx = tid; idx < FLASH_BN * CHUNKS; idx += blockDim.x) {
            int r = idx / CHUNKS, c = (idx % CHUNKS) * 8;
            bool valid = key0 + r < nk && c < d;
            long offset = valid ? (long)(key0 + r) * kv_stride + c : 0;
            cp_async_16((uint32_t)__cvta_generic_to_shared(kt + r * LDH + c), kb + offset, valid);
            cp_async_16((uint32_t)__cvta_generic_to_shared(vt + r * LDH + c), vb + offset, valid);
        }
        cp_async_commit();
    };
    const int tile_count = (nk + FLASH_BN - 1) / FLASH_BN;
    load_tile(0, 0);
    for (int tile = 0; tile < tile_count; ++tile) {
        const int key0 = tile * FLASH_BN;
        if (tile + 1 < tile_count) {
            load_tile(key0 + FLASH_BN, (tile + 1) % 2);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const __half* ks = tiles + (tile % 2) * 2 * FLASH_BN * LDH;
        const __half* vs = ks + FLASH_BN * LDH;

        float s[NBLOCKS][4];
#pragma unroll
        for (int nb = 0; nb < NBLOCKS; ++nb) {
            s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.0f;
            const __half* krow = ks + (nb * 8 + g) * LDH + 2 * t;
#pragma unroll
            for (int step = 0; step < KSTEPS; ++step) {
                uint32_t b0 = *reinterpret_cast<const uint32_t*>(krow + step * 16);
                uint32_t b1 = *reinterpret_cast<const uint32_t*>(krow + step * 16 + 8);
                mma_16816(s[nb], qa[step], b0, b1);
            }
        }

        float tile_lo = -INFINITY, tile_hi = -INFINITY;
#pragma unroll
        for (int nb = 0; nb < NBLOCKS; ++nb) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                bool valid = key0 + nb * 8 + 2 * t + e < nk;
                s[nb][e] = valid ? s[nb][e] * scale_log2 : -INFINITY;
                s[nb][2 + e] = valid ? s[nb][2 + e] * scale_log2 : -INFINITY;
                tile_lo = fmaxf(tile_lo, s[nb][e]);
                tile_hi = fmaxf(tile_hi, s[nb][2 + e]);
            }
        }
        tile_lo = fmaxf(tile_lo, __shfl_xor_sync(0xffffffff, tile_lo, 1));
        tile_lo = fmaxf(tile_lo, __shfl_xor_sync(0xffffffff, tile_lo, 2));
        tile_hi = fmaxf(tile_hi, __shfl_xor_sync(0xffffffff, tile_hi, 1));
        tile_hi = fmaxf(tile_hi, __shfl_xor_sync(0xffffffff, tile_hi, 2));
        const float new_lo = fmaxf(max_lo, tile_lo), new_hi = fmaxf(max_hi, tile_hi);
        const float alpha_lo = exp2f(max_lo - new_lo), alpha_hi = exp2f(max_hi - new_hi);
        max_lo = new_lo;
        max_hi = new_hi;
        float add_lo = 0.0f, add_hi = 0.0f;
#pragma unroll
        for (int nb = 0; nb < NBLOCKS; ++nb) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                s[nb][e] = exp2f(s[nb][e] - new_lo);
                s[nb][2 + e] = exp2f(s[nb][2 + e] - new_hi);
                add_lo += s[nb][e];
                add_hi += s[nb][2 + e];
            }
        }
        sum_lo = sum_lo * alpha_lo + add_lo;
        sum_hi = sum_hi * alpha_hi + add_hi;
#pragma unroll
        for (int i = 0; i < DBLOCKS; ++i) {
            o[i][0] *= alpha_lo;
            o[i][1] *= alpha_lo;
            o[i][2] *= alpha_hi;
            o[i][3] *= alpha_hi;
        }

        // O += P V, with P's accumulator layout reused as the A operand.
#pragma unroll
        for (int kk = 0; kk < FLASH_BN / 16; ++kk) {
            uint32_t pa[4];
            pa[0] = pack_half2(s[2 * kk][0], s[2 * kk][1]);
            pa[1] = pack_half2(s[2 * kk][2], s[2 * kk][3]);
            pa[2] = pack_half2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[3] = pack_half2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
            const int matrix = lane / 8, r = lane % 8;
            const __half* vrow = vs + (kk * 16 + (matrix % 2) * 8 + r) * LDH + (matrix / 2) * 8;
#pragma unroll
            for (int db = 0; db < DBLOCKS; db += 2) {
                uint32_t vb4[4];
                ldmatrix_x4_trans(vb4, vrow + db * 8);
                mma_16816(o[db], pa, vb4[0], vb4[1]);
                mma_16816(o[db + 1], pa, vb4[2], vb4[3]);
            }
        }
        // Every warp is done with this stage before the next iteration refills it.
        __syncthreads();
    }

    store_normalised_rows<DBLOCKS>(&o[0][0], sum_lo, sum_hi, out + b * o_batch + (long)head * d, o_stride, row0 + g,
                                   nq, t, d);
}

#define FLASH_ATTENTION(DP)                                                                                      \
    extern "C" __global__ void __launch_bounds__(32 * FLASH_WARPS) flash_attention_d##DP(                       \
        const __half* q, const __half* k, const __half* v, __half* out, int nq, int nk, int d, long q_stride,   \
        long kv_stride, long o_stride, long q_batch, long kv_batch, long o_batch, float scale_log2) {           \
        flash_attention<DP>(q, k, v, out, nq, nk, d, q_stride, kv_stride, o_stride, q_batch, kv_batch, o_batch, \
                            scale_log2);                                                                         \
    }
FLASH_ATTENTION(16)
FLASH_ATTENTION(32)
FLASH_ATTENTION(48)
FLASH_ATTENTION(64)
FLASH_ATTENTION(80)
FLASH_ATTENTION(96)
FLASH_ATTENTION(128)
FLASH_ATTENTION(160)
