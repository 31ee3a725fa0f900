// Flash attention for Hopper (compute capability 9.0, PTX target compute_90a) on the
// warpgroup tensor-core instructions (wgmma), for head width 64: the width of SD 2.x's and
// SDXL's attention heads. Compiled by build.rs into its own PTX module, loaded only on a 9.0
// device; kernels.cu's mma.sync kernel serves every other device and width.
//
// Scheme (FlashAttention-2's, with FlashAttention-3's asynchronous tensor-core products): a
// block of WGS warpgroups (one, as launched) takes 64 * WGS queries of one head; each warpgroup
// keeps its 64 queries' Q fragments, the f32 output accumulator and the softmax statistics in
// registers. Key and value tiles of 64 rows pass through shared memory in three buffers, copied
// with cp.async into the 128-byte swizzled layout that wgmma's shared-memory descriptors read
// (row r's 16-byte chunk c lands at chunk c ^ (r % 8)). S = Q K^T is one wgmma chain with Q
// from registers; P = exp2(S - max) is converted to f16 in registers and is the A operand of
// O += P V, with V read transposed (tnspB) straight from its row-major tile. P V of one tile runs
// on the tensor cores while the next tile's S = Q K^T is issued; the exponentials run on the
// special-function unit with subnormals flushed, and the output's rescale is skipped while no
// row maximum of a warp moves.
#include "flash_common.cuh"

namespace sm90 {

constexpr int HEAD = 64;        // head width: one 128-byte swizzle row of f16
constexpr int ROW_BYTES = 128;  // bytes per K or V row in shared memory

__device__ __forceinline__ uint32_t smem_address(const void* pointer) {
    return (uint32_t)__cvta_generic_to_shared(pointer);
}

// Shared-memory matrix descriptor for a tile of 128-byte rows in the 128-byte swizzle, starting
// at `address` (the tile itself 1024-byte aligned): 8-row groups 1024 bytes apart (SBO), the
// leading offset unused (one swizzle atom spans the whole 64-wide row), swizzle mode 1.
__device__ __forceinline__ uint64_t swizzled_descriptor(uint32_t address) {
    uint64_t desc = 0;
    desc |= (uint64_t)((address & 0x3FFFF) >> 4);
    desc |= (uint64_t)1 << 16;
    desc |= (uint64_t)(1024 >> 4) << 32;
    desc |= (uint64_t)1 << 62;
    return desc;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int PENDING>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(PENDING) : "memory");
}

// Keeps the compiler from moving accesses of an accumulator across the asynchronous products.
template <int N>
__device__ __forceinline__ void fence_registers(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// D(64x64) (=|+=) A(64x16, registers) * B(16x64), `accumulate` = 0 overwriting D. B from the
// swizzled tile at `desc`: TRANSPOSE_B = 0 reads B^T's 64 rows K-major (the key tile, for
// S = Q K^T); 1 reads B's 16 rows transposed from a row-major tile (the value tile, for P V).
template <int TRANSPOSE_B>
__device__ __forceinline__ void wgmma_m64n64k16(float (&d)[32], const uint32_t (&a)[4], uint64_t desc,
                                                int accumulate) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "{%32, %33, %34, %35}, %36, p, 1, 1, %38;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate), "n"(TRANSPOSE_B));
}

// 2^x on the special-function unit, subnormal results flushed to zero (P is rounded to f16
// next, where they are zero anyway).
__device__ __forceinline__ float exp2_ftz(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// q: (batch, nq, *) with head h at columns [h * 64, h * 64 + 64) and row stride q_stride (in
// halves); k, v: the same with kv_stride; out: row stride o_stride. Rows 16-byte aligned.
// Grid: (ceil(nq / (64 * WGS)), heads, batch); 128 * WGS threads; dynamic shared memory
// 3 * 2 * 64 * 128 + 1024 (alignment) bytes.
template <int WGS>
__device__ void flash_attention_wgmma(const __half* q, const __half* k, const __half* v, __half* out, int nq,
                                      int nk, long q_stride, long kv_stride, long o_stride, long q_batch,
                                      long kv_batch, long o_batch, float scale_log2) {
    constexpr int BN = 64;               // keys per tile
    constexpr int STAGES = 3;            // key/value tiles in shared memory
    constexpr int NBLOCKS = BN / 8;      // 8-key column blocks of S per thread
    constexpr int DBLOCKS = HEAD / 8;    // 8-wide column blocks of O per thread
    constexpr int TILE_BYTES = BN * ROW_BYTES;
    constexpr int THREADS = 128 * WGS;
    extern __shared__ unsigned char smem_raw[];
    // Swizzled tiles must start on a 1024-byte boundary.
    const uint32_t smem_base = (smem_address(smem_raw) + 1023) & ~1023u;
    // Stage s: key tile at smem_base + s * 2 * TILE_BYTES, value tile TILE_BYTES after it.

    const int tid = threadIdx.x, lane = tid % 32;
    const int warpgroup = tid / 128, warp_in_group = (tid % 128) / 32;
    const int g = lane / 4, t = lane % 4;
    const int head = blockIdx.y, b = blockIdx.z;
    const int row0 = blockIdx.x * (64 * WGS) + warpgroup * 64 + warp_in_group * 16;
    const __half* qb = q + b * q_batch + (long)head * HEAD;
    const __half* kb = k + b * kv_batch + (long)head * HEAD;
    const __half* vb = v + b * kv_batch + (long)head * HEAD;

    // This thread copies 16-byte chunk `chunk` of rows first_row + i * ROW_STEP of each tile:
    // the same swizzled chunk position in each (ROW_STEP is a multiple of 8).
    constexpr int ROW_STEP = THREADS / 8;
    constexpr int COPIES = BN / ROW_STEP;
    const int first_row = tid / 8, chunk = tid % 8;
    const uint32_t first_dst = first_row * ROW_BYTES + ((chunk ^ (first_row % 8)) * 16);
    const long first_src = (long)first_row * kv_stride + chunk * 8;
    auto load_tile = [&](int tile, int stage) {
        const int key0 = tile * BN;
        const uint32_t kt = smem_base + stage * 2 * TILE_BYTES + first_dst;
        const uint32_t vt = kt + TILE_BYTES;
        const long src = (long)key0 * kv_stride + first_src;
        const bool full = key0 + BN <= nk;
#pragma unroll
        for (int i = 0; i < COPIES; ++i) {
            const bool valid = full || key0 + first_row + i * ROW_STEP < nk;
            const long offset = valid ? src + (long)i * ROW_STEP * kv_stride : 0;
            cp_async_16(kt + i * ROW_STEP * ROW_BYTES, kb + offset, valid);
            cp_async_16(vt + i * ROW_STEP * ROW_BYTES, vb + offset, valid);
        }
        cp_async_commit();
    };

    const int tile_count = (nk + BN - 1) / BN;
    // Prologue: the first STAGES - 1 tiles in flight (empty groups keep the counting uniform).
    static_assert(STAGES >= 3, "a tile is loaded while its two predecessors may still be read");
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < tile_count) load_tile(s, s);
        else cp_async_commit();
    }

    // This warp's 16 query rows as A fragments (the m16n8k16 layout), zero beyond nq.
    uint32_t qa[4][4];
#pragma unroll
    for (int s = 0; s < 4; ++s) {
#pragma unroll
        for (int part = 0; part < 4; ++part) {
            const int r = row0 + g + (part % 2) * 8;
            const int c = s * 16 + 2 * t + (part / 2) * 8;
            qa[s][part] = r < nq ? *reinterpret_cast<const uint32_t*>(qb + (long)r * q_stride + c) : 0u;
        }
    }

    float o[32];
    static_assert(DBLOCKS * 4 == 32, "O is one 64x64 accumulator");
#pragma unroll
    for (int i = 0; i < DBLOCKS * 4; ++i) o[i] = 0.0f;
    float max_lo = -INFINITY, max_hi = -INFINITY;  // raw (unscaled) row maxima, rows g and g + 8
    float sum_lo = 0.0f, sum_hi = 0.0f;            // this thread's share of the row sums
    float s[NBLOCKS * 4];

    auto issue_scores = [&](int stage) {
        const uint32_t kt = smem_base + stage * 2 * TILE_BYTES;
        wgmma_fence();
#pragma unroll
        for (int step = 0; step < 4; ++step)
            wgmma_m64n64k16<0>(s, qa[step], swizzled_descriptor(kt + step * 32), step > 0);
        wgmma_commit();
    };

    // Tile 0's scores.
    cp_async_wait<STAGES - 2>();
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();
    issue_scores(0);
    wgmma_wait<0>();
    fence_registers(s);

    for (int tile = 0; tile < tile_count; ++tile) {
        const int stage = tile % STAGES;
        // Keys past nk (zero-filled) take no weight.
        if ((tile + 1) * BN > nk) {
            const int key0 = tile * BN;
#pragma unroll
            for (int nb = 0; nb < NBLOCKS; ++nb) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    if (key0 + nb * 8 + 2 * t + e >= nk) {
                        s[nb * 4 + e] = -INFINITY;
                        s[nb * 4 + 2 + e] = -INFINITY;
                    }
                }
            }
        }
        float tile_lo = max_lo, tile_hi = max_hi;
#pragma unroll
        for (int nb = 0; nb < NBLOCKS; ++nb) {
            tile_lo = fmaxf(tile_lo, fmaxf(s[nb * 4 + 0], s[nb * 4 + 1]));
            tile_hi = fmaxf(tile_hi, fmaxf(s[nb * 4 + 2], s[nb * 4 + 3]));
        }
        tile_lo = fmaxf(tile_lo, __shfl_xor_sync(0xffffffff, tile_lo, 1));
        tile_lo = fmaxf(tile_lo, __shfl_xor_sync(0xffffffff, tile_lo, 2));
        tile_hi = fmaxf(tile_hi, __shfl_xor_sync(0xffffffff, tile_hi, 1));
        tile_hi = fmaxf(tile_hi, __shfl_xor_sync(0xffffffff, tile_hi, 2));
        const float alpha_lo = exp2_ftz((max_lo - tile_lo) * scale_log2);
        const float alpha_hi = exp2_ftz((max_hi - tile_hi) * scale_log2);
        max_lo = tile_lo;
        max_hi = tile_hi;
        const float shift_lo = -tile_lo * scale_log2, shift_hi = -tile_hi * scale_log2;
        uint32_t p[BN / 16][4];
        float add_lo = 0.0f, add_hi = 0.0f;
#pragma unroll
        for (int nb = 0; nb < NBLOCKS; ++nb) {
            const float p0 = exp2_ftz(fmaf(s[nb * 4 + 0], scale_log2, shift_lo));
            const float p1 = exp2_ftz(fmaf(s[nb * 4 + 1], scale_log2, shift_lo));
            const float p2 = exp2_ftz(fmaf(s[nb * 4 + 2], scale_log2, shift_hi));
            const float p3 = exp2_ftz(fmaf(s[nb * 4 + 3], scale_log2, shift_hi));
            add_lo += p0 + p1;
            add_hi += p2 + p3;
            // Key block nb is half (nb % 2) of the 16-key step nb / 2: A fragment registers
            // (row g, row g + 8) for keys 0-7, then for keys 8-15.
            p[nb / 2][(nb % 2) * 2 + 0] = pack_half2(p0, p1);
            p[nb / 2][(nb % 2) * 2 + 1] = pack_half2(p2, p3);
        }
        sum_lo = sum_lo * alpha_lo + add_lo;
        sum_hi = sum_hi * alpha_hi + add_hi;
        // The running maxima seldom move after the first tiles: skip the rescale when no row of
        // this warp's changed.
        if (__any_sync(0xffffffff, alpha_lo != 1.0f || alpha_hi != 1.0f)) {
#pragma unroll
            for (int db = 0; db < DBLOCKS; ++db) {
                o[db * 4 + 0] *= alpha_lo;
                o[db * 4 + 1] *= alpha_lo;
                o[db * 4 + 2] *= alpha_hi;
                o[db * 4 + 3] *= alpha_hi;
            }
        }

        // O += P V on the tensor cores, asynchronously.
        const uint32_t vt = smem_base + stage * 2 * TILE_BYTES + TILE_BYTES;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            wgmma_m64n64k16<1>(o, p[kk], swizzled_descriptor(vt + kk * 16 * ROW_BYTES), 1);
        }
        wgmma_commit();

        // Meanwhile, once the next tile's copy has landed and every warpgroup is past the
        // previous tile's products (each waited for its own at the end of the last iteration),
        // the tile STAGES - 1 ahead starts loading into the stage that the previous tile used,
        // and the next tile's scores are issued.
        if (tile + 1 < tile_count) {
            cp_async_wait<STAGES - 3>();
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
            __syncthreads();
            const int ahead = tile + STAGES - 1;
            if (ahead < tile_count) load_tile(ahead, ahead % STAGES);
            issue_scores((tile + 1) % STAGES);
        }
        wgmma_wait<0>();
        fence_registers(o);
        fence_registers(s);
    }

    store_normalised_rows<DBLOCKS>(o, sum_lo, sum_hi, out + b * o_batch + (long)head * HEAD, o_stride, row0 + g, nq,
                                   t, HEAD);
}

}  // namespace sm90

// One warpgroup per block: within 1.2 % of two at 4,096 keys, faster at every other size
// measured (two share each key tile between 128 queries but step in lockstep at every tile).
extern "C" __global__ void __launch_bounds__(128)
    flash_attention_wgmma_d64(const __half* q, const __half* k, const __half* v, __half* out, int nq, int nk,
                              long q_stride, long kv_stride, long o_stride, long q_batch, long kv_batch,
                              long o_batch, float scale_log2) {
    sm90::flash_attention_wgmma<1>(q, k, v, out, nq, nk, q_stride, kv_stride, o_stride, q_batch, kv_batch,
                                   o_batch, scale_log2);
}
