// Atelier's own CUDA kernels: fused GroupNorm (+SiLU), GEGLU, im2col for the convolutions'
// GEMMs, and a flash-style attention on the tensor cores (f16 in, f32 accumulation, no
// materialised score matrix). Compiled to PTX by build.rs with nvcc; launched from cuda.rs.
#include <cuda_fp16.h>
#include <mma.h>
#include <stdint.h>

using namespace nvcuda;

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

// ---------------------------------------------------------------------------------------------
// GroupNorm over contiguous (batch, channels, pixels). The elements of group g of batch item b
// are contiguous: [(b * groups + g) * n, + n) with n = channels / groups * pixels. Each group is
// split over `splits` blocks. Pass 1 writes (count, mean, M2) per block; pass 2 merges them
// (Chan et al.) and normalises, applies the affine weights and, if asked, SiLU.
// ---------------------------------------------------------------------------------------------
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
    if (threadIdx.x == 0) {
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
    __syncthreads();
    float mean = stats[0], rstd = stats[1];
    long chunk = (n + splits - 1) / splits;
    long start = split * chunk;
    long end = min(n, start + chunk);
    int first_channel = (int)(group % groups) * channels_per_group;
    const T* in = x + group * n;
    T* o = out + group * n;
    for (long i = start + threadIdx.x; i < end; i += blockDim.x) {
        int c = first_channel + (int)(i / pixels);
        float y = (to_float(in[i]) - mean) * rstd * to_float(weight[c]) + to_float(bias[c]);
        if (silu) y = y / (1.0f + __expf(-y));
        o[i] = from_float<T>(y);
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
template <typename T>
__device__ void geglu(const T* x, T* out, long rows, long half) {
    long total = rows * half;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        long r = i / half, j = i % half;
        float h = to_float(x[r * 2 * half + j]);
        float g = to_float(x[r * 2 * half + half + j]);
        float gelu = 0.5f * g * (1.0f + erff(g * 0.70710678118654752f));
        out[i] = from_float<T>(h * gelu);
    }
}
extern "C" __global__ void geglu_f32(const float* x, float* out, long rows, long half) { geglu<float>(x, out, rows, half); }
extern "C" __global__ void geglu_f16(const __half* x, __half* out, long rows, long half) { geglu<__half>(x, out, rows, half); }

// ---------------------------------------------------------------------------------------------
// Convolution helpers. im2col writes (batch, channels * kh * kw, out_h * out_w), so that one
// GEMM per batch item, weight (out, k) x columns (k, pixels), lands directly in NCHW.
// conv_init fills the output with the bias (and a residual) so that the GEMM adds onto it.
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ void im2col(const T* x, T* col, int batch, int channels, int height, int width, int kh, int kw,
                       int stride, int pad, int out_h, int out_w) {
    long total = (long)batch * channels * kh * kw * out_h * out_w;
    for (long idx = blockIdx.x * (long)blockDim.x + threadIdx.x; idx < total; idx += (long)gridDim.x * blockDim.x) {
        long t = idx;
        int ox = t % out_w; t /= out_w;
        int oy = t % out_h; t /= out_h;
        int j = t % kw; t /= kw;
        int i = t % kh; t /= kh;
        int c = t % channels;
        long b = t / channels;
        int y = oy * stride - pad + i;
        int xx = ox * stride - pad + j;
        T value = from_float<T>(0.0f);
        if (y >= 0 && y < height && xx >= 0 && xx < width) value = x[((b * channels + c) * height + y) * width + xx];
        col[idx] = value;
    }
}
extern "C" __global__ void im2col_f32(const float* x, float* col, int b, int c, int h, int w, int kh, int kw,
                                      int stride, int pad, int oh, int ow) {
    im2col<float>(x, col, b, c, h, w, kh, kw, stride, pad, oh, ow);
}
extern "C" __global__ void im2col_f16(const __half* x, __half* col, int b, int c, int h, int w, int kh, int kw,
                                      int stride, int pad, int oh, int ow) {
    im2col<__half>(x, col, b, c, h, w, kh, kw, stride, pad, oh, ow);
}

template <typename T>
__device__ void conv_init(T* out, const T* bias, const T* residual, long total, long channels, long pixels) {
    for (long idx = blockIdx.x * (long)blockDim.x + threadIdx.x; idx < total; idx += (long)gridDim.x * blockDim.x) {
        float value = to_float(bias[(idx / pixels) % channels]);
        if (residual) value += to_float(residual[idx]);
        out[idx] = from_float<T>(value);
    }
}
extern "C" __global__ void conv_init_f32(float* out, const float* bias, const float* residual, long total, long channels, long pixels) {
    conv_init<float>(out, bias, residual, total, channels, pixels);
}
extern "C" __global__ void conv_init_f16(__half* out, const __half* bias, const __half* residual, long total, long channels, long pixels) {
    conv_init<__half>(out, bias, residual, total, channels, pixels);
}

// ---------------------------------------------------------------------------------------------
// Flash-style attention, f16 in and out, f32 scores, softmax statistics and output accumulator.
// q: (batch, nq, *) with head h at columns [h * d, h * d + d) and row stride q_stride elements;
// k, v: the same with kv_stride; out: (batch, nq, heads * d) with row stride o_stride.
// One block of 4 warps takes 64 queries of one head; each warp owns 16 of them. Keys and values
// come in tiles of 64. DP is d rounded up to 16 (zero padded). d must be a multiple of 8 and the
// rows 16-byte aligned (the host checks).
// ---------------------------------------------------------------------------------------------
template <int DP>
__device__ void flash_attention(const __half* q, const __half* k, const __half* v, __half* out, int nq, int nk,
                                int d, long q_stride, long kv_stride, long o_stride, long q_batch, long kv_batch,
                                long o_batch, float scale_log2) {
    constexpr int BM = 64, BN = 64, LDH = DP + 8, LDS = BN + 4, LDP = BN + 8, LDO = DP + 4;
    constexpr int CHUNKS = DP / 8;
    extern __shared__ __align__(128) unsigned char smem[];
    __half* qs = reinterpret_cast<__half*>(smem);
    __half* ks = qs + BM * LDH;
    __half* vs = ks + BN * LDH;
    float* ss = reinterpret_cast<float*>(vs + BN * LDH);
    __half* ps = reinterpret_cast<__half*>(ss + BM * LDS);
    float* os = reinterpret_cast<float*>(ps + BM * LDP);
    float* row_max = os + BM * LDO;
    float* row_sum = row_max + BM;

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int q0 = blockIdx.x * BM, head = blockIdx.y, b = blockIdx.z;
    const __half* qb = q + b * q_batch + (long)head * d;
    const __half* kb = k + b * kv_batch + (long)head * d;
    const __half* vb = v + b * kv_batch + (long)head * d;
    const uint4 zero = make_uint4(0, 0, 0, 0);

    for (int idx = tid; idx < BM * CHUNKS; idx += blockDim.x) {
        int r = idx / CHUNKS, c = (idx % CHUNKS) * 8;
        uint4 value = zero;
        if (q0 + r < nq && c < d) value = *reinterpret_cast<const uint4*>(qb + (long)(q0 + r) * q_stride + c);
        *reinterpret_cast<uint4*>(qs + r * LDH + c) = value;
    }
    for (int idx = tid; idx < BM * DP; idx += blockDim.x) os[(idx / DP) * LDO + idx % DP] = 0.0f;
    if (tid < BM) {
        row_max[tid] = -INFINITY;
        row_sum[tid] = 0.0f;
    }

    const int r0 = warp * 16;
    for (int key0 = 0; key0 < nk; key0 += BN) {
        __syncthreads();
        for (int idx = tid; idx < BN * CHUNKS; idx += blockDim.x) {
            int r = idx / CHUNKS, c = (idx % CHUNKS) * 8;
            uint4 kv = zero, vv = zero;
            if (key0 + r < nk && c < d) {
                kv = *reinterpret_cast<const uint4*>(kb + (long)(key0 + r) * kv_stride + c);
                vv = *reinterpret_cast<const uint4*>(vb + (long)(key0 + r) * kv_stride + c);
            }
            *reinterpret_cast<uint4*>(ks + r * LDH + c) = kv;
            *reinterpret_cast<uint4*>(vs + r * LDH + c) = vv;
        }
        __syncthreads();

        // Scores of this warp's 16 queries against the 64 keys.
        for (int j = 0; j < BN / 16; ++j) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.0f);
            for (int kk = 0; kk < DP / 16; ++kk) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> bt;
                wmma::load_matrix_sync(a, qs + r0 * LDH + kk * 16, LDH);
                wmma::load_matrix_sync(bt, ks + j * 16 * LDH + kk * 16, LDH);
                wmma::mma_sync(acc, a, bt, acc);
            }
            wmma::store_matrix_sync(ss + r0 * LDS + j * 16, acc, LDS, wmma::mem_row_major);
        }
        __syncwarp();

        // Online softmax: two lanes per row, 32 keys each.
        const int r = r0 + lane / 2, part = lane % 2;
        float tile_max = -INFINITY;
        for (int c = part * 32; c < part * 32 + 32; ++c) {
            if (key0 + c < nk) tile_max = fmaxf(tile_max, ss[r * LDS + c] * scale_log2);
        }
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, 1));
        const float old_max = row_max[r];
        const float new_max = fmaxf(old_max, tile_max);
        float sum = 0.0f;
        for (int c = part * 32; c < part * 32 + 32; ++c) {
            float p = key0 + c < nk ? exp2f(ss[r * LDS + c] * scale_log2 - new_max) : 0.0f;
            ps[r * LDP + c] = __float2half(p);
            sum += p;
        }
        sum += __shfl_xor_sync(0xffffffff, sum, 1);
        const float alpha = exp2f(old_max - new_max);
        for (int c = part * (DP / 2); c < part * (DP / 2) + DP / 2; ++c) os[r * LDO + c] *= alpha;
        __syncwarp();
        if (part == 0) {
            row_max[r] = new_max;
            row_sum[r] = row_sum[r] * alpha + sum;
        }
        __syncwarp();

        // Output accumulator += P V.
        for (int c = 0; c < DP / 16; ++c) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::load_matrix_sync(acc, os + r0 * LDO + c * 16, LDO, wmma::mem_row_major);
            for (int kk = 0; kk < BN / 16; ++kk) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> bv;
                wmma::load_matrix_sync(a, ps + r0 * LDP + kk * 16, LDP);
                wmma::load_matrix_sync(bv, vs + kk * 16 * LDH + c * 16, LDH);
                wmma::mma_sync(acc, a, bv, acc);
            }
            wmma::store_matrix_sync(os + r0 * LDO + c * 16, acc, LDO, wmma::mem_row_major);
        }
    }
    __syncthreads();

    __half* ob = out + b * o_batch + (long)head * d;
    for (int idx = tid; idx < BM * CHUNKS; idx += blockDim.x) {
        int r = idx / CHUNKS, c = (idx % CHUNKS) * 8;
        if (q0 + r >= nq || c >= d) continue;
        float inv = 1.0f / row_sum[r];
        __align__(16) __half packed[8];
        for (int e = 0; e < 8; ++e) packed[e] = __float2half(os[r * LDO + c + e] * inv);
        *reinterpret_cast<uint4*>(ob + (long)(q0 + r) * o_stride + c) = *reinterpret_cast<uint4*>(packed);
    }
}

#define FLASH_ATTENTION(DP)                                                                                      \
    extern "C" __global__ void __launch_bounds__(128) flash_attention_d##DP(                                    \
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
