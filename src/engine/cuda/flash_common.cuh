// Pieces shared by the two flash attention kernels, kernels.cu's (mma.sync, every GPU from
// compute capability 8.0) and attention_sm90.cu's (wgmma, Hopper): asynchronous copies into
// shared memory, f16 packing, and the epilogue that normalises a warp's output rows.
#pragma once
#include <cuda_fp16.h>
#include <stdint.h>

// 16-byte asynchronous copy from global memory to the shared-memory address `dst`; zero-fills
// when `valid` is false.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
    int src_bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING));
}

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
}

// The end of one warp's 16 query rows in the m16n8 accumulator layout (thread (g, t) = (lane / 4,
// lane % 4) holds, for each 8-wide column block db, o[db * 4 + 0, 1] of row g and o[db * 4 + 2, 3]
// of row g + 8, at columns db * 8 + 2t, + 1): completes the row sums over the row's four
// threads, divides by them and stores f16 pairs of the first `d` columns of rows r_lo = row0 + g
// and r_lo + 8 that are below nq, into `ob` (row stride o_stride).
template <int DBLOCKS>
__device__ __forceinline__ void store_normalised_rows(const float* o, float sum_lo, float sum_hi, __half* ob,
                                                      long o_stride, int r_lo, int nq, int t, int d) {
    sum_lo += __shfl_xor_sync(0xffffffff, sum_lo, 1);
    sum_lo += __shfl_xor_sync(0xffffffff, sum_lo, 2);
    sum_hi += __shfl_xor_sync(0xffffffff, sum_hi, 1);
    sum_hi += __shfl_xor_sync(0xffffffff, sum_hi, 2);
    const float inv_lo = 1.0f / sum_lo, inv_hi = 1.0f / sum_hi;
    const int r_hi = r_lo + 8;
#pragma unroll
    for (int db = 0; db < DBLOCKS; ++db) {
        const int c = db * 8 + 2 * t;
        if (c >= d) continue;
        if (r_lo < nq)
            *reinterpret_cast<__half2*>(ob + (long)r_lo * o_stride + c) =
                __floats2half2_rn(o[db * 4 + 0] * inv_lo, o[db * 4 + 1] * inv_lo);
        if (r_hi < nq)
            *reinterpret_cast<__half2*>(ob + (long)r_hi * o_stride + c) =
                __floats2half2_rn(o[db * 4 + 2] * inv_hi, o[db * 4 + 3] * inv_hi);
    }
}
