/* KVSwap's per-sequence scoring arithmetic, fused (built and loaded by __init__.py beside it).
 *
 * Torch runs each step below as its own operation over the (heads, tokens) arrays: at 7k tokens
 * a row of one head is 28 KB, so here each head's row is scaled, exponentiated, normalised and
 * summed while it stays in the L1 cache, in one call instead of about ten dispatches.
 * Plain C99, no intrinsics, for any ISA (x86-64, Arm): the compiler vectorises the loops, which
 * needs its reductions reassociated and finite math (flags in __init__.py); every value here is
 * finite, and the one infinity written is built from its bits. */

#include <float.h>
#include <math.h>
#include <stdint.h>


/* e^x for x <= 0 (logits minus their maximum), relative error ~2e-7; below -87 it is e^-87. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float kf = x * 1.44269504088896341f + 0.5f;
    int k = (int)kf;
    k -= kf < (float)k;  /* floor: k = round(x / ln 2) */
    const float r = (x - (float)k * 0.693145751953125f) - (float)k * 1.428606765330187e-06f;  /* |r| <= ln2 / 2 */
    float p = 1.3888889e-3f;  /* e^r: Taylor to r^6 */
    p = p * r + 8.3333333e-3f;
    p = p * r + 4.1666667e-2f;
    p = p * r + 1.6666667e-1f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { int32_t i; float f; } two = { .i = (k + 127) << 23 };  /* 2^k, k >= -126 */
    return p * two.f;
}

/* Per head h (rows of `tokens`): logits prod[h] * qscale[h] * kscale, their softmax into
 * probs[h], lse[h] = log-sum-exp of the logits; group_mass[n] = the probability of tokens
 * [n*g, n*g+g) summed over heads (tokens = groups * g); token_mass: scratch of `tokens`. */
void kvswap_softmax_groups(int heads, int tokens, int g, const int32_t *prod, const float *qscale,
                           const float *kscale, float *probs, float *lse, float *group_mass,
                           float *token_mass) {
    for (int t = 0; t < tokens; t++) token_mass[t] = 0.0f;
    for (int h = 0; h < heads; h++) {
        const int32_t *pr = prod + (int64_t)h * tokens;
        float *row = probs + (int64_t)h * tokens;
        const float s = qscale[h];
        float m = -FLT_MAX;  /* logits are finite */
        for (int t = 0; t < tokens; t++) {
            const float l = (float)pr[t] * s * kscale[t];
            row[t] = l;
            m = fmaxf(m, l);
        }
        float sum = 0.0f;
        for (int t = 0; t < tokens; t++) {
            const float e = exp_nonpositive(row[t] - m);
            row[t] = e;
            sum += e;
        }
        const float inv = 1.0f / sum;
        for (int t = 0; t < tokens; t++) {
            row[t] *= inv;
            token_mass[t] += row[t];
        }
        lse[h] = m + logf(sum);
    }
    const int groups = tokens / g;
    for (int n = 0; n < groups; n++) {
        float acc = 0.0f;
        for (int j = 0; j < g; j++) acc += token_mass[n * g + j];
        group_mass[n] = acc;
    }
}

/* The rest of a selection (the groups `ids`, k of them, ascending) as one softmax block, in the
 * low-rank space: per head, mass = 1 - the selection's probability; out[h] = (out_all[h] - the
 * selection's share of it) / mass, and rest_lse[h] = lse[h] + log(mass); where mass <= min_mass
 * nothing is left: out 0, rest_lse -inf. probs: (heads, tokens) as kvswap_softmax_groups wrote
 * them; values: rv rows of low-rank values, row r at values + r * ld; scratch: (heads + rv) * k * g
 * floats, where the selected tokens' probabilities and values are gathered contiguous first.
 * Returns 0, or 1 (nothing written) when an id is outside [0, tokens / g). */
int kvswap_rest(int heads, int tokens, int g, int rv, const float *probs, const float *values, int64_t ld,
                 const int64_t *ids, int k, const float *out_all, const float *lse, float min_mass,
                 float *scratch, float *out, float *rest_lse) {
    /* as bits: compiled with finite math, an infinity constant could be folded away */
    const union { uint32_t i; float f; } minus_inf = { .i = 0xff800000u };
    const int m = k * g;
    float *picked = scratch, *chosen = scratch + (int64_t)heads * m;
    for (int i = 0; i < k; i++)
        if (ids[i] < 0 || ids[i] >= tokens / g) return 1;
    for (int h = 0; h < heads; h++)
        for (int i = 0; i < k; i++)
            for (int j = 0; j < g; j++) picked[(int64_t)h * m + i * g + j] = probs[(int64_t)h * tokens + ids[i] * g + j];
    for (int r = 0; r < rv; r++)
        for (int i = 0; i < k; i++)
            for (int j = 0; j < g; j++) chosen[(int64_t)r * m + i * g + j] = values[r * ld + ids[i] * g + j];
    for (int h = 0; h < heads; h++) {
        const float *p = picked + (int64_t)h * m;
        float mass = 1.0f;
        for (int t = 0; t < m; t++) mass -= p[t];
        const int left = mass > min_mass;
        const float kept = left ? mass : min_mass;
        const float f = left ? 1.0f / kept : 0.0f;
        for (int r = 0; r < rv; r++) {
            const float *c = chosen + (int64_t)r * m;
            float share = 0.0f;
            for (int t = 0; t < m; t++) share += p[t] * c[t];
            out[h * rv + r] = (out_all[h * rv + r] - share) * f;
        }
        rest_lse[h] = left ? lse[h] + logf(kept) : minus_inf.f;
    }
    return 0;
}

/* Whether group a ranks before group b on score s: higher score, ties to the lower id. */
static inline int better(const float *s, int64_t a, int64_t b) { return s[a] > s[b] || (s[a] == s[b] && a < b); }

/* Reorder ids[0..len) so that ids[0..c) are the c best (any order), by quickselect. */
static void best_first(const float *s, int64_t *ids, int len, int c) {
    int lo = 0, hi = len - 1;
    while (lo < hi) {
        const int64_t pivot = ids[lo + (hi - lo) / 2];
        int i = lo, j = hi;
        while (i <= j) {
            while (better(s, ids[i], pivot)) i++;
            while (better(s, pivot, ids[j])) j--;
            if (i <= j) { const int64_t t = ids[i]; ids[i] = ids[j]; ids[j] = t; i++; j--; }
        }
        if (c - 1 <= j) hi = j;
        else if (c - 1 >= i) lo = i;
        else break;
    }
}

static void sort_by_key(double *key, int64_t *ids, int len) {  /* insertion sort: len ~ M/G */
    for (int i = 1; i < len; i++) {
        const double kk = key[i];
        const int64_t id = ids[i];
        int j = i - 1;
        for (; j >= 0 && key[j] > kk; j--) { key[j + 1] = key[j]; ids[j + 1] = ids[j]; }
        key[j + 1] = kk;
        ids[j + 1] = id;
    }
}

/* predict.base.top_groups for rows of `scores` (row r at scores + r * n, its first counts[r]
 * valid, counts[r] >= k): out (rows, k) the ids, ascending, of the k best groups of each row, those
 * in previous[r] (prev_len[r] ids, any order; ids past the row ignored) ranked `places` places
 * higher than they score. Ranks are taken among the k + places best by score (anything below
 * ranks >= k even when favoured). cand: counts' max int64; key: k + places doubles; flag:
 * counts' max bytes. Returns 0, or 1 when a row has fewer than k groups (nothing written). */
int kvswap_top_groups(int rows, int n, const float *scores, const int64_t *counts, int k, int places,
                      const int64_t *const *previous, const int64_t *prev_len, int64_t *out, int64_t *cand,
                      double *key, uint8_t *flag) {
    for (int r = 0; r < rows; r++)
        if (counts[r] < k || counts[r] > n) return 1;
    for (int r = 0; r < rows; r++) {
        const float *s = scores + (int64_t)r * n;
        const int count = (int)counts[r];
        const int favour = places > 0 && prev_len[r] > 0;
        const int c = favour ? (count < k + places ? count : k + places) : k;
        for (int i = 0; i < count; i++) cand[i] = i;
        best_first(s, cand, count, c);
        if (favour) {
            /* by score, best first; equal scores by id, as `better` */
            for (int i = 1; i < c; i++) {
                const int64_t id = cand[i];
                int j = i - 1;
                for (; j >= 0 && better(s, id, cand[j]); j--) cand[j + 1] = cand[j];
                cand[j + 1] = id;
            }
            for (int i = 0; i < count; i++) flag[i] = 0;
            for (int64_t i = 0; i < prev_len[r]; i++)
                if (previous[r][i] >= 0 && previous[r][i] < count) flag[previous[r][i]] = 1;
            for (int i = 0; i < c; i++) key[i] = (double)i - (flag[cand[i]] ? places + 0.5 : 0.0);
            sort_by_key(key, cand, c);
        }
        for (int i = 0; i < k; i++) key[i] = (double)cand[i];
        sort_by_key(key, cand, k);
        for (int i = 0; i < k; i++) out[(int64_t)r * k + i] = cand[i];
    }
    return 0;
}
