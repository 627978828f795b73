/* The kernels for one element type; included by paged_attention.c with T and SUFFIX defined. */
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, SUFFIX)
#define LOAD CAT(load_, SUFFIX)
#define STORE CAT(store_, SUFFIX)

/* K/V rows of this step -> their cache slots (block * block_size + offset). */
void FN(tandem_write_kv_)(T* cache, const T* k, int64_t k_row_stride, const T* v, int64_t v_row_stride,
                          const int64_t* slots, int64_t rows, int64_t kv_heads, int64_t block_size) {
    int64_t width = kv_heads * HEAD_DIM;
    for (int64_t t = 0; t < rows; t++) {
        int64_t block = slots[t] / block_size, offset = slots[t] % block_size;
        memcpy(cache + ((block * 2) * block_size + offset) * width, k + t * k_row_stride, width * sizeof(T));
        memcpy(cache + ((block * 2 + 1) * block_size + offset) * width, v + t * v_row_stride, width * sizeof(T));
    }
}

/* One query row of one kv head: the GROUP query heads sharing that kv head attend keys [0, n).
 * `scores` has room for GROUP rows of `stride` floats. */
static void FN(attend_row_)(const T* qrow, const T* cache, const int32_t* table, T* orow, int64_t n,
                            int64_t kv_head, int64_t width, int64_t block_size, float scale,
                            float* scores, int64_t stride) {
    f32x16 q[GROUP][NV], acc[GROUP][NV];
    float mx[GROUP], inv[GROUP];
    for (int g = 0; g < GROUP; g++) {
        for (int c = 0; c < NV; c++) q[g][c] = LOAD(qrow + g * HEAD_DIM + 16 * c) * scale;
        mx[g] = -INFINITY;
    }
    /* Scores, sixteen keys at a time; (block, offset) advance without a division per key. */
    int64_t block = 0, offset = 0;
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
        int64_t m = n - j0 < 16 ? n - j0 : 16;
        f32x16 part[GROUP][16];
        for (int64_t o = 0; o < 16; o++) {
            if (o >= m) {
                for (int g = 0; g < GROUP; g++) part[g][o] = splat(0.0f);
                continue;
            }
            const T* kp = cache + ((int64_t)table[block] * 2 * block_size + offset) * width + kv_head * HEAD_DIM;
            if (++offset == block_size) {
                offset = 0;
                block++;
            }
            f32x16 key[NV];
            for (int c = 0; c < NV; c++) key[c] = LOAD(kp + 16 * c);
            for (int g = 0; g < GROUP; g++) {
                f32x16 a = q[g][0] * key[0];
                for (int c = 1; c < NV; c++) a += q[g][c] * key[c];
                part[g][o] = a;
            }
        }
        for (int g = 0; g < GROUP; g++) {
            f32x16 s = reduce16(part[g]);
            for (int64_t o = 0; o < m; o++) mx[g] = s[o] > mx[g] ? s[o] : mx[g];
            store_f32(scores + g * stride + j0, s);
        }
    }
    /* Softmax numerators and their sums. */
    for (int g = 0; g < GROUP; g++) {
        float* sg = scores + g * stride;
        f32x16 sum = splat(0.0f);
        int64_t j = 0;
        for (; j + 16 <= n; j += 16) {
            f32x16 e = exp_nonpositive(load_f32(sg + j) - mx[g]);
            store_f32(sg + j, e);
            sum += e;
        }
        float tail = 0.0f;
        for (; j < n; j++) {
            sg[j] = expf(sg[j] - mx[g]);
            tail += sg[j];
        }
        inv[g] = 1.0f / (hsum(sum) + tail);
        for (int c = 0; c < NV; c++) acc[g][c] = splat(0.0f);
    }
    /* Weighted sum of V, block by block. */
    for (int64_t j0 = 0, b = 0; j0 < n; j0 += block_size, b++) {
        const T* vb = cache + ((int64_t)table[b] * 2 + 1) * block_size * width + kv_head * HEAD_DIM;
        int64_t m = n - j0 < block_size ? n - j0 : block_size;
        for (int64_t o = 0; o < m; o++) {
            f32x16 value[NV];
            for (int c = 0; c < NV; c++) value[c] = LOAD(vb + o * width + 16 * c);
            for (int g = 0; g < GROUP; g++) {
                f32x16 p = splat(scores[g * stride + j0 + o]);
                for (int c = 0; c < NV; c++) acc[g][c] += p * value[c];
            }
        }
    }
    for (int g = 0; g < GROUP; g++)
        for (int c = 0; c < NV; c++) STORE(orow + g * HEAD_DIM + 16 * c, acc[g][c] * inv[g]);
}

/* Attend every query row of `num_seqs` sequences. seq_info rows: (first query row, query rows,
 * kv length including this step's rows); query row i of a sequence sits at position
 * kv_len - q_len + i and sees keys [0, position]. Returns 0, or -1 when out of memory. */
int FN(tandem_attend_)(const T* q, int64_t q_row_stride, const T* cache, T* out, const int32_t* seq_info,
                       int64_t num_seqs, const int32_t* block_table, int64_t table_width, int64_t kv_heads,
                       int64_t block_size, float scale) {
    int64_t width = kv_heads * HEAD_DIM, num_heads = kv_heads * GROUP, max_kv = 0;
    for (int64_t s = 0; s < num_seqs; s++) max_kv = seq_info[3 * s + 2] > max_kv ? seq_info[3 * s + 2] : max_kv;
    int64_t stride = (max_kv + 15) / 16 * 16;
    int failed = 0;
#pragma omp parallel
    {
        float* scores = (float*)malloc(sizeof(float) * GROUP * stride);
        if (!scores) failed = 1;
#pragma omp for schedule(dynamic, 1) collapse(2)
        for (int64_t s = 0; s < num_seqs; s++) {
            for (int64_t h = 0; h < kv_heads; h++) {
                if (!scores) continue;
                int64_t q0 = seq_info[3 * s], qn = seq_info[3 * s + 1], kvn = seq_info[3 * s + 2];
                for (int64_t i = 0; i < qn; i++)
                    FN(attend_row_)(q + (q0 + i) * q_row_stride + h * GROUP * HEAD_DIM, cache,
                                    block_table + s * table_width,
                                    out + (q0 + i) * num_heads * HEAD_DIM + h * GROUP * HEAD_DIM,
                                    kvn - qn + i + 1, h, width, block_size, scale, scores, stride);
            }
        }
        free(scores);
    }
    return failed ? -1 : 0;
}

#undef CAT_
#undef CAT
#undef FN
#undef LOAD
#undef STORE
