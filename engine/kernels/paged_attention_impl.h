/* The kernels for one element type; included by paged_attention.c with T and SUFFIX defined.
 *
 * Work is split into (sequence, key partition) items of up to PARTITION keys, each covering every
 * head of the sequence: one item streams its blocks through the cache once (a token's K for all
 * heads is one contiguous row), and a single long sequence still keeps every thread busy
 * (flash-decoding). Items of a sequence with several partitions leave partial results
 * (running max, sum of exponentials, unnormalised output) that a second pass merges. */
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, SUFFIX)
#define LOAD CAT(load_, SUFFIX)
#define LOAD1 CAT(load1_, SUFFIX)
#define STORE CAT(store_, SUFFIX)

/* K/V rows of this step -> their cache slots (block * block_size + offset). */
void FN(tandem_write_kv_)(T* cache, const T* k, int64_t k_row_stride, const T* v, int64_t v_row_stride,
                          const int64_t* slots, int64_t rows, int64_t block_size) {
    for (int64_t t = 0; t < rows; t++) {
        int64_t block = slots[t] / block_size, offset = slots[t] % block_size;
        memcpy(cache + ((block * 2) * block_size + offset) * WIDTH, k + t * k_row_stride, WIDTH * sizeof(T));
        memcpy(cache + ((block * 2 + 1) * block_size + offset) * WIDTH, v + t * v_row_stride, WIDTH * sizeof(T));
    }
}

/* Query row `qrow` (all NUM_HEADS heads) against keys [j0, j1) of a sequence whose blocks are
 * `table`. Writes, per head, the max score, the sum of exp(score - max) and the unnormalised
 * output sum of exp(score - max) * V (fp32) into `partial` ([NUM_HEADS][HEAD_DIM + 2]).
 * `scores` has room for NUM_HEADS * PARTITION floats. */
static void FN(attend_part_)(const T* qrow, const T* cache, const int32_t* table, int64_t j0, int64_t j1,
                             int64_t block_size, float scale, float* scores, float* partial) {
    const int64_t n = j1 - j0;
    f32x16 q[NUM_HEADS][NV];
    float mx[NUM_HEADS];
    for (int h = 0; h < NUM_HEADS; h++) {
        for (int c = 0; c < NV; c++) q[h][c] = LOAD(qrow + h * HEAD_DIM + 16 * c) * scale;
        mx[h] = -INFINITY;
    }
    /* Scores, sixteen keys at a time; (block, offset) advance without a division per key, and
     * each key's V row is prefetched for the pass below. */
    int64_t block = j0 / block_size, offset = j0 % block_size;
    for (int64_t i0 = 0; i0 < n; i0 += 16) {
        int64_t m = n - i0 < 16 ? n - i0 : 16;
        f32x16 part[NUM_HEADS][16];
        for (int64_t o = 0; o < 16; o++) {
            if (o >= m) {
                for (int h = 0; h < NUM_HEADS; h++) part[h][o] = splat(0.0f);
                continue;
            }
            const T* kp = cache + ((int64_t)table[block] * 2 * block_size + offset) * WIDTH;
            const T* vp = kp + block_size * WIDTH;
            /* This key's V row, for the pass below (the cache is cold after a layer's GEMMs). */
            for (int64_t line = 0; line < (int64_t)(WIDTH * sizeof(T)); line += 64)
                __builtin_prefetch((const char*)vp + line, 0, 3);
            if (++offset == block_size) {
                offset = 0;
                block++;
            }
            for (int kh = 0; kh < KV_HEADS; kh++) {
                f32x16 key[NV];
                for (int c = 0; c < NV; c++) key[c] = LOAD(kp + kh * HEAD_DIM + 16 * c);
                for (int g = 0; g < GROUP; g++) {
                    int h = kh * GROUP + g;
                    f32x16 a = q[h][0] * key[0];
                    for (int c = 1; c < NV; c++) a += q[h][c] * key[c];
                    part[h][o] = a;
                }
            }
        }
        for (int h = 0; h < NUM_HEADS; h++) {
            f32x16 s = reduce16(part[h]);
            for (int64_t o = 0; o < m; o++) mx[h] = s[o] > mx[h] ? s[o] : mx[h];
            store_f32(scores + h * PARTITION + i0, s);
        }
    }
    /* exp(score - max) and its sum, per head. */
    for (int h = 0; h < NUM_HEADS; h++) {
        float* sh = scores + h * PARTITION;
        f32x16 sum = splat(0.0f);
        int64_t j = 0;
        for (; j + 16 <= n; j += 16) {
            f32x16 e = exp_nonpositive(load_f32(sh + j) - mx[h]);
            store_f32(sh + j, e);
            sum += e;
        }
        float tail = 0.0f;
        for (; j < n; j++) {
            sh[j] = expf(sh[j] - mx[h]);
            tail += sh[j];
        }
        partial[h * (HEAD_DIM + 2)] = mx[h];
        partial[h * (HEAD_DIM + 2) + 1] = hsum(sum) + tail;
    }
    /* Sum of exp * V, one kv head at a time (its rows are in cache by now). */
    for (int kh = 0; kh < KV_HEADS; kh++) {
        f32x16 acc[GROUP][NV];
        for (int g = 0; g < GROUP; g++)
            for (int c = 0; c < NV; c++) acc[g][c] = splat(0.0f);
        int64_t vblock = j0 / block_size, voffset = j0 % block_size;
        for (int64_t i = 0; i < n; i++) {
            const T* vp = cache + (((int64_t)table[vblock] * 2 + 1) * block_size + voffset) * WIDTH
                          + kh * HEAD_DIM;
            if (++voffset == block_size) {
                voffset = 0;
                vblock++;
            }
            f32x16 value[NV];
            for (int c = 0; c < NV; c++) value[c] = LOAD(vp + 16 * c);
            for (int g = 0; g < GROUP; g++) {
                f32x16 p = splat(scores[(kh * GROUP + g) * PARTITION + i]);
                for (int c = 0; c < NV; c++) acc[g][c] += p * value[c];
            }
        }
        for (int g = 0; g < GROUP; g++)
            for (int c = 0; c < NV; c++) store_f32(partial + (kh * GROUP + g) * (HEAD_DIM + 2) + 2 + 16 * c, acc[g][c]);
    }
}

/* Partials of one query row (`count` of them, each [NUM_HEADS][HEAD_DIM + 2]) -> its output. */
static void FN(merge_)(const float* partials, int64_t count, T* orow) {
    for (int h = 0; h < NUM_HEADS; h++) {
        float mx = -INFINITY, total = 0.0f;
        for (int64_t p = 0; p < count; p++) {
            const float* ph = partials + (p * NUM_HEADS + h) * (HEAD_DIM + 2);
            if (ph[1] > 0.0f && ph[0] > mx) mx = ph[0];
        }
        f32x16 acc[NV];
        for (int c = 0; c < NV; c++) acc[c] = splat(0.0f);
        for (int64_t p = 0; p < count; p++) {
            const float* ph = partials + (p * NUM_HEADS + h) * (HEAD_DIM + 2);
            if (ph[1] == 0.0f) continue; /* a partition past this row's causal limit */
            float w = expf(ph[0] - mx);
            total += w * ph[1];
            for (int c = 0; c < NV; c++) acc[c] += w * load_f32(ph + 2 + 16 * c);
        }
        for (int c = 0; c < NV; c++) STORE(orow + h * HEAD_DIM + 16 * c, acc[c] * (1.0f / total));
    }
}

/* Attend every query row of `num_seqs` sequences. seq_info rows: (first query row, query rows,
 * kv length including this step's rows); query row i of a sequence sits at position
 * kv_len - q_len + i and sees keys [0, position]. Returns 0, or -1 when out of memory. */
int FN(tandem_attend_)(const T* q, int64_t q_row_stride, const T* cache, T* out, const int32_t* seq_info,
                       int64_t num_seqs, const int32_t* block_table, int64_t table_width,
                       int64_t block_size, float scale) {
    const int64_t stride = NUM_HEADS * (HEAD_DIM + 2);
    /* Items (sequence, partition) and where each item's partials go: row r of partition p of
     * sequence s at partials[row_base[s] + r * parts[s] + p]. */
    int64_t* item_seq = NULL, *item_part = NULL, *row_base = NULL, *parts = NULL;
    float* partials = NULL;
    int64_t items = 0, partial_rows = 0;
    int failed = 0;
    row_base = (int64_t*)malloc(sizeof(int64_t) * (num_seqs + 1));
    parts = (int64_t*)malloc(sizeof(int64_t) * (num_seqs + 1));
    if (!row_base || !parts) goto fail;
    for (int64_t s = 0; s < num_seqs; s++) {
        parts[s] = (seq_info[3 * s + 2] + PARTITION - 1) / PARTITION;
        row_base[s] = partial_rows;
        partial_rows += seq_info[3 * s + 1] * parts[s];
        items += parts[s];
    }
    item_seq = (int64_t*)malloc(sizeof(int64_t) * (items + 1));
    item_part = (int64_t*)malloc(sizeof(int64_t) * (items + 1));
    partials = (float*)malloc(sizeof(float) * (partial_rows + 1) * stride);
    if (!item_seq || !item_part || !partials) goto fail;
    for (int64_t s = 0, i = 0; s < num_seqs; s++)
        for (int64_t p = 0; p < parts[s]; p++, i++) {
            item_seq[i] = s;
            item_part[i] = p;
        }
#pragma omp parallel
    {
        float* scores = (float*)malloc(sizeof(float) * NUM_HEADS * PARTITION);
        if (!scores) failed = 1;
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < items; i++) {
            if (!scores) continue;
            int64_t s = item_seq[i], p = item_part[i];
            int64_t q0 = seq_info[3 * s], qn = seq_info[3 * s + 1], kvn = seq_info[3 * s + 2];
            for (int64_t r = 0; r < qn; r++) {
                int64_t limit = kvn - qn + r + 1; /* causal: keys [0, limit) */
                int64_t j0 = p * PARTITION, j1 = j0 + PARTITION < limit ? j0 + PARTITION : limit;
                float* part = partials + (row_base[s] + r * parts[s] + p) * stride;
                if (j0 >= j1) {
                    for (int h = 0; h < NUM_HEADS; h++) part[h * (HEAD_DIM + 2) + 1] = 0.0f;
                    continue;
                }
                FN(attend_part_)(q + (q0 + r) * q_row_stride, cache, block_table + s * table_width, j0, j1,
                                 block_size, scale, scores, part);
            }
        }
        free(scores);
#pragma omp for schedule(dynamic, 4)
        for (int64_t s = 0; s < num_seqs; s++) {
            int64_t q0 = seq_info[3 * s], qn = seq_info[3 * s + 1];
            for (int64_t r = 0; r < qn; r++)
                FN(merge_)(partials + (row_base[s] + r * parts[s]) * stride, parts[s],
                           out + (q0 + r) * NUM_HEADS * HEAD_DIM);
        }
    }
    free(item_seq); free(item_part); free(row_base); free(parts); free(partials);
    return failed ? -1 : 0;
fail:
    free(item_seq); free(item_part); free(row_base); free(parts); free(partials);
    return -1;
}

/* ------------------------------------------------------------------------------------------
 * Prefill chunks: many query rows per sequence. A work item is (sequence, kv head, block of
 * ROW_BLOCK query rows); its GROUP * ROW_BLOCK query vectors sweep the keys sixteen at a time with
 * an online softmax (flash attention). Each key block is transposed once into KT[d][key], so a
 * row's sixteen scores are HEAD_DIM broadcast-FMAs with no horizontal sums, and the block's K and
 * V are read once for all the item's rows. */
#ifndef ROW_BLOCK
#define ROW_BLOCK 32
#endif
#define QROWS (ROW_BLOCK * GROUP)

/* One block of KEY_BLOCK keys of a prefill item, ready for the dot products, in groups of 16
 * keys (one vector of scores each). Generic: K transposed and V as fp32. bf16 pair-dot path: K
 * transposed into (d, d+1) pairs, V interleaved into (key, key + 1) pairs. */
#ifndef KEY_BLOCK
#define KEY_BLOCK 64
#endif
#define KG (KEY_BLOCK / 16)
typedef struct {
#ifdef PREFILL_BF16_DOT
    u32x16 kt[KG][HEAD_DIM / 2];          /* kt[g][dp][o]: (K[16g+o][2dp], K[16g+o][2dp+1]) */
    u32x16 vp[KEY_BLOCK / 2][NV];         /* vp[op][c]: 32 bf16 (V[2op][16c+e], V[2op+1][16c+e]) */
#else
    float kt[KG][HEAD_DIM][16];           /* kt[g][d][o] = K[16g+o][d] */
    float vf[KEY_BLOCK][HEAD_DIM];
#endif
} FN(KeyBlock);

static inline const T* FN(key_row_)(const T* cache, const int32_t* table, int64_t j, int64_t block_size,
                                    int64_t kv_head) {
    return cache + ((int64_t)table[j / block_size] * 2 * block_size + j % block_size) * WIDTH + kv_head * HEAD_DIM;
}

static void FN(load_key_block_)(FN(KeyBlock)* kb, const T* cache, const int32_t* table, int64_t j0, int64_t nk,
                                int64_t block_size, int64_t kv_head) {
#ifdef PREFILL_BF16_DOT
    for (int g = 0; g < KG; g++) {
        u32x16 rows[HEAD_DIM / 32][16];
        for (int64_t o = 0; o < 16; o++) {
            int64_t j = 16 * g + o;
            if (j >= nk) {
                for (int w = 0; w < HEAD_DIM / 32; w++) rows[w][o] = (u32x16){0};
                continue;
            }
            const T* kp = FN(key_row_)(cache, table, j0 + j, block_size, kv_head);
            for (int w = 0; w < HEAD_DIM / 32; w++) memcpy(&rows[w][o], kp + 32 * w, 64);
        }
        for (int w = 0; w < HEAD_DIM / 32; w++) transpose16(rows[w], kb->kt[g] + 16 * w);
    }
    for (int op = 0; op < KEY_BLOCK / 2; op++) {
        u16x16 lo[NV], hi[NV];
        for (int half = 0; half < 2; half++) {
            int64_t j = 2 * op + half;
            u16x16* dst = half ? hi : lo;
            if (j >= nk) {
                for (int c = 0; c < NV; c++) dst[c] = (u16x16){0};
                continue;
            }
            const T* vp = FN(key_row_)(cache, table, j0 + j, block_size, kv_head) + block_size * WIDTH;
            for (int c = 0; c < NV; c++) memcpy(&dst[c], vp + 16 * c, 32);
        }
        for (int c = 0; c < NV; c++) {
            typedef uint16_t u16x32 __attribute__((vector_size(64)));
            u16x32 mix = __builtin_shufflevector(lo[c], hi[c], 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22,
                                                 7, 23, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30,
                                                 15, 31);
            kb->vp[op][c] = (u32x16)mix;
        }
    }
#else
    for (int64_t j = 0; j < KEY_BLOCK; j++) {
        const int g = j / 16, o = j % 16;
        if (j >= nk) {
            for (int d = 0; d < HEAD_DIM; d++) kb->kt[g][d][o] = 0.0f;
            for (int d = 0; d < HEAD_DIM; d++) kb->vf[j][d] = 0.0f;
            continue;
        }
        const T* kp = FN(key_row_)(cache, table, j0 + j, block_size, kv_head);
        const T* vp = kp + block_size * WIDTH;
        for (int c = 0; c < NV; c++) {
            f32x16 k = LOAD(kp + 16 * c);
            for (int e = 0; e < 16; e++) kb->kt[g][16 * c + e][o] = k[e];
            store_f32(kb->vf[j] + 16 * c, LOAD(vp + 16 * c));
        }
    }
#endif
}

/* Scores of four query vectors (unscaled rows `q[u]`) against the block's keys: s[u][g] holds
 * keys 16g .. 16g+15. Groups at or past `groups` are left alone. */
static inline void FN(block_scores_)(const FN(KeyBlock)* kb, const T* const q[4], float scale, int groups,
                                     f32x16 s[4][KG]) {
    for (int g = 0; g < groups; g++) {
        f32x16 a[4] = {splat(0.0f), splat(0.0f), splat(0.0f), splat(0.0f)};
#ifdef PREFILL_BF16_DOT
        for (int dp = 0; dp < HEAD_DIM / 2; dp++) {
            const __m512bh k = (__m512bh)kb->kt[g][dp];
            for (int u = 0; u < 4; u++) {
                uint32_t pair;
                memcpy(&pair, q[u] + 2 * dp, 4);
                a[u] = (f32x16)_mm512_dpbf16_ps((__m512)a[u], (__m512bh)_mm512_set1_epi32((int)pair), k);
            }
        }
#else
        for (int d = 0; d < HEAD_DIM; d++) {
            const f32x16 k = load_f32(kb->kt[g][d]);
            for (int u = 0; u < 4; u++) a[u] += LOAD1(q[u][d]) * k;
        }
#endif
        for (int u = 0; u < 4; u++) s[u][g] = a[u] * scale;
    }
}

/* Probabilities in the form the value products take: bf16 for the pair-dot path (rounded once
 * per block), fp32 otherwise. */
#ifdef PREFILL_BF16_DOT
typedef bf16_t FN(Prob);
#define STORE_PROB store_bf16
#else
typedef float FN(Prob);
#define STORE_PROB store_f32
#endif

/* a[u] += sum over the block's first `keys` keys of p[u][key] * V[key] (columns 16c .. 16c+15). */
static inline void FN(block_values_)(const FN(KeyBlock)* kb, const FN(Prob) p[4][KEY_BLOCK], int64_t keys, int c,
                                     f32x16 a[4]) {
#ifdef PREFILL_BF16_DOT
    for (int64_t op = 0; op < (keys + 1) / 2; op++) {
        const __m512bh v = (__m512bh)kb->vp[op][c];
        for (int u = 0; u < 4; u++) {
            uint32_t pair; /* (p[2op], p[2op + 1]) as bf16, the layout of a V pair */
            memcpy(&pair, p[u] + 2 * op, 4);
            a[u] = (f32x16)_mm512_dpbf16_ps((__m512)a[u], (__m512bh)_mm512_set1_epi32((int)pair), v);
        }
    }
#else
    for (int64_t o = 0; o < keys; o++) {
        const f32x16 v = load_f32(kb->vf[o] + 16 * c);
        for (int u = 0; u < 4; u++) a[u] += p[u][o] * v;
    }
#endif
}

static void FN(prefill_item_)(const T* q, int64_t q_row_stride, int64_t rows, int64_t first_pos,
                              const T* cache, const int32_t* table, int64_t kv_head, int64_t block_size,
                              float scale, T* out) {
    float acc[QROWS + 4][HEAD_DIM];
    float mx[QROWS], sum[QROWS];
    const T* qrow[QROWS + 4];
    FN(KeyBlock) kb;
    const int64_t nq = rows * GROUP;
    for (int64_t i = 0; i < nq + 4; i++) {
        int64_t r = i < nq ? i / GROUP : 0, g = i < nq ? i % GROUP : 0; /* past nq: any valid row */
        qrow[i] = q + r * q_row_stride + (kv_head * GROUP + g) * HEAD_DIM;
        for (int c = 0; c < NV; c++) store_f32(acc[i] + 16 * c, splat(0.0f));
        if (i < nq) {
            mx[i] = -INFINITY;
            sum[i] = 0.0f;
        }
    }
    const int64_t keys = first_pos + rows; /* the last row sees keys [0, keys) */
    for (int64_t j0 = 0; j0 < keys; j0 += KEY_BLOCK) {
        const int64_t nk = keys - j0 < KEY_BLOCK ? keys - j0 : KEY_BLOCK;
        FN(load_key_block_)(&kb, cache, table, j0, nk, block_size, kv_head);
        /* Four query vectors at a time share every load of the block. */
        for (int64_t i0 = 0; i0 < nq; i0 += 4) {
            const int64_t ni = nq - i0 < 4 ? nq - i0 : 4;
            const int64_t reach = first_pos + (i0 + ni - 1) / GROUP + 1 - j0; /* keys the last row sees */
            if (reach <= 0) continue; /* the block is in all their futures */
            const int64_t used = reach < nk ? reach : nk;
            const int groups = (int)((used + 15) / 16);
            f32x16 s[4][KG];
            FN(Prob) p[4][KEY_BLOCK];
            float correction[4];
            FN(block_scores_)(&kb, qrow + i0, scale, groups, s);
            for (int64_t u = 0; u < 4; u++) {
                const int64_t i = i0 + u, limit = first_pos + i / GROUP + 1 - j0;
                const int64_t valid = u >= ni || limit <= 0 ? 0 : limit < used ? limit : used;
                correction[u] = 1.0f;
                if (!valid) {
                    for (int g = 0; g < groups; g++) STORE_PROB(p[u] + 16 * g, splat(0.0f));
                    continue;
                }
                f32x16 m = splat(-INFINITY);
                for (int g = 0; g < groups; g++) {
                    s[u][g] = keep_first(s[u][g], valid - 16 * g, -INFINITY);
                    m = vmax(m, s[u][g]);
                }
                const float block_max = hmax(m), m_new = block_max > mx[i] ? block_max : mx[i];
                f32x16 total = splat(0.0f);
                for (int g = 0; g < groups; g++) {
                    f32x16 e = keep_first(exp_nonpositive(s[u][g] - m_new), valid - 16 * g, 0.0f);
                    STORE_PROB(p[u] + 16 * g, e);
                    total += e;
                }
                correction[u] = expf(mx[i] - m_new); /* 0 on a row's first block (max was -inf) */
                sum[i] = sum[i] * correction[u] + hsum(total);
                mx[i] = m_new;
            }
            for (int c = 0; c < NV; c++) {
                f32x16 a[4];
                for (int u = 0; u < 4; u++) a[u] = load_f32(acc[i0 + u] + 16 * c) * correction[u];
                FN(block_values_)(&kb, p, used, c, a);
                for (int64_t u = 0; u < ni; u++) store_f32(acc[i0 + u] + 16 * c, a[u]);
            }
        }
    }
    for (int64_t i = 0; i < nq; i++) {
        T* dst = out + (i / GROUP) * NUM_HEADS * HEAD_DIM + (kv_head * GROUP + i % GROUP) * HEAD_DIM;
        for (int c = 0; c < NV; c++) STORE(dst + 16 * c, load_f32(acc[i] + 16 * c) * (1.0f / sum[i]));
    }
}

/* Attend the query rows of `num_seqs` prefill chunks (seq_info as for tandem_attend_). */
void FN(tandem_prefill_attend_)(const T* q, int64_t q_row_stride, const T* cache, T* out,
                                const int32_t* seq_info, int64_t num_seqs, const int32_t* block_table,
                                int64_t table_width, int64_t block_size, float scale) {
    int64_t items = 0;
    for (int64_t s = 0; s < num_seqs; s++) items += (seq_info[3 * s + 1] + ROW_BLOCK - 1) / ROW_BLOCK * KV_HEADS;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; item++) {
        /* item -> (sequence, row block, kv head); later row blocks see more keys, so they are
         * handed out first. */
        int64_t rest = items - 1 - item, s = 0;
        for (;; s++) {
            int64_t n = (seq_info[3 * s + 1] + ROW_BLOCK - 1) / ROW_BLOCK * KV_HEADS;
            if (rest < n) break;
            rest -= n;
        }
        int64_t block = rest / KV_HEADS, kv_head = rest % KV_HEADS;
        int64_t q0 = seq_info[3 * s], qn = seq_info[3 * s + 1], kvn = seq_info[3 * s + 2];
        int64_t r0 = block * ROW_BLOCK, rows = qn - r0 < ROW_BLOCK ? qn - r0 : ROW_BLOCK;
        FN(prefill_item_)(q + (q0 + r0) * q_row_stride, q_row_stride, rows, kvn - qn + r0, cache,
                          block_table + s * table_width, kv_head, block_size, scale,
                          out + (q0 + r0) * NUM_HEADS * HEAD_DIM);
    }
}

#undef CAT_
#undef CAT
#undef FN
#undef STORE_PROB
#undef LOAD
#undef LOAD1
#undef STORE
