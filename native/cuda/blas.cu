// blas.cu - the prefill GEMM through cuBLAS, in builds that found it (CKV_HAVE_CUBLAS; the WMMA
// kernel of matmul.cu is the path otherwise). Twin: ops_matmul, like every matmul.
//
// y[t][r] = dot(W row r, x[t]) for a chunk of tokens: x is converted to f16 once, then the
// weight matrix is dequantised to f16 (dequant8, the formulas of the CPU's dequantize_row_*)
// in slices of rows that fit the context's scratch next to x, and each slice is multiplied by
// cublasGemmEx with f32 accumulation (the tensor cores' f16 rate, with cuBLAS's tiling and
// pipelining, which the 64 x 64 WMMA kernel lacks: 0.33x llama.cpp on pp512). The operands
// are rounded to f16 exactly as the WMMA kernel rounds them, so both meet the same bound.
#include "common.cuh"
#include "cuda-ops.cuh"

#ifdef CKV_HAVE_CUBLAS
#include <cublas_v2.h>

bool ckv_cuda_have_cublas(void) { return true; }

int32_t ckv_cuda_gemm_ws_create(struct cuda_gemm_ws * ws, size_t bytes) {
    *ws = {};
    cublasHandle_t h = NULL;
    if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) {
        return ckv_fail(CKV_ERR_CUDA, "cublasCreate failed");
    }
    if (cudaMalloc(&ws->scratch, bytes) != cudaSuccess) {
        cudaGetLastError();
        cublasDestroy(h);
        ws->scratch = NULL;
        return ckv_fail(CKV_ERR_OOM, "the cuBLAS scratch (%.1f MiB) does not fit on the GPU", bytes / 1048576.0);
    }
    ws->handle = h;
    ws->bytes = bytes;
    return CKV_OK;
}

void ckv_cuda_gemm_ws_free(struct cuda_gemm_ws * ws) {
    if (ws->handle) cublasDestroy((cublasHandle_t) ws->handle);
    cudaFree(ws->scratch);
    cudaFree(ws->gemv_xq);
    *ws = {};
}

// Rows [0, n_rows) of a weight matrix to f16 [n_rows][n_in]; thread i dequantises lane part
// i % 4 of chunk i / 4 (8 values, two 8-byte stores).
template <int T>
static __global__ void dequant_f16_kernel(const uint8_t * __restrict__ w, size_t row_size, int64_t n_in,
                                          int64_t n_items, __half * __restrict__ out) {
    pdl_begin();
    int64_t i = (int64_t) blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_items) {
        return;
    }
    int64_t per_row = n_in / 8, r = i / per_row, k = i % per_row, c = k >> 2;
    int     s = (int) (k & 3);
    float   v[8];
    dequant8<T>(w + r * row_size, c, s, v);
    __half * dst = out + r * n_in + c * 32;
    __half2 h[4] = {__floats2half2_rn(v[0], v[1]), __floats2half2_rn(v[2], v[3]),
                    __floats2half2_rn(v[4], v[5]), __floats2half2_rn(v[6], v[7])};
    *(uint2 *) (dst + chunk_off0<T>(s)) = *(const uint2 *) &h[0];
    *(uint2 *) (dst + chunk_off1<T>(s)) = *(const uint2 *) &h[2];
}

static __global__ void f32_to_f16_kernel(const float * __restrict__ x, __half * __restrict__ y, int64_t n4) {
    pdl_begin();
    int64_t i = (int64_t) blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n4) {
        float4  v = ((const float4 *) x)[i];
        __half2 h[2] = {__floats2half2_rn(v.x, v.y), __floats2half2_rn(v.z, v.w)};
        ((uint2 *) y)[i] = *(const uint2 *) h;
    }
}

static __global__ void add_bias_kernel(float * y, int64_t ldy, const float * __restrict__ bias, int64_t n_out,
                                       int64_t n_tokens) {
    pdl_begin();
    int64_t i = (int64_t) blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n_out * n_tokens) {
        y[(i / n_out) * ldy + i % n_out] += bias[i % n_out];
    }
}

static const char * blas_status_name(cublasStatus_t st) {
    switch (st) {
        case CUBLAS_STATUS_NOT_INITIALIZED: return "not initialized";
        case CUBLAS_STATUS_ALLOC_FAILED: return "alloc failed";
        case CUBLAS_STATUS_INVALID_VALUE: return "invalid value";
        case CUBLAS_STATUS_ARCH_MISMATCH: return "arch mismatch";
        case CUBLAS_STATUS_EXECUTION_FAILED: return "execution failed";
        case CUBLAS_STATUS_NOT_SUPPORTED: return "not supported";
        default: return "error";
    }
}

int32_t ckv_cuda_gemm_blas(const struct cuda_matmul_args * a, cudaStream_t s) {
    const struct cuda_weight * w = a->w;
    const struct cuda_gemm_ws * ws = a->ws;
    int64_t n_in = w->n_in, n_out = w->n_out, n_tok = a->n_tokens;
    size_t  x_bytes = ((size_t) (n_tok * n_in) * sizeof(__half) + 255) & ~(size_t) 255;
    int64_t slice = x_bytes < ws->bytes ? (int64_t) ((ws->bytes - x_bytes) / ((size_t) n_in * sizeof(__half))) : 0;
    slice = slice >= n_out ? n_out : slice >= 128 ? slice / 128 * 128 : slice / 32 * 32;
    if (slice < 32 && slice < n_out) {
        return ckv_fail(CKV_ERR_INVALID_ARG, "cuda matmul: the cuBLAS scratch (%zu bytes) is too small for "
                        "%lld tokens of %lld inputs", ws->bytes, (long long) n_tok, (long long) n_in);
    }
    __half * xh = (__half *) ws->scratch;
    __half * wh = (__half *) ((char *) ws->scratch + x_bytes);
    int64_t  n4 = n_tok * n_in / 4;
    CKV_CUDA_CHECK(launch_pdl(f32_to_f16_kernel, (unsigned) ((n4 + 255) / 256), 256, 0, s, a->x, xh, n4));
    cublasHandle_t h = (cublasHandle_t) ws->handle;
    cublasStatus_t bst = cublasSetStream(h, s);
    const float one = 1.0f, zero = 0.0f;
    for (int64_t r0 = 0; r0 < n_out && bst == CUBLAS_STATUS_SUCCESS; r0 += slice) {
        int64_t rows = n_out - r0 < slice ? n_out - r0 : slice;
        int64_t items = rows * n_in / 8;
        const uint8_t * src = (const uint8_t *) w->data + r0 * w->row_size;
        cudaError_t err = cudaSuccess;
        bool known = dispatch_type(w->type, [&]<int T>() {
            err = launch_pdl(dequant_f16_kernel<T>, (unsigned) ((items + 255) / 256), 256, 0, s, src, w->row_size,
                             n_in, items, wh);
        });
        if (!known) {
            return ckv_fail(CKV_ERR_UNSUPPORTED, "cuda matmul: no kernel for ggml type %u", w->type);
        }
        CKV_CUDA_CHECK(err);
        // Column-major view: y^T [rows][n_tok] (ld ldy) = W_slice (n_in x rows, transposed) * x^T (n_in x n_tok).
        bst = cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, (int) rows, (int) n_tok, (int) n_in, &one, wh, CUDA_R_16F,
                           (int) n_in, xh, CUDA_R_16F, (int) n_in, a->accumulate ? &one : &zero, a->y + r0,
                           CUDA_R_32F, (int) a->ldy, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    }
    if (bst != CUBLAS_STATUS_SUCCESS) {
        return ckv_fail(CKV_ERR_CUDA, "cublasGemmEx failed: %s (%d)", blas_status_name(bst), (int) bst);
    }
    if (a->bias) {
        int64_t n = n_out * n_tok;
        CKV_CUDA_CHECK(launch_pdl(add_bias_kernel, (unsigned) ((n + 255) / 256), 256, 0, s, a->y, a->ldy, a->bias,
                                  n_out, n_tok));
    }
    return CKV_OK;
}

#else  // no cuBLAS in this build: the WMMA kernel serves every GEMM

bool ckv_cuda_have_cublas(void) { return false; }

int32_t ckv_cuda_gemm_ws_create(struct cuda_gemm_ws * ws, size_t) {
    *ws = {};
    return CKV_OK;
}

void ckv_cuda_gemm_ws_free(struct cuda_gemm_ws * ws) {
    cudaFree(ws->gemv_xq);
    *ws = {};
}

int32_t ckv_cuda_gemm_blas(const struct cuda_matmul_args *, cudaStream_t) {
    return ckv_fail(CKV_ERR_UNSUPPORTED, "cuda matmul: this build has no cuBLAS");
}

#endif
