// dagbuild: Llama decode layers as ONE persistent kernel node (issue 8): one layer a node, or the whole stack.
//
// Why: with a kernel per projection the weight stream stops at every grid boundary. What a kernel can prefetch
// before its grid-dependency wait is what its resident blocks' buffers hold, and its blocks become resident only
// as the previous kernel's blocks leave, so each of a layer's five boundaries costs a drain and a ramp
// (kernels/llama_fused.md, "What holds the step back"). Here one grid of `sms` blocks runs the whole layer:
//
//   A  RMSNorm + packed QKV GEMV + RoPE + KV append     (QkvJob<wt>)   | arrive A
//   -  attention: (head, split) units, partials to part_o / part_ml    | wait A; arrive T; wait T
//   B  O projection + residual, attention combine in its x staging      (RowsJob<true>) | arrive/wait B
//   C  RMSNorm + packed gate/up GEMV + SiLU * up                        (SwigluJob)     | arrive/wait C
//   D  down projection + residual                                        (RowsJob<true>)
//
// and between phases blocks meet at arrival counters (sync[0..3] of this layer, zeroed by a memset node each
// step) instead of kernel boundaries. The weights do not depend on anything, so each block streams ITS weight
// rows of all four GEMV phases, in order, through one ring of shared-memory slots filled by TMA bulk copies
// (cp.async.bulk + mbarrier): the ring runs ahead across the phase boundaries and the attention, and the next
// phase's weights land while this phase waits on its latency chain. The first slots are issued before
// griddepcontrol.wait, so they stream while the previous layer's kernel finishes (two layer blocks fit an SM:
// __launch_bounds__(256, 2), at most 128 registers, and ~96 KiB of shared memory each at 4 slots).
// With `layers` > 1 one grid runs layers 0..layers-1 in turn (a fifth counter a layer: the residual x is whole
// before the next layer's norm), and the ring's stage numbers run on across layers: with one block a SM and a
// ring of up to 12 slots (192 KiB a SM in flight) the next layer's weights land while this layer waits on its
// attention and barriers, and no grid boundary drains the stream anywhere in the stack.
//
// * Work split: a GEMV phase of P row pairs (the jobs' pairs, as the GEMV engine's) gives block b the pairs
//   [P b / G, P (b + 1) / G). A stage is up to LY_MAX_PAIRS pairs of one k chunk, at most LY_SLOT bytes: 2 pairs
//   of 2048-wide f16 rows, or one pair of a 5632-wide row in two k chunks. Each row of a stage is one bulk copy.
// * Ring: slot s % nslot holds stage s; its full mbarrier counts the TMA bytes. Two warp groups take alternate
//   stages (nslot is a multiple of LY_GROUPS, so a slot serves one group and each use's parity is waited for in
//   order); when the last warp of the group is done with a slot (a shared counter), its lane 0 issues stage
//   s + nslot into it.
// * Math: warp gw of the group takes part gw of the stage's k chunk for every row of the stage (x read from
//   shared memory once a stage), its lanes stride over 16-byte packs against x (f32; times the RMSNorm weight
//   in phases A and C; for f16/bf16 weights in two float4 planes so a warp's loads are contiguous), a warp sum
//   per row, and lane 0 writes one cell per (row, k chunk, part). At the phase's end one thread per pair adds
//   its cells in order (deterministic), scales by rsqrt(mean(x^2) + eps) (A, C) and runs the job's epilogue.
// * Attention: units (head h, split t) of keys [L t / n, L (t + 1) / n), n = min(ceil(L / chunk), max_splits,
//   G / heads), L = pos + 1; unit u runs on block u % G (attn_span of kernels/llama_fused.cu); each writes its
//   unnormalised o and (m, l). Phase B's x staging combines them (every block, for every head).
// * The KV cache holds the weight type wt (as HF's cache holds the model dtype): phase A rounds each appended key
//   and value once (kv_store), and the attention reads the rounded rows back (row p included: what later steps
//   read), widened to float; all arithmetic is f32.
// * Produced data (x, q, the KV cache, partials, act) is read through L2 (ld.global.cg): written by other
//   blocks of this grid, it must not come from a stale L1 line.
// Without sm_90 (HIP, older archs) the phases read their weights straight from global memory; all else holds.
// Requirements: batch 1 (row 0 of x); blockDim 256; the stack's buffers with layer 0 first (weights, norms,
// bias and counters packed by layer; the KV cache, of the weight type, kv_stride elements a layer); every block
// resident at once (grid <= what fits the card, else a bounded spin traps); hidden, ffn, heads * head_dim
// multiples of 8; at most LY_MAX_ROWS weight rows and LY_MAX_CELLS partial sums per block and phase (the spec's
// checks); head_dim as attn_decode; dynamic shared memory for the fixed part and LY_GROUPS slots at least (the
// spec's `shared`).
// Measured (kernels/llama_fused.md): one layer a node is correct, but slower than the five nodes a layer of
// llama_fused.cu: its stages are consumed at about half the rate a SM's share of DRAM would allow, with at most
// ~48 KiB a SM in flight. The whole stack (layers > 1) is compiled and bound on the CPU, not yet run on a GPU.
// ------------------------------------------------------------------------------------------------------------

#include "llama_fused.cu"

#define LY_BLOCK 256
#define LY_WARPS (LY_BLOCK / 32)
#ifndef LY_SLOT
#define LY_SLOT 16384  // bytes of one ring slot
#endif
#ifndef LY_GROUPS
#define LY_GROUPS 2  // warp groups: group g takes the stages s with s % LY_GROUPS == g (independent pipelines)
#endif
#define LY_GROUP_WARPS (LY_WARPS / LY_GROUPS)
#define LY_MAX_SLOTS 16  // 8 at two blocks a SM, up to 12 at one (the whole stack: layers > 1)
#define LY_MAX_PAIRS 2     // pairs per stage (every warp of a group holds a partial sum of each row)
#define LY_MAX_ROWS 256    // weight rows of one block in one phase
#define LY_MAX_CELLS 1024  // partial sums of one block in one phase: rows x k chunks x warps of a group
#ifndef LY_TABLE
#define LY_TABLE 0  // stages of a layer kept in shared memory as a table (16 B each, at most 112: the room the spec
#endif              // leaves; its layer_stack kernel passes 112); later ones, and all at 0, are worked out per use
#if LY_TABLE > 112
#error "LY_TABLE: at most 112 stages (the room LY_HEAD and the spec's shared memory keep for the table)"
#endif
#ifndef LY_X_INFLIGHT
#define LY_X_INFLIGHT 4  // float4 loads per thread in flight when staging x, act or the attention partials
#endif
#ifndef LY_SPIN_LIMIT
#define LY_SPIN_LIMIT (1u << 26)  // polls of an arrival counter before the kernel traps (a grid not all resident)
#endif

// tools/blocktrace.py marks: 0 = (phase A done, attention barrier passed), 1 = (B barrier passed, C barrier passed),
// 2 = (A's x staged, A's last stage consumed), 3 = (C's x staged, C's last stage consumed)
#ifndef LY_MARKS
#define LY_MARKS 0
#endif

// Knobs for the next measurements (tools/blocktrace.py --define NAME=V; the defaults are what the GPU tests ran):
// LY_PROXY_FENCE 1: fence.proxy.async before a slot's refill (generic reads, then async-proxy writes); 0 leaves it
//   to the slot counter's ordering, as CUTLASS's TMA pipelines do with their empty barriers.
// LY_TRIGGER: when the next layer may launch (and its blocks prefetch, sharing DRAM with this layer): 0 at the
//   start, 2 when phase C starts, 3 when phase D starts.
// LY_L2_AHEAD N > nslot: each issue also asks L2 for stage s + N's rows (cp.async.bulk.prefetch.L2), a second,
//   deeper window of bytes in flight that needs no shared memory (the stack at 12 slots: try 24).
// LY_TABLE N (<= 112; 0 = none, the default; the spec's whole stack passes 112): the first N stages of a layer as
//   a table in shared memory, so issuing a stage (one lane, after the last warp of a group releases its slot) and
//   reading its place is one 16-byte load instead of ly_stage's chain of divisions and shared loads (LY_L2_AHEAD's second stage_rows a
//   stage had added ~0.6 us a stage). H100, TinyLlama f16 whole stack: 1606.7 -> 1476.6 us a step (-8 %; the
//   prologue's wait only 13.1 -> 11.4 us after embed); with LY_GROUPS 4 as well 1264.0 (the spec's layer_stack).
// LY_DIAG 1 (timing only, the results are WRONG): the stages are waited for and released but not multiplied, so
//   a phase's time is the ring's and the barriers' alone.
#ifndef LY_PROXY_FENCE
#define LY_PROXY_FENCE 1
#endif
#ifndef LY_TRIGGER
#define LY_TRIGGER 0
#endif
#ifndef LY_L2_AHEAD
#define LY_L2_AHEAD 0
#endif
#ifndef LY_DIAG
#define LY_DIAG 0
#endif

#if DB_CUDA && defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
#define LY_TMA 1
#else
#define LY_TMA 0
#endif

// ---- ring primitives (sm_90: mbarrier + cp.async.bulk) ------------------------------------------------------

__device__ __forceinline__ unsigned int ly_saddr(const void* p) {
#if LY_TMA
    return (unsigned int)__cvta_generic_to_shared(p);
#else
    return 0u;
#endif
}

__device__ __forceinline__ void ly_bar_init(unsigned long long* bar) {
#if LY_TMA
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(ly_saddr(bar)) : "memory");
#endif
}

__device__ __forceinline__ void ly_bar_init_fence() {
#if LY_TMA
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}

// the one arrival of a slot's use, expecting `bytes` of TMA writes
__device__ __forceinline__ void ly_bar_expect(unsigned long long* bar, unsigned int bytes) {
#if LY_TMA
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(ly_saddr(bar)), "r"(bytes)
                 : "memory");
#endif
}

__device__ __forceinline__ void ly_bar_wait(unsigned long long* bar, unsigned int parity) {
#if LY_TMA
    unsigned int done;
    do {
        asm volatile(
            "{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\tselp.u32 %0, 1, 0, p;\n\t}"
            : "=r"(done)
            : "r"(ly_saddr(bar)), "r"(parity)
            : "memory");
    } while (!done);
#endif
}

__device__ __forceinline__ void ly_bulk_copy(void* dst, const void* src, unsigned int bytes, unsigned long long* bar) {
#if LY_TMA
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                     ly_saddr(dst)),
                 "l"(src), "r"(bytes), "r"(ly_saddr(bar))
                 : "memory");
#endif
}

// bytes at src (a multiple of 16) into L2, no shared memory, nothing to wait for
__device__ __forceinline__ void ly_prefetch_l2(const void* src, unsigned int bytes) {
#if LY_TMA
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(src), "r"(bytes) : "memory");
#endif
}

// ---- arrival counters between phases -----------------------------------------------------------------------

// Thread 0 of every block: this block's writes are visible device-wide, then counted.
__device__ __forceinline__ void ly_arrive(int* ctr) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(ctr, 1);
    }
}

// Every thread: returns once `n` blocks have arrived (their writes are then visible to this block's L2 loads).
// A block that polls LY_SPIN_LIMIT times traps (an error at the next synchronize, not a hang): some block of the
// grid never became resident.
__device__ __forceinline__ void ly_wait(int* ctr, int n) {
    if (threadIdx.x == 0) {
        unsigned int polls = 0;
        while (true) {
            int v;
#if DB_CUDA
            asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(ctr) : "memory");
#else
            v = __hip_atomic_load(ctr, __ATOMIC_ACQUIRE, __HIP_MEMORY_SCOPE_AGENT);
#endif
            if (v >= n) break;
            if (++polls == LY_SPIN_LIMIT) DB_TRAP();  // not every block is resident: a grid too large
        }
        __threadfence();
    }
    __syncthreads();
}

// ---- the stage plan ----------------------------------------------------------------------------------------

// One GEMV phase of this block: pairs [p0, p0 + np), stages of ps pairs x nc k chunks of kl elements.
struct LyPhase {
    const unsigned char* w;  // layer 0's matrix, rows k elements of `size` bytes
    size_t lstride;          // bytes from one layer's matrix to the next
    int k, p0, np, ps, nc, kl, nstages;
};

__device__ __forceinline__ LyPhase ly_phase(const void* w, int npairs, int k, int size) {
    LyPhase P;
    P.w = reinterpret_cast<const unsigned char*>(w);
    P.lstride = (size_t)2 * npairs * k * size;
    P.k = k;
    const int G = gridDim.x, b = blockIdx.x;
    P.p0 = (int)((long long)npairs * b / G);
    P.np = (int)((long long)npairs * (b + 1) / G) - P.p0;
    const int pair_bytes = 2 * k * size;
    P.ps = max(1, min(LY_MAX_PAIRS, LY_SLOT / pair_bytes));
    const int kmax = (LY_SLOT / (2 * size)) & ~7;  // elements of one row chunk when a stage is one pair
    P.nc = P.ps == 1 ? (k + kmax - 1) / kmax : 1;
    P.kl = ((k + P.nc - 1) / P.nc + 7) & ~7;
    P.nstages = (P.np + P.ps - 1) / P.ps * P.nc;
    return P;
}

// Stage s's place in its phase: first pair pa, pairs pn, k chunk c (elements kc0 .. kc0 + kn).
struct LyStage {
    int ph, pa, pn, c, kc0, kn;
};

__device__ __forceinline__ LyStage ly_stage(const LyPhase* phases, int s) {
    LyStage t;
    t.ph = 0;
    while (t.ph < 3 && s >= phases[t.ph].nstages) s -= phases[t.ph++].nstages;
    const LyPhase& P = phases[t.ph];
    const int grp = s / P.nc;
    t.c = s - grp * P.nc;
    t.pa = P.p0 + grp * P.ps;
    t.pn = min(P.ps, P.p0 + P.np - t.pa);
    t.kc0 = t.c * P.kl;
    t.kn = min(P.kl, P.k - t.kc0);
    return t;
}

// Stage i of a layer as a table entry (16 B): what ly_stage works out (a chain of divisions and shared loads;
// ~0.8 us for one thread on an H100, inferred from the block trace: the issuing lane's stall, once a stage),
// read back with one load, and the weight rows of its pairs (row[2 j + e]: pair j's row e).
struct __align__(16) LyRec {
    unsigned short info, pa, kc0, kn;  // info: ph | pn << 2 | c << 4
    unsigned short row[2 * LY_MAX_PAIRS];
};

// The jobs of the four phases (kernels/llama_fused.cu), and the weight rows of a pair in phase ph. K: the KV
// cache's element type (the weight type).
template <typename K>
struct LyJobs {
    QkvJob<K> qkv;
    RowsJob<true> o;
    SwigluJob gate_up;
    RowsJob<true> down;
    __device__ __forceinline__ void rows(int ph, int g, int& r0, int& r1) const {
        if (ph == 0)
            qkv.rows(g, r0, r1);
        else if (ph == 1)
            o.rows(g, r0, r1);
        else if (ph == 2)
            gate_up.rows(g, r0, r1);
        else
            down.rows(g, r0, r1);
    }
};

// ---- the shared-memory layout (dynamic) ---------------------------------------------------------------------
// [ring nslot x LY_SLOT][full barriers LY_MAX_SLOTS x 8 B][slot counters LY_MAX_SLOTS x 4 B][phases 4 x LyPhase]
// [misc 64 B][stage table LY_TABLE x 16 B][parts LY_MAX_CELLS floats][xs xs_floats floats (norm weights in its tail)]
#define LY_HEAD (LY_MAX_SLOTS * 8 + LY_MAX_SLOTS * 4 + 4 * 64 + 64 + 112 * 16)  // room for LY_TABLE <= 112

// xs holds x (hidden or qdim floats), attention's scratch, or act (ffn floats); the two RMSNorm weights sit in
// its tail (from ly_norm_off, 16-byte aligned), which only phase D's act overwrites.
__device__ __forceinline__ int ly_norm_off(int hidden, int qdim) {
    const int attn = ATTN_UNROLL * LY_BLOCK + 4 * LY_BLOCK;  // attn_span's scores and p.V partials
    return (max(max(hidden, qdim), attn) + 3) & ~3;
}

__device__ __forceinline__ int ly_xs_floats(int hidden, int ffn, int qdim, int size) {
    return max(ffn, ly_norm_off(hidden, qdim) + (2 * hidden * size + 15) / 16 * 4);
}

struct LyRing {
    unsigned char* slots;
    unsigned long long* full;
    int* done;
    LyPhase* phases;
    LyRec* table;  // stages 0 .. table_n - 1 of a layer (with LY_TABLE > 0)
    float* misc;
    float* parts;
    float* xs;
    int nslot, per_layer, total, norm_off;  // stages: one layer's, all layers' (stage s is layer s / per_layer's)
    int table_n;  // stages of a layer in the table (0 where a row, pair or k does not fit its 16 bits)
};

template <typename T>
struct LyLayer {
    LyJobs<T> jobs;
    LyRing ring;

    // Stage i of a layer (0 <= i < per_layer): from the table, else worked out; with `rows`, its weight rows too
    __device__ __forceinline__ LyStage stage_at(int i, int* rows) const {
        LyStage t;
        if (LY_TABLE > 0 && i < ring.table_n) {
            const LyRec r = ring.table[i];
            t.ph = r.info & 3;
            t.pn = (r.info >> 2) & 3;
            t.c = r.info >> 4;
            t.pa = r.pa;
            t.kc0 = r.kc0;
            t.kn = r.kn;
            if (rows != nullptr)
#pragma unroll
                for (int e = 0; e < 2 * LY_MAX_PAIRS; ++e) rows[e] = r.row[e];
            return t;
        }
        t = ly_stage(ring.phases, i);
        if (rows != nullptr)
#pragma unroll
            for (int j = 0; j < LY_MAX_PAIRS; ++j)
                if (j < t.pn) jobs.rows(t.ph, t.pa + j, rows[2 * j], rows[2 * j + 1]);
        return t;
    }

    // The table: every thread a share of the entries (before any stage is issued or read)
    __device__ __forceinline__ void fill_table() const {
        for (int i = threadIdx.x; LY_TABLE > 0 && i < ring.table_n; i += blockDim.x) {
            const LyStage t = ly_stage(ring.phases, i);
            LyRec r;
            r.info = (unsigned short)(t.ph | t.pn << 2 | t.c << 4);
            r.pa = (unsigned short)t.pa;
            r.kc0 = (unsigned short)t.kc0;
            r.kn = (unsigned short)t.kn;
#pragma unroll
            for (int j = 0; j < LY_MAX_PAIRS; ++j) {  // unrolled: r stays in registers
                int r0 = 0, r1 = 0;
                if (j < t.pn) jobs.rows(t.ph, t.pa + j, r0, r1);
                r.row[2 * j] = (unsigned short)r0;
                r.row[2 * j + 1] = (unsigned short)r1;
            }
            ring.table[i] = r;
        }
    }

    // Stage s's weight rows (s < ring.total): first `all(bytes)` with the stage's bytes, then `row(offset in the
    // slot, source, bytes)` for each of its rows.
    template <typename All, typename Row>
    __device__ __forceinline__ void stage_rows(int s, All&& all, Row&& row) const {
        const int layer = s / ring.per_layer;
#if LY_TABLE > 0  // (stage_at alone for both would do, but changes the GPU-tested default's registers: the
                  // LY_X_INFLIGHT 8 build then spills)
        int r[2 * LY_MAX_PAIRS];
        const LyStage t = stage_at(s - layer * ring.per_layer, r);
#else
        const LyStage t = ly_stage(ring.phases, s - layer * ring.per_layer);
#endif
        const LyPhase& P = ring.phases[t.ph];
        const unsigned char* w = P.w + (size_t)layer * P.lstride;
        const unsigned int row_bytes = (unsigned int)t.kn * sizeof(T);
        all(2u * (unsigned int)t.pn * row_bytes);
#if LY_TABLE > 0
#pragma unroll
        for (int j = 0; j < 2 * LY_MAX_PAIRS; ++j)  // unrolled: r stays in registers
            if (j < 2 * t.pn)
                row((size_t)j * P.kl * sizeof(T), w + ((size_t)r[j] * P.k + t.kc0) * sizeof(T), row_bytes);
#else
        for (int j = 0; j < t.pn; ++j) {
            int rr[2];
            jobs.rows(t.ph, t.pa + j, rr[0], rr[1]);
#pragma unroll
            for (int e = 0; e < 2; ++e)
                row((size_t)(2 * j + e) * P.kl * sizeof(T), w + ((size_t)rr[e] * P.k + t.kc0) * sizeof(T), row_bytes);
        }
#endif
    }

    // Stage s -> slot s % nslot: the expected bytes, then one bulk copy per row (one thread). With LY_L2_AHEAD,
    // stage s + LY_L2_AHEAD's rows are asked into L2 as well (its slot copy is issued LY_L2_AHEAD - nslot stages
    // later and then reads L2), so a ring stalled by attention or a barrier still keeps DRAM busy.
    __device__ __forceinline__ void issue(int s) const {
#if LY_TMA
        if (s >= ring.total) return;
        const int slot = s % ring.nslot;
        unsigned char* dst = ring.slots + (size_t)slot * LY_SLOT;
        unsigned long long* bar = ring.full + slot;
        stage_rows(
            s, [&](unsigned int bytes) { ly_bar_expect(bar, bytes); },
            [&](size_t off, const unsigned char* src, unsigned int bytes) {
                ly_bulk_copy(dst + off, src, bytes, bar);
            });
        if (LY_L2_AHEAD > 0 && s + LY_L2_AHEAD < ring.total)
            stage_rows(
                s + LY_L2_AHEAD, [](unsigned int) {},
                [](size_t, const unsigned char* src, unsigned int bytes) { ly_prefetch_l2(src, bytes); });
#endif
    }

    // This warp is done with stage s: the last warp of its group to say so refills the slot with stage s + nslot.
    __device__ __forceinline__ void release(int s) const {
#if LY_TMA
        __syncwarp();
        if (threadIdx.x % 32 == 0) {
            __threadfence_block();  // this warp's reads of the slot are done before it counts
            const int slot = s % ring.nslot;
            if (atomicAdd(ring.done + slot, 1) == LY_GROUP_WARPS - 1) {
                ring.done[slot] = 0;
                if (LY_PROXY_FENCE) asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
                issue(s + ring.nslot);
            }
        }
#endif
    }

    // Phase ph of layer `layer` (stages s .. s + nstages - 1): the dot products of this block's pairs against x in
    // shared memory, then one thread per pair adds the parts and runs the epilogue. Warp group g takes the stages with
    // s % LY_GROUPS == g (nslot is a multiple of LY_GROUPS, so a slot always serves one group and its waits see
    // each use's phase in order); its warp gw takes part gw of the stage's k chunk for every row of the stage, so
    // each x element is read from shared memory once per stage (not once per row), and writes one cell per (row,
    // k chunk, part), once.
    template <typename Job>
    __device__ __forceinline__ int gemv(int layer, int ph, int s, const Job& job, float scale_rms) const {
        constexpr int VEC = WeightPack<T>::VEC, RMAX = 2 * LY_MAX_PAIRS;
        const LyPhase& P = ring.phases[ph];
        const int base = layer * ring.per_layer;
        const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
        const int group = warp / LY_GROUP_WARPS, gw = warp - group * LY_GROUP_WARPS;
        const int s_end = s + P.nstages;
        const float4* xs4 = reinterpret_cast<const float4*>(ring.xs);
        for (int si = s + (group - s % LY_GROUPS + LY_GROUPS) % LY_GROUPS; si < s_end; si += LY_GROUPS) {
            const LyStage t = stage_at(si - base, nullptr);
            const int rows = 2 * t.pn;
            const uint4* wrow[RMAX];
#pragma unroll
            for (int r = 0; r < RMAX; ++r) {
#if LY_TMA
                wrow[r] = reinterpret_cast<const uint4*>(ring.slots + (size_t)(si % ring.nslot) * LY_SLOT +
                                                         (size_t)min(r, rows - 1) * P.kl * sizeof(T));
#else
                int rr[2];
                jobs.rows(ph, t.pa + min(r, rows - 1) / 2, rr[0], rr[1]);
                wrow[r] = reinterpret_cast<const uint4*>(P.w + (size_t)layer * P.lstride +
                                                         ((size_t)rr[r & 1] * P.k + t.kc0) * sizeof(T));
#endif
            }
#if LY_TMA
            ly_bar_wait(ring.full + si % ring.nslot, (unsigned int)(si / ring.nslot) & 1u);
#endif
            const int packs = t.kn / VEC, per = (packs + LY_GROUP_WARPS - 1) / LY_GROUP_WARPS;
            const int pk0 = gw * per, pk1 = min(packs, pk0 + per);
            // x of this chunk: f16/bf16 weights read x as two planes of float4s (elements 8p..8p+3 and
            // 8p+4..8p+7 of pack p, see put_x), so a warp's 16-byte loads are contiguous
            const float4* xa = VEC == 8 ? xs4 + t.kc0 / 8 : xs4 + t.kc0 / 4;
            const float4* xb = xs4 + P.k / 8 + t.kc0 / 8;
            float acc[RMAX];
#pragma unroll
            for (int r = 0; r < RMAX; ++r) acc[r] = 0.0f;
            for (int p = pk0 + lane; p < (LY_DIAG == 1 ? pk0 : pk1); p += 32) {
                float xv[VEC];
                const float4 a = xa[p];
                xv[0] = a.x;
                xv[1] = a.y;
                xv[2] = a.z;
                xv[3] = a.w;
                if constexpr (VEC == 8) {
                    const float4 b = xb[p];
                    xv[4] = b.x;
                    xv[5] = b.y;
                    xv[6] = b.z;
                    xv[7] = b.w;
                }
#pragma unroll
                for (int r = 0; r < RMAX; ++r) {
                    if (r < rows) {
                        float f[VEC];
#if LY_TMA
                        WeightPack<T>::unpack(wrow[r][p], f);
#else
                        WeightPack<T>::unpack(db_ldg(wrow[r] + p), f);
#endif
#pragma unroll
                        for (int e = 0; e < VEC; ++e) acc[r] = fmaf(f[e], xv[e], acc[r]);
                    }
                }
            }
#pragma unroll
            for (int r = 0; r < RMAX; ++r) {
                if (r < rows) {
                    const float sum = db_warp_sum(acc[r]);
                    if (lane == 0)
                        ring.parts[((2 * (t.pa - P.p0) + r) * P.nc + t.c) * LY_GROUP_WARPS + gw] = sum;
                }
            }
            release(si);
        }
        __syncthreads();  // every cell of every pair is in ring.parts
        if ((LY_MARKS == 2 && ph == 0) || (LY_MARKS == 3 && ph == 2)) DB_TRACE_MARK(2);
        const int ncell = P.nc * LY_GROUP_WARPS;
        for (int j = threadIdx.x; j < P.np; j += blockDim.x) {
            float y[2];
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const float* cell = ring.parts + (2 * j + e) * ncell;
                float v = cell[0];
                for (int c = 1; c < ncell; ++c) v += cell[c];
                y[e] = v * scale_rms;
            }
            const int g = P.p0 + j;
            job.epi(g, 0, y[0], y[1], job.pre(g, 0));
        }
        return s_end;
    }

    // x's float4 number f (elements 4f..4f+3) of a k-wide vector into xs, in the layout gemv reads: f16/bf16
    // weights (8 per pack) two planes, even float4s then odd ones; f32 weights in order
    __device__ __forceinline__ void put_x(int f, int k, const float4& v) const {
        float4* xs4 = reinterpret_cast<float4*>(ring.xs);
        if constexpr (WeightPack<T>::VEC == 8)
            xs4[(f & 1) * (k / 8) + (f >> 1)] = v;
        else
            xs4[f] = v;
    }

    // f(e, v[4e .. 4e + 3]) for this thread's float4s of v[:k] (produced by this grid: read through L2), with
    // LY_X_INFLIGHT loads per thread in flight before any is used
    template <typename F>
    __device__ __forceinline__ void each_float4(const float* v, int k, F&& f) const {
        const float4* v4 = reinterpret_cast<const float4*>(v);
        const int k4 = k / 4, nt = blockDim.x;
        for (int e0 = threadIdx.x; e0 < k4; e0 += LY_X_INFLIGHT * nt) {
            float4 t[LY_X_INFLIGHT];
#pragma unroll
            for (int j = 0; j < LY_X_INFLIGHT; ++j)
                if (e0 + j * nt < k4) t[j] = db_ldcg(v4 + e0 + j * nt);
#pragma unroll
            for (int j = 0; j < LY_X_INFLIGHT; ++j)
                if (e0 + j * nt < k4) f(e0 + j * nt, t[j]);
        }
    }

    // xs = x[0, :k] * norm (f32; the norm weight from its copy in xs's tail at `noff` floats), and the RMS scale
    // rsqrt(mean(x^2) + eps) (a block sum in a fixed order)
    __device__ __forceinline__ float stage_norm(const float* x, int noff, int k, float eps) const {
        const T* g = reinterpret_cast<const T*>(ring.xs + noff);
        float ss = 0.0f;
        each_float4(x, k, [&](int e, const float4& v) {
            ss = fmaf(v.x, v.x, ss);
            ss = fmaf(v.y, v.y, ss);
            ss = fmaf(v.z, v.z, ss);
            ss = fmaf(v.w, v.w, ss);
            put_x(e, k, make_float4(v.x * to_float(g[4 * e]), v.y * to_float(g[4 * e + 1]),
                                    v.z * to_float(g[4 * e + 2]), v.w * to_float(g[4 * e + 3])));
        });
        const float total = db_block_sum(ss, ring.misc);  // its barriers also publish xs
        return rsqrtf(total / (float)k + eps);
    }

    // xs = v[:k] (f32, produced by this grid)
    __device__ __forceinline__ void stage_copy(const float* v, int k) const {
        each_float4(v, k, [&](int e, const float4& t) { put_x(e, k, t); });
        __syncthreads();
    }

    // xs[:heads * hd] = the attention output, combined from the nsplit partials of each head: every (m, l) into
    // shared memory (ring.parts, free between phases) in one round trip, then the o partials of LY_X_INFLIGHT
    // splits per round trip.
    __device__ __forceinline__ void stage_attention(const float* part_o, const float* part_ml, int heads, int hd,
                                                    int nsplit, int max_splits) const {
        const int nt = blockDim.x, hd4 = hd / 4;
        float* sml = ring.parts;
        for (int e = threadIdx.x; e < heads * nsplit * 2; e += nt) {
            const int h = e / (2 * nsplit), r = e - h * 2 * nsplit;
            sml[e] = db_ldcg(part_ml + (size_t)h * max_splits * 2 + r);
        }
        __syncthreads();
        const float4* po4 = reinterpret_cast<const float4*>(part_o);
        for (int e = threadIdx.x; e < heads * hd4; e += nt) {
            const int h = e / hd4, d4 = e - h * hd4;
            const float* ml = sml + h * nsplit * 2;
            float M = NEG_INF;
            for (int t = 0; t < nsplit; ++t) M = fmaxf(M, ml[2 * t]);
            float4 num = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            float den = 0.0f;
            for (int t0 = 0; t0 < nsplit; t0 += LY_X_INFLIGHT) {
                float4 v[LY_X_INFLIGHT];
#pragma unroll
                for (int u = 0; u < LY_X_INFLIGHT; ++u)
                    if (t0 + u < nsplit) v[u] = db_ldcg(po4 + ((size_t)h * max_splits + t0 + u) * hd4 + d4);
#pragma unroll
                for (int u = 0; u < LY_X_INFLIGHT; ++u) {
                    if (t0 + u < nsplit) {
                        const float w = expf(ml[2 * (t0 + u)] - M);
                        num.x = fmaf(w, v[u].x, num.x);
                        num.y = fmaf(w, v[u].y, num.y);
                        num.z = fmaf(w, v[u].z, num.z);
                        num.w = fmaf(w, v[u].w, num.w);
                        den = fmaf(w, ml[2 * (t0 + u) + 1], den);
                    }
                }
            }
            put_x(e, heads * hd, nsplit > 0 ? make_float4(num.x / den, num.y / den, num.z / den, num.w / den)
                                            : make_float4(0.0f, 0.0f, 0.0f, 0.0f));
        }
        __syncthreads();
    }
};

// The layers [0, layers) of the stack, one after the other, in one grid: layer l's weights, norms, KV cache (of T,
// as the weights), bias and arrival counters are layer 0's plus l strides (the matrices' from their shapes, the
// cache's kv_stride elements, the bias's nqkv * head_dim floats, the counters' 5 ints). The ring's stage numbers
// run on across the layers, so the next layer's weights stream in while this one waits on its attention and its
// barriers.
template <typename T>
__device__ __forceinline__ void decode_layer_impl(const T* wqkv, const T* attn_norm, const T* wo, const T* mlp_norm,
                                                  const T* w_gate_up, const T* w_down, float* x, float* q,
                                                  T* k_cache, T* v_cache, const int* pos, const float* bias,
                                                  const float* inv_freq, float* part_o, float* part_ml, float* act,
                                                  int* sync, int hidden, int heads, int kv_heads, int head_dim,
                                                  int ffn, int max_seq, int chunk, int max_splits, float eps,
                                                  float scale, int layers, long long kv_stride) {
    extern __shared__ __align__(128) unsigned char ly_smem[];
    DB_TRACE_BLOCK();
    if (LY_TRIGGER == 0) PDL_LAUNCH_DEPENDENTS();  // the next layer's blocks may take the other half of each SM
    const int tid = threadIdx.x, G = gridDim.x;
    const int qdim = heads * head_dim, nqkv = heads + 2 * kv_heads;
    const int xs_floats = ly_xs_floats(hidden, ffn, qdim, sizeof(T));
    const unsigned int fixed = LY_HEAD + LY_MAX_CELLS * 4 + (unsigned int)xs_floats * 4u;
    const int qkv_pairs = nqkv * (head_dim / 2);
    // layer l's QKV epilogue: its KV cache and bias (the rows of a pair, which the ring's issue() asks every job
    // for, do not depend on the layer)
    auto qkv_job = [&](int l) {
        return QkvJob<T>{q,        k_cache + (size_t)l * kv_stride, v_cache + (size_t)l * kv_stride, pos,
                         bias + (size_t)l * nqkv * head_dim, inv_freq, heads, kv_heads, head_dim, max_seq, qkv_pairs};
    };
    LyLayer<T> L;
    L.jobs.qkv = qkv_job(0);
    L.jobs.o = RowsJob<true>{x, hidden, hidden / 2};
    L.jobs.gate_up = SwigluJob{act, ffn, ffn};
    L.jobs.down = RowsJob<true>{x, hidden, hidden / 2};
    const unsigned int dyn = db_dynamic_smem();
    L.ring.nslot =
        LY_TMA && dyn >= fixed ? min(LY_MAX_SLOTS, (int)((dyn - fixed) / LY_SLOT)) / LY_GROUPS * LY_GROUPS : 0;
    if ((LY_TMA && L.ring.nslot < LY_GROUPS) || (!LY_TMA && dyn < fixed)) DB_TRAP();  // the spec checks this first
    unsigned char* head = ly_smem + (size_t)L.ring.nslot * LY_SLOT;
    L.ring.slots = ly_smem;
    L.ring.full = reinterpret_cast<unsigned long long*>(head);
    L.ring.done = reinterpret_cast<int*>(head + LY_MAX_SLOTS * 8);
    L.ring.phases = reinterpret_cast<LyPhase*>(head + LY_MAX_SLOTS * 12);
    L.ring.misc = reinterpret_cast<float*>(head + LY_MAX_SLOTS * 12 + 4 * 64);
    L.ring.table = reinterpret_cast<LyRec*>(head + LY_MAX_SLOTS * 12 + 4 * 64 + 64);
    L.ring.parts = reinterpret_cast<float*>(head + LY_HEAD);
    L.ring.xs = L.ring.parts + LY_MAX_CELLS;
    L.ring.norm_off = ly_norm_off(hidden, qdim);
    if (tid == 0) {
        L.ring.phases[0] = ly_phase(wqkv, qkv_pairs, hidden, sizeof(T));
        L.ring.phases[1] = ly_phase(wo, L.jobs.o.npairs, qdim, sizeof(T));
        L.ring.phases[2] = ly_phase(w_gate_up, ffn, hidden, sizeof(T));
        L.ring.phases[3] = ly_phase(w_down, L.jobs.down.npairs, ffn, sizeof(T));
        for (int ph = 0; ph < 4; ++ph) {  // the spec checks rows; cells follow for its shapes
            const LyPhase& P = L.ring.phases[ph];
            if (2 * P.np > LY_MAX_ROWS || 2 * P.np * P.nc * LY_GROUP_WARPS > LY_MAX_CELLS) DB_TRAP();
        }
        for (int i = 0; i < LY_MAX_SLOTS; ++i) {
            ly_bar_init(L.ring.full + i);
            L.ring.done[i] = 0;
        }
        ly_bar_init_fence();
    }
    __syncthreads();
    L.ring.per_layer = 0;
    for (int ph = 0; ph < 4; ++ph) L.ring.per_layer += L.ring.phases[ph].nstages;
    L.ring.total = L.ring.per_layer * layers;
    L.ring.table_n = max(max(nqkv * head_dim, 2 * ffn), max(max(hidden, qdim), ffn)) < 65536
                         ? min(L.ring.per_layer, LY_TABLE) : 0;
    L.fill_table();
    __syncthreads();
    if (tid == 0) {  // weights only, before the wait: they stream while the previous kernel finishes
        for (int s = 0; s < L.ring.nslot; ++s) L.issue(s);
    }
    // layer l's two RMSNorm weights into xs's tail (16-byte copies; waited for before its phase A)
    const int n16 = hidden * (int)sizeof(T) / 16;
    auto load_norms = [&](int l) {
        uint4* dst = reinterpret_cast<uint4*>(L.ring.xs + L.ring.norm_off);
        const T* an = attn_norm + (size_t)l * hidden;
        const T* mn = mlp_norm + (size_t)l * hidden;
        for (int e = tid; e < 2 * n16; e += blockDim.x)
            db_cp_async16(dst + e, reinterpret_cast<const uint4*>(e < n16 ? an : mn) + (e % n16), true);
        db_cp_commit();
    };
    load_norms(0);
    PDL_WAIT();

    const int p = pos[0];
    const int len = min(p + 1, max_seq);
    const int nsplit = len > 0 ? max(1, min(min((len + chunk - 1) / chunk, max_splits), max(1, G / heads))) : 0;
    const int gnorm = hidden * (int)sizeof(T) / 4;  // floats between the two norm weights
    int s = 0;
    for (int l = 0; l < layers; ++l) {
        int* ctr = sync + 5 * l;  // A done, attention done, B done, C done, D done (the next layer's x)
        L.jobs.qkv = qkv_job(l);
        const T* kc = L.jobs.qkv.k_cache;  // layer l's cache, rounded to T by phase A's kv_store
        const T* vc = L.jobs.qkv.v_cache;

        // A: RMSNorm + QKV + RoPE + KV append
        db_cp_wait<0>();
        __syncthreads();  // the norm weights are in shared memory
        float r = L.stage_norm(x, L.ring.norm_off, hidden, eps);
        if (LY_MARKS == 2) DB_TRACE_MARK(1);
        s = L.gemv(l, 0, s, L.jobs.qkv, r);
        if (LY_MARKS == 0) DB_TRACE_MARK(1);
        ly_arrive(ctr + 0);

        // attention units (head, split) on blocks u % G; the others go on to wait for them
        if ((int)blockIdx.x < heads * nsplit) {
            ly_wait(ctr + 0, G);
            float* sp = L.ring.xs;
            float4* sacc = reinterpret_cast<float4*>(L.ring.xs + ATTN_UNROLL * LY_BLOCK);
            const int d4 = head_dim / 4;
            int lpk = 1;
            while (lpk < d4) lpk <<= 1;
            const int sc4 = tid % lpk;
            for (int u = blockIdx.x; u < heads * nsplit; u += G) {
                const int h = u / nsplit, t = u - h * nsplit;
                const int kvh = h / (heads / kv_heads);
                const size_t kv_base = (size_t)kvh * (size_t)max_seq * (size_t)head_dim;
                const float4 zero4 = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                const float4 qv =
                    sc4 < d4 ? db_ldcg(reinterpret_cast<const float4*>(q + (size_t)h * head_dim) + sc4) : zero4;
                typename Kv4<T>::raw kv[ATTN_UNROLL], vv[ATTN_UNROLL];
                float m, lsum;
                const float4 o = attn_span<T>(qv, kc + kv_base, vc + kv_base, d4, (int)((long long)len * t / nsplit),
                                              (int)((long long)len * (t + 1) / nsplit), scale, false, false, false,
                                              kv, vv, sp, sacc, m, lsum);
                const size_t row = (size_t)h * max_splits + t;
                if (tid < d4) reinterpret_cast<float4*>(part_o + row * head_dim)[tid] = o;
                if (tid == 0) {
                    part_ml[2 * row] = m;
                    part_ml[2 * row + 1] = lsum;
                }
                __syncthreads();  // sp and sacc are reused by the next unit
            }
        }
        ly_arrive(ctr + 1);
        ly_wait(ctr + 1, G);
        if (LY_MARKS == 0) DB_TRACE_MARK(2);

        // B: O projection + residual; its x is the attention output, combined from the partials here
        L.stage_attention(part_o, part_ml, heads, head_dim, nsplit, max_splits);
        s = L.gemv(l, 1, s, L.jobs.o, 1.0f);
        ly_arrive(ctr + 2);
        ly_wait(ctr + 2, G);
        if (LY_MARKS == 1) DB_TRACE_MARK(1);

        // C: RMSNorm + gate/up + SiLU * up
        if (LY_TRIGGER == 2 && l == layers - 1) PDL_LAUNCH_DEPENDENTS();
        r = L.stage_norm(x, L.ring.norm_off + gnorm, hidden, eps);
        if (LY_MARKS == 3) DB_TRACE_MARK(1);
        s = L.gemv(l, 2, s, L.jobs.gate_up, r);
        ly_arrive(ctr + 3);
        ly_wait(ctr + 3, G);
        if (LY_MARKS == 1) DB_TRACE_MARK(2);

        // D: down projection + residual
        if (LY_TRIGGER == 3 && l == layers - 1) PDL_LAUNCH_DEPENDENTS();
        L.stage_copy(act, ffn);
        s = L.gemv(l, 3, s, L.jobs.down, 1.0f);
        if (l + 1 < layers) {  // act is read (gemv's barrier): the next norms may overwrite xs's tail
            load_norms(l + 1);
            ly_arrive(ctr + 4);
            ly_wait(ctr + 4, G);  // every block's residual rows are in x
        }
    }
}

// decode_layer_<wt>: decode layers [0, layers) of a stack, batch 1.      grid [sms], block [256], dynamic shared
// memory ly_fixed + nslot * LY_SLOT bytes; see the top of this file. The KV cache is of the weight type wt. One
// layer a node (layers = 1) leaves room for the next layer's block on each SM (2..8 slots); the whole stack in
// one node takes one block a SM and a deeper ring (up to 12 slots at TinyLlama's shapes).
#define DEFINE_DECODE_LAYER(SUFFIX, T)                                                                       \
    extern "C" __global__ void __launch_bounds__(LY_BLOCK, 2) decode_layer_##SUFFIX(                        \
        const T* wqkv, const T* attn_norm, const T* wo, const T* mlp_norm, const T* w_gate_up,               \
        const T* w_down, float* x, float* q, T* k_cache, T* v_cache, const int* pos,                         \
        const float* bias, const float* inv_freq, float* part_o, float* part_ml, float* act, int* sync,      \
        int hidden, int heads, int kv_heads, int head_dim, int ffn, int max_seq, int chunk, int max_splits,  \
        float eps, float scale, int layers, long long kv_stride) {                                           \
        decode_layer_impl<T>(wqkv, attn_norm, wo, mlp_norm, w_gate_up, w_down, x, q, k_cache, v_cache, pos, \
                             bias, inv_freq, part_o, part_ml, act, sync, hidden, heads, kv_heads, head_dim,  \
                             ffn, max_seq, chunk, max_splits, eps, scale, layers, kv_stride);                \
    }
DEFINE_DECODE_LAYER(f32, float)
DEFINE_DECODE_LAYER(f16, db_f16)
DEFINE_DECODE_LAYER(bf16, db_bf16)
