"""The inference GEMM: pre-packed weights, a register-blocked AVX-512 tile, a fused epilogue.

    y[yr0 + r - r0, col0 + o] = act( sum_k a[r, k] * w[k, o] + b[o] )  (+ res[yr0 + r - r0, col0 + o])

for rows r0 <= r < r1 of a (M, K) and the output channels o of the column panels asked for.
Cost: 2*K FLOPs per output element; the epilogue is 2-4 FLOPs per element.

Why not BLAS: a pointwise conv in a mobile network is a small, skinny GEMM (3136x24 @ 24x144,
49x960 @ 960x160 at batch 1). OpenBLAS packs the whole weight matrix on every call and
reaches ~35% of a core's FMA peak on these shapes. Here the weights are packed once per
plan (`pack_panels`, redone only when they change), and one tile computes `mr` rows x 32
columns (mr <= MR = 12) with 2*mr 16-float accumulators held in registers for the whole
K loop: per k, two 16-float weight loads, mr broadcasts of a[r, k] and 2*mr vector FMAs.

Layout of the packed weights (`pack_panels`): w (K, O) cut into panels of NR = 32 columns,
each stored k-major (K, 32), the panels one after the other; the last panel is 16 columns
wide when 16 are enough, else 32, zero-padded. Panel p starts at p * 32 * K.

The tile (`tile_fma`) is written in LLVM IR (llvmlite) rather than Numba Python because
that is the only way to get what it needs from Numba: accumulators that stay in registers
across the k loop (in Python loops LLVM keeps them in memory, since it cannot prove the
output does not alias the inputs: ~7-40 GFLOP/s) and 512-bit vectors (LLVM's vectoriser
prefers 256-bit ones on these CPUs). The IR is plain `<16 x float>` loads and
`llvm.fma.v16f32`, so on a CPU without AVX-512 LLVM lowers it to two AVX2 halves (or SSE),
correct everywhere, fast where AVX-512 exists. Each output is one FMA chain over k in
order: results equal a float32 GEMM up to summation order (the tests compare at 1e-5).

Deliberately absent: packing of the activations (rows are read in place with stride K),
blocking over K (K <= a few thousand keeps a panel in L2), and a backward pass of its own
(training runs its float32 forward convs and stride-1 input gradients, a convolution of dy, on
these kernels; its weight gradients, long sums over the batch's pixels, on conv.py's BLAS GEMMs).

Shapes: a (M, K) C-contiguous rows; packed w 1-D (see above); b (O,); res, y (rows, >= col0 + O).
"""

import math

import numpy as np

from lightcnn._jit import kernel, lowlevel
from lightcnn.kernels.activation import (ACT_ELU, ACT_HARD_SWISH, ACT_NONE, ACT_RELU, ACT_RELU6, act_scalar,
                                         elu_scalar, hard_swish_scalar, relu6_scalar, relu_scalar)

__all__ = ["MR", "NR", "ALIGN_BYTES", "aligned_empty", "scratch", "prefetch_read", "prefetch_write", "pack_panels",
           "unpack_panels", "panel_count", "tile_fma", "tile_fma_store", "tile_conv_store", "gemm_rows", "conv_rows",
           "epilogue_in_ir", "bias_act_inplace", "bias_act_store", "epilogue_tile"]

MR = 12  # rows per tile: 2*MR accumulators + 2 weight vectors + 1 broadcast <= 32 zmm registers
NR = 32  # columns per panel (two 16-float vectors)
# tile_fma_store's k loop runs K_UNROLL steps a pass for tiles of at least UNROLL_MIN_ROWS rows (see counted_loop).
# One core, CPU time, loaded machine: SqueezeNet's classifier GEMM (1352 x 512 @ 512 x 1000) 129-135 -> 156-165
# GFLOP/s, MobileNetV2's batch-8 forward 59.7-63.4 -> 53.3-60.4 ms. Compile time +4 s (MobileNetV2 and SqueezeNet
# 1.1: 52 -> 56 s CPU), since each (rows, width) case of the tile is inlined twice; shorter tiles (the last of a
# GEMM) and the implicit-GEMM convs' k loops (conv_rows: +6 s more, no clear gain) stay single-step.
K_UNROLL = 4
UNROLL_MIN_ROWS = 8
CONV_CHUNK_ROWS = 20 * MR  # conv_rows' rows per pass of the panels
# gemm_rows' input rows per pass of the panels, in bytes: a quarter of one core's L2 (2 MB here), so the chunk
# stays there, beside the panel and the output tiles, while every panel passes over it. One pass over all rows
# re-read a larger input from L3 once per panel. One core, CPU time, loaded machine (bench/gemm_gflops.py
# --shapes squeezenet1_1): SqueezeNet's classifier at batch 8 (1352 x 512 floats, 2.7 MB, 32 panels) 115-131
# GFLOP/s unchunked, 130-141 in 512 KB chunks (256 KB and 1 MB were no better); MobileNetV2's batch-8 56x56
# expand (25088 x 24 floats) 73-78 -> 80-85. Smaller inputs are one chunk, as before.
GEMM_CHUNK_BYTES = 512 * 1024
# The epilogue's float32 ELU: expm1 on [-ln2/2, ln2/2] by Taylor terms up to r^ELU_DEGREE. 7 was enough for 1 ulp
# on 6 M values (the truncation is r^8/8! / r = 1.6e-8 relative, a quarter ulp); 8 leaves a margin for one FMA more.
ELU_DEGREE = 8
# Software prefetch in gemm_rows / conv_rows, PREFETCH_TILES tiles ahead of the one computing: the lines of y that
# tile will write, and (gemm_rows, first panel, K <= PREFETCH_READ_MAX_K) the rows of a it will read. At batch 8
# a Fire's input and output (6-12 MB) live in L3, and with short k loops (SqueezeNet's squeeze K = 64-128, its
# expand 1x1 K = 16-64) the tile waits on those lines: the hardware prefetcher does not follow 12 rows read or
# written a part at a time. One core, 8 images, caches flushed before each run: fire2's squeeze 0.74 -> 0.51 ms,
# its two expands 4.0 -> 3.6 ms. Longer rows are left to the hardware (K = 256: 192 prefetches a tile cost more
# than they saved, 0.61 -> 0.72 ms). Whole forward, batch 8, two threads, five alternating processes (medians):
# SqueezeNet 1.1 21.7 -> 20.6 ms, SqueezeNet 1.0 46.8 -> 45.9 ms (bench/README "Session 13").
# Only for arrays larger than PREFETCH_MIN_BYTES: the kernels' scratch buffers are sized to stay in L2, and there
# the prefetches only cost instructions (SqueezeNet 1.1's stem + pool, whose conv rows go to such a buffer:
# 5.0 -> 5.3 ms with them).
PREFETCH_TILES = 2
PREFETCH_READ_MAX_K = 128
PREFETCH_MIN_BYTES = 2 << 20


# Where the arrays the tiles read as vectors or write start: on a cache line, so a 16-float vector at a column
# that is a multiple of 16 is one line, not the ends of two. NumPy gives a large array 16 bytes past a page
# (glibc's mmap header) and Numba 32-byte alignment, so half or all of the tiles' vector accesses split over
# two lines. Whole forwards at batch 8 on two threads, three alternating pairs of processes: SqueezeNet 1.0
# 49.5 -> 45.8 ms, MobileNetV2 23.1 -> 21.2 ms (medians; bench/README "Session 13").
ALIGN_BYTES = 64


def aligned_empty(shape, dtype=np.float32):
    """np.empty(shape, dtype) whose first element starts on an ALIGN_BYTES boundary (a view of a slightly larger
    buffer)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64))
    raw = np.empty(n + ALIGN_BYTES // dtype.itemsize, dtype)
    skip = (-raw.ctypes.data) % ALIGN_BYTES // dtype.itemsize
    return raw[skip:skip + n].reshape(shape)


@kernel
def scratch(n, like):
    """aligned_empty inside kernels: n uninitialised elements of like's dtype, 1-D, the first on an ALIGN_BYTES
    boundary (reshape for more dimensions)."""
    raw = np.empty(n + ALIGN_BYTES // like.itemsize, like.dtype)
    skip = (ALIGN_BYTES - raw.ctypes.data % ALIGN_BYTES) % ALIGN_BYTES // like.itemsize
    return raw[skip:skip + n]


def panel_count(n_out):
    return -(-n_out // NR)


def pack_panels(w2d):
    """w (K, O) -> the packed 1-D layout above (float32)."""
    w2d = np.asarray(w2d, dtype=np.float32)
    k, n_out = w2d.shape
    n_panels = panel_count(n_out)
    last = n_out - (n_panels - 1) * NR
    last_width = 16 if last <= 16 else NR
    packed = aligned_empty(k * (NR * (n_panels - 1) + last_width))
    packed[:] = 0
    for p in range(n_panels):
        c0 = p * NR
        width = NR if p < n_panels - 1 else last_width
        cols = w2d[:, c0:c0 + width]
        panel = packed[p * NR * k:p * NR * k + k * width].reshape(k, width)
        panel[:, :cols.shape[1]] = cols
    return packed


def unpack_panels(packed, shape):
    """The inverse of pack_panels: packed (1-D) -> the float32 weight of `shape` (..., O), whose reshape to
    (K, O) was packed. Bit-identical to it (packing only copies, and pads with zeros)."""
    n_out = shape[-1]
    k = int(np.prod(shape[:-1], dtype=np.int64))
    w2d = np.empty((k, n_out), np.float32)
    for p in range(panel_count(n_out)):
        c0 = p * NR
        width = min(NR, n_out - c0)
        stored = NR if p < panel_count(n_out) - 1 else (16 if width <= 16 else NR)
        w2d[:, c0:c0 + width] = packed[c0 * k:c0 * k + k * stored].reshape(k, stored)[:, :width]
    return w2d.reshape(shape)


def _build_tiles(numba):
    """Both tile intrinsics (see tile_fma and tile_fma_store); built once, when numba loads."""
    from llvmlite import ir
    from numba.core import types
    from numba.extending import intrinsic

    i1, i32, i64, f32 = ir.IntType(1), ir.IntType(32), ir.IntType(64), ir.FloatType()
    vec = ir.VectorType(f32, 16)
    mask_t = ir.VectorType(i1, 16)
    lanes = ir.Constant(ir.VectorType(i32, 16), list(range(16)))
    zero = ir.Constant(vec, [0.0] * 16)
    six = ir.Constant(vec, [6.0] * 16)
    splat0 = ir.Constant(ir.VectorType(i32, 16), [0] * 16)

    def declare(module, name, ret, args):
        return module.globals.get(name) or ir.Function(module, ir.FunctionType(ret, args), name)

    def broadcast(builder, scalar, vtype=vec):
        u = ir.Constant(vtype, ir.Undefined)
        return builder.shuffle_vector(builder.insert_element(u, scalar, ir.Constant(i32, 0)), u, splat0)

    def vector_phis(builder, starts, block):
        """One <16 x float> phi per value in `starts`, each entered from `block` with that value."""
        phis = []
        for value in starts:
            phi = builder.phi(vec)
            phi.add_incoming(value, block)
            phis.append(phi)
        return phis

    def fma_step(builder, fma, w_row, a_values, accs, nv):
        """One k step of the tile: nv weight vectors from w_row, each of the mr scalars a_values broadcast
        and multiplied in; returns the new accumulators (row-major: row i, vector v at i * nv + v)."""
        wv = [builder.load(builder.bitcast(builder.gep(w_row, [ir.Constant(i64, 16 * v)]), vec.as_pointer()), align=4)
              for v in range(nv)]
        new = []
        for i, a_value in enumerate(a_values):
            av = broadcast(builder, a_value)
            new += [builder.call(fma, [av, wv[v], accs[i * nv + v]]) for v in range(nv)]
        return new

    def loop_results(builder, entry, last, new):
        """After a loop that may run zero times: zero from `entry`, the accumulators `new` from `last`."""
        results = vector_phis(builder, [zero] * len(new), entry)
        for phi, value in zip(results, new):
            phi.add_incoming(value, last)
        return results

    def counted_loop(builder, count, start_accs, step, tag, unroll_by=1):
        """The accumulators after accs = step(kk, accs) for kk = 0 .. count-1 (start_accs when count <= 0).

        unroll_by > 1: passes of unroll_by steps, then single steps for the rest. In a tile's k loop LLVM
        derives the addresses of the mr rows of a from the loop counter on every pass (~10 integer
        instructions beside the 2*mr FMAs); unrolled, it derives them once a pass and reaches the other
        steps' values by constant offsets."""
        entry = builder.block
        accs, k_start = start_accs, ir.Constant(i64, 0)
        if unroll_by > 1:
            body, mid = builder.append_basic_block(f"{tag}.unrolled"), builder.append_basic_block(f"{tag}.rest")
            unroll = ir.Constant(i64, unroll_by)
            builder.cbranch(builder.icmp_signed(">=", count, unroll), body, mid)
            builder.position_at_end(body)
            kk = builder.phi(i64)
            kk.add_incoming(k_start, entry)
            phis = vector_phis(builder, accs, entry)
            new = phis
            for j in range(unroll_by):
                new = step(builder.add(kk, ir.Constant(i64, j)), new)
            k_next = builder.add(kk, unroll)
            kk.add_incoming(k_next, body)
            for phi, value in zip(phis, new):
                phi.add_incoming(value, body)
            builder.cbranch(builder.icmp_signed("<=", builder.add(k_next, unroll), count), body, mid)
            builder.position_at_end(mid)
            k_start = builder.phi(i64)
            k_start.add_incoming(ir.Constant(i64, 0), entry)
            k_start.add_incoming(k_next, body)
            mid_accs = vector_phis(builder, accs, entry)
            for phi, value in zip(mid_accs, new):
                phi.add_incoming(value, body)
            accs, entry = mid_accs, mid

        loop = builder.append_basic_block(f"{tag}.loop")
        after = builder.append_basic_block(f"{tag}.after")
        builder.cbranch(builder.icmp_signed("<", k_start, count), loop, after)
        builder.position_at_end(loop)
        kk = builder.phi(i64)
        kk.add_incoming(k_start, entry)
        phis = vector_phis(builder, accs, entry)
        new = step(kk, phis)
        k_next = builder.add(kk, ir.Constant(i64, 1))
        kk.add_incoming(k_next, loop)
        for phi, value in zip(phis, new):
            phi.add_incoming(value, loop)
        builder.cbranch(builder.icmp_signed("<", k_next, count), loop, after)
        builder.position_at_end(after)
        results = vector_phis(builder, accs, entry)
        for phi, value in zip(results, new):
            phi.add_incoming(value, loop)
        return results

    def k_loop(builder, fma, a_ptr, lda, w_ptr, k, mr, nv, unroll_by=1):
        """The k loop of an mr x (16*nv) tile; returns the accumulators (zero when k <= 0)."""
        def step(kk, accs):
            w_row = builder.gep(w_ptr, [builder.mul(kk, ir.Constant(i64, 16 * nv))])
            a_values = [builder.load(builder.gep(a_ptr, [builder.add(builder.mul(ir.Constant(i64, i), lda), kk)]),
                                     align=4) for i in range(mr)]
            return fma_step(builder, fma, w_row, a_values, accs, nv)

        return counted_loop(builder, k, [zero] * (mr * nv), step, f"tile{mr}x{16 * nv}", unroll_by)

    def switch_cases(builder, mr_v, nr_v, emit):
        """emit(mr, nv) for the runtime (mr, nr): one inlined loop per case, all joined after."""
        done = builder.append_basic_block("tile.done")
        other = builder.append_basic_block("tile.none")
        key = builder.add(builder.mul(nr_v, ir.Constant(i64, 2)), mr_v)  # 32 + mr or 64 + mr
        switch = builder.switch(key, other)
        for nv in (1, 2):
            for m in range(1, MR + 1):
                case = builder.append_basic_block(f"tile.case{m}x{16 * nv}")
                switch.add_case(ir.Constant(i64, 32 * nv + m), case)
                builder.position_at_end(case)
                emit(m, nv)
                builder.branch(done)
        builder.position_at_end(other)
        builder.branch(done)
        builder.position_at_end(done)

    def arrays_and_ints(context, builder, signature, args, array_at, int_at):
        arrays = [context.make_array(signature.args[j])(context, builder, args[j]).data for j in array_at]
        ints = [context.cast(builder, args[j], signature.args[j], types.int64) for j in int_at]
        return arrays, ints

    three, sixth = ir.Constant(vec, [3.0] * 16), ir.Constant(vec, [float(np.float32(1.0 / 6.0))] * 16)

    def hard_swish(builder, u):
        """u * relu6(u + 3) / 6 on 16 float32 lanes, as (u * t) * float32(1/6). hard_swish_scalar computes it in
        float64 with a division: that costs two 8-lane float64 divisions per vector, which made the epilogue
        ~10% of a 14x14 expand GEMM (K = 112) and most of what the stem's GEMM costs beyond K = 27.
        The result is within 2 float32 ulps of hard_swish_scalar's (PyTorch's hardswish is float32 too)."""
        t = builder.fadd(u, three)
        t = builder.select(builder.fcmp_ordered("<", t, zero), zero, t)
        t = builder.select(builder.fcmp_ordered(">", t, six), six, t)
        return builder.fmul(builder.fmul(u, t), sixth)

    def fma_of(builder):
        return declare(builder.module, "llvm.fma.v16f32", vec, [vec, vec, vec])

    def splat(value):
        return ir.Constant(vec, [float(np.float32(value))] * 16)

    ln2_hi = 0.693145751953125  # 12 significant bits: k * ln2_hi is exact for the |k| <= 58 used here
    elu_consts = dict(floor=splat(-40.0), inv_ln2=splat(1.0 / math.log(2.0)), neg_ln2_hi=splat(-ln2_hi),
                      neg_ln2_lo=splat(-(math.log(2.0) - ln2_hi)), one=splat(1.0),
                      q=[splat(1.0 / math.factorial(j)) for j in range(ELU_DEGREE, 1, -1)])

    def elu(builder, u):
        """ELU (alpha = 1) on 16 float32 lanes: u if not u < 0 (so +-0 and NaN pass unchanged), else expm1(u),
        as expm1(u) = 2^k (expm1(r) + 1) - 1 with u = k ln 2 + r, |r| <= ln2 / 2, and expm1(r) = r + r^2 q(r)
        (q: Taylor to r^(ELU_DEGREE - 2) / ELU_DEGREE!). The float64 expm1_nonpositive that elu_scalar calls
        runs on 8 lanes with a 27-step dependency chain: ELU was 100 of seed 001's 850 ms training step.
        Within 1 float32 ulp of math.expm1 rounded (tests/test_kernels_gemm.py); PyTorch's expm1 is float32 too.

        A call to one function per module, never inlined: written out at each of the tiles' 24 (rows, width)
        cases in every kernel that inlines a tile, it made compiling MobileNetV2 and SqueezeNet 1.1 59 -> 79 s."""
        fn = builder.module.globals.get("lightcnn_elu_v16")
        if fn is None:
            fn = ir.Function(builder.module, ir.FunctionType(vec, [vec]), "lightcnn_elu_v16")
            fn.linkage = "internal"
            fn.attributes.add("noinline")
            _elu_body(ir.IRBuilder(fn.append_basic_block("entry")), fn.args[0])
        return builder.call(fn, [u])

    def _elu_body(builder, u):
        c = elu_consts
        fma = fma_of(builder)
        rint = declare(builder.module, "llvm.rint.v16f32", vec, [vec])
        t = builder.select(builder.fcmp_ordered("<", u, zero), u, zero)  # NaN -> 0 here: no NaN reaches fptosi
        t = builder.select(builder.fcmp_ordered("<", t, c["floor"]), c["floor"], t)  # expm1(-40) = -1 in float32
        kf = builder.call(rint, [builder.fmul(t, c["inv_ln2"])])
        r = builder.call(fma, [kf, c["neg_ln2_hi"], t])
        r = builder.call(fma, [kf, c["neg_ln2_lo"], r])
        q = c["q"][0]
        for coefficient in c["q"][1:]:
            q = builder.call(fma, [q, r, coefficient])
        e = builder.call(fma, [builder.fmul(r, r), q, r])
        k = builder.fptosi(kf, ir.VectorType(i32, 16))
        bits = builder.shl(builder.add(k, ir.Constant(ir.VectorType(i32, 16), [127] * 16)),
                           ir.Constant(ir.VectorType(i32, 16), [23] * 16))
        s = builder.bitcast(bits, vec)  # 2^k, k in [-58, 0]: a normal float32
        em1 = builder.call(fma, [s, e, builder.fsub(s, c["one"])])  # s - 1 is exact for k >= -24
        builder.ret(builder.select(builder.fcmp_ordered("<", u, zero), em1, u))

    @intrinsic
    def tile_fma(typingctx, a, a_off, lda, w, w_off, k, mr, nr, acc):
        sig = types.void(a, a_off, lda, w, w_off, k, mr, nr, acc)

        def codegen(context, builder, signature, args):
            (a_data, w_data, acc_ptr), (a_off_v, lda_v, w_off_v, k_v, mr_v, nr_v) = arrays_and_ints(
                context, builder, signature, args, (0, 3, 8), (1, 2, 4, 5, 6, 7))
            a_ptr, w_ptr, fma = builder.gep(a_data, [a_off_v]), builder.gep(w_data, [w_off_v]), fma_of(builder)

            def emit(m, nv):
                for t, value in enumerate(k_loop(builder, fma, a_ptr, lda_v, w_ptr, k_v, m, nv)):
                    i, v = divmod(t, nv)
                    dst = builder.gep(acc_ptr, [ir.Constant(i64, i * NR + 16 * v)])
                    builder.store(value, builder.bitcast(dst, vec.as_pointer()), align=4)

            switch_cases(builder, mr_v, nr_v, emit)
            return context.get_dummy_value()

        return sig, codegen

    def store_epilogue(context, builder, signature, args, at):
        """The epilogue of tile_fma_store / tile_conv_store: returns emit(results, m, nvec), which
        stores act(results + b) (+ res) into y. `at` = the argument positions of (b, nv, act, res,
        res_off, ldres, use_res, y, y_off, ldy)."""
        (b_data, res_data, y_data), ints = arrays_and_ints(context, builder, signature, args,
                                                           (at[0], at[3], at[7]), (at[1], at[2], at[4], at[5], at[9]))
        nv_v, act_v, res_off_v, ldres_v, ldy_v = ints
        use_res_v = builder.icmp_unsigned("!=", context.cast(builder, args[at[6]], signature.args[at[6]], types.int64),
                                          ir.Constant(i64, 0))
        y_off_v = context.cast(builder, args[at[8]], signature.args[at[8]], types.int64)
        mload = declare(builder.module, "llvm.masked.load.v16f32.p0", vec, [vec.as_pointer(), i32, mask_t, vec])
        mstore = declare(builder.module, "llvm.masked.store.v16f32.p0", ir.VoidType(),
                         [vec, vec.as_pointer(), i32, mask_t])
        # ACT_RELU (1) and ACT_RELU6 (2) clamp at 0, ACT_RELU6 also at 6: selects in the order
        # of relu_scalar / relu6_scalar, so NaN passes through as there.
        clamp0 = broadcast(builder, builder.or_(builder.icmp_signed("==", act_v, ir.Constant(i64, ACT_RELU)),
                                                builder.icmp_signed("==", act_v, ir.Constant(i64, ACT_RELU6))),
                           mask_t)
        clamp6 = broadcast(builder, builder.icmp_signed("==", act_v, ir.Constant(i64, ACT_RELU6)), mask_t)
        swish = builder.icmp_signed("==", act_v, ir.Constant(i64, ACT_HARD_SWISH))
        elu_on = builder.icmp_signed("==", act_v, ir.Constant(i64, ACT_ELU))

        def vptr(base, offset):
            return builder.bitcast(builder.gep(base, [offset]), vec.as_pointer())

        def emit(results, m, nvec):
            masks, biases = [], []
            for v in range(nvec):
                left = builder.trunc(builder.sub(nv_v, ir.Constant(i64, 16 * v)), i32)
                mask = builder.icmp_signed("<", lanes, broadcast(builder, left, ir.VectorType(i32, 16)))
                masks.append(mask)
                biases.append(builder.call(mload, [vptr(b_data, ir.Constant(i64, 16 * v)), ir.Constant(i32, 4),
                                                   mask, zero]))

            def store_all(kind):
                for t, value in enumerate(results):
                    i, v = divmod(t, nvec)
                    u = builder.fadd(value, biases[v])
                    if kind == "swish":
                        u = hard_swish(builder, u)
                    elif kind == "elu":
                        u = elu(builder, u)
                    else:
                        u = builder.select(builder.and_(clamp0, builder.fcmp_ordered("<", u, zero)), zero, u)
                        u = builder.select(builder.and_(clamp6, builder.fcmp_ordered(">", u, six)), six, u)
                    col = ir.Constant(i64, 16 * v)
                    row_res = builder.add(res_off_v, builder.mul(ir.Constant(i64, i), ldres_v))
                    r = builder.call(mload, [vptr(res_data, builder.add(row_res, col)), ir.Constant(i32, 4),
                                             builder.and_(masks[v], broadcast(builder, use_res_v, mask_t)), zero])
                    u = builder.fadd(u, r)
                    row_y = builder.add(y_off_v, builder.mul(ir.Constant(i64, i), ldy_v))
                    builder.call(mstore, [u, vptr(y_data, builder.add(row_y, col)), ir.Constant(i32, 4), masks[v]])

            # hard-swish and ELU each on their own path, so the ReLU/none tiles never pay for them
            with builder.if_else(swish) as (then, otherwise):
                with then:
                    store_all("swish")
                with otherwise:
                    with builder.if_else(elu_on) as (then_elu, clamps):
                        with then_elu:
                            store_all("elu")
                        with clamps:
                            store_all("clamps")

        return emit

    @intrinsic
    def tile_fma_store(typingctx, a, a_off, lda, w, w_off, k, mr, nr, b, nv, act, res, res_off, ldres, use_res, y,
                       y_off, ldy):
        sig = types.void(a, a_off, lda, w, w_off, k, mr, nr, b, nv, act, res, res_off, ldres, use_res, y, y_off, ldy)

        def codegen(context, builder, signature, args):
            (a_data, w_data), (a_off_v, lda_v, w_off_v, k_v, mr_v, nr_v) = arrays_and_ints(
                context, builder, signature, args, (0, 3), (1, 2, 4, 5, 6, 7))
            a_ptr, w_ptr, fma = builder.gep(a_data, [a_off_v]), builder.gep(w_data, [w_off_v]), fma_of(builder)
            store = store_epilogue(context, builder, signature, args, range(8, 18))

            def emit(m, nvec):
                unroll_by = K_UNROLL if m >= UNROLL_MIN_ROWS else 1
                store(k_loop(builder, fma, a_ptr, lda_v, w_ptr, k_v, m, nvec, unroll_by), m, nvec)

            switch_cases(builder, mr_v, nr_v, emit)
            return context.get_dummy_value()

        return sig, codegen

    def k_loop_segments(builder, fma, a_ptr, rows_ptr, segs_ptr, n_seg, seg_len, w_ptr, mr, nv):
        """The k loop of an mr x (16*nv) implicit-GEMM tile: row i of the tile reads, for segment s,
        the seg_len contiguous floats at a_ptr + rows[i] + segs[s]; the weights run on k-major
        (k = s*seg_len + u). Returns the accumulators (zero when n_seg or seg_len <= 0)."""
        entry = builder.block
        outer = builder.append_basic_block(f"conv{mr}x{16 * nv}.seg")
        inner = builder.append_basic_block(f"conv{mr}x{16 * nv}.k")
        latch = builder.append_basic_block(f"conv{mr}x{16 * nv}.next")
        after = builder.append_basic_block(f"conv{mr}x{16 * nv}.after")
        row_offs = [builder.load(builder.gep(rows_ptr, [ir.Constant(i64, i)]), align=8) for i in range(mr)]
        some = builder.and_(builder.icmp_signed(">", n_seg, ir.Constant(i64, 0)),
                            builder.icmp_signed(">", seg_len, ir.Constant(i64, 0)))
        builder.cbranch(some, outer, after)

        builder.position_at_end(outer)
        s = builder.phi(i64)
        s.add_incoming(ir.Constant(i64, 0), entry)
        outer_accs = vector_phis(builder, [zero] * (mr * nv), entry)
        seg_off = builder.load(builder.gep(segs_ptr, [s]), align=8)
        row_ptrs = [builder.gep(a_ptr, [builder.add(off, seg_off)]) for off in row_offs]
        w_seg = builder.gep(w_ptr, [builder.mul(builder.mul(s, seg_len), ir.Constant(i64, 16 * nv))])
        builder.branch(inner)

        builder.position_at_end(inner)

        def step(kk, accs):
            w_row = builder.gep(w_seg, [builder.mul(kk, ir.Constant(i64, 16 * nv))])
            return fma_step(builder, fma, w_row, [builder.load(builder.gep(p, [kk]), align=4) for p in row_ptrs], accs,
                            nv)

        new = counted_loop(builder, seg_len, outer_accs, step, f"conv{mr}x{16 * nv}")
        builder.branch(latch)

        builder.position_at_end(latch)
        s_next = builder.add(s, ir.Constant(i64, 1))
        s.add_incoming(s_next, latch)
        for phi, value in zip(outer_accs, new):
            phi.add_incoming(value, latch)
        builder.cbranch(builder.icmp_signed("<", s_next, n_seg), outer, after)

        builder.position_at_end(after)
        return loop_results(builder, entry, latch, new)

    def conv_operands(context, builder, signature, args):
        """tile_conv_store's k-loop operands: (a, rows + rows_off, segs, n_seg, seg_len, w + w_off, mr, nr)."""
        (a_data, rows_data, segs_data, w_data), ints = arrays_and_ints(
            context, builder, signature, args, (0, 1, 3, 6), (2, 4, 5, 7, 8, 9))
        rows_off_v, n_seg_v, seg_len_v, w_off_v, mr_v, nr_v = ints
        rows_ptr, w_ptr = builder.gep(rows_data, [rows_off_v]), builder.gep(w_data, [w_off_v])
        return a_data, rows_ptr, segs_data, n_seg_v, seg_len_v, w_ptr, mr_v, nr_v

    @intrinsic
    def tile_conv_store(typingctx, a, rows, rows_off, segs, n_seg, seg_len, w, w_off, mr, nr, b, nv, act, res,
                        res_off, ldres, use_res, y, y_off, ldy):
        sig = types.void(a, rows, rows_off, segs, n_seg, seg_len, w, w_off, mr, nr, b, nv, act, res, res_off, ldres,
                         use_res, y, y_off, ldy)

        def codegen(context, builder, signature, args):
            a_data, rows_ptr, segs_ptr, n_seg_v, seg_len_v, w_ptr, mr_v, nr_v = conv_operands(
                context, builder, signature, args)
            fma = fma_of(builder)
            store = store_epilogue(context, builder, signature, args, range(10, 20))

            def emit(m, nvec):
                store(k_loop_segments(builder, fma, a_data, rows_ptr, segs_ptr, n_seg_v, seg_len_v, w_ptr, m, nvec),
                      m, nvec)

            switch_cases(builder, mr_v, nr_v, emit)
            return context.get_dummy_value()

        return sig, codegen

    return tile_fma, tile_fma_store, tile_conv_store


@lowlevel
def tile_fma(numba):
    """acc[i, 0:nr] = sum_k a[a_off + i*lda + k] * w[w_off + k*nr + 0:nr] for i < mr.

    tile_fma(a, a_off, lda, w, w_off, k, mr, nr, acc): a and w any float32 arrays (their
    data pointers are used with the element offsets given; no bounds checks: the caller
    keeps every read inside), 1 <= mr <= MR, nr in (16, 32), acc a C-contiguous (MR, 32)
    float32 array (row i at i*32). Inlined into the caller as one loop per (mr, nr) case.
    """
    return _build_tiles(numba)[0]


@lowlevel
def tile_fma_store(numba):
    """The tile with its epilogue, straight from registers into y (no scratch):

        y[y_off + i*ldy + c] = act(sum_k a[..] * w[..] + b[c]) (+ res[res_off + i*ldres + c])

    for i < mr, c < nv (nv <= nr; the columns past nv are neither read nor written), act one of
    ACT_NONE, ACT_RELU, ACT_RELU6, ACT_HARD_SWISH, ACT_ELU with alpha 1 (the last two in float32, see
    hard_swish and elu above; others: tile_fma and the Numba epilogue). b starts at the
    tile's first column. Arguments: (a, a_off, lda, w, w_off, k, mr, nr, b, nv, act, res,
    res_off, ldres, use_res, y, y_off, ldy); float32 results equal bias_act_store's (hard-swish: within 2 ulps;
    ELU: within 1 ulp of bias_act_store's, which rounds as math.expm1 does).
    """
    return _build_tiles(numba)[1]


@lowlevel
def tile_conv_store(numba):
    """The implicit-GEMM tile of a KxK convolution (no im2col matrix), with tile_fma_store's epilogue:

        y[y_off + i*ldy + c] = act(sum_{s < n_seg, u < seg_len} a[rows[rows_off + i] + segs[s] + u]
                                       * w[w_off + (s*seg_len + u)*nr + c] + b[c]) (+ res[res_off + i*ldres + c])

    for i < mr, c < nv. Arguments: (a, rows, rows_off, segs, n_seg, seg_len, w, w_off, mr, nr, b, nv, act,
    res, res_off, ldres, use_res, y, y_off, ldy). a is a float32 array read at the element offsets given (an
    NHWC image, flat: row i's window starts at rows[rows_off + i], and segment s of it, one kernel row of
    KW*C contiguous floats, at + segs[s]); rows, segs int64 arrays; w packed as pack_panels of
    (n_seg*seg_len, O); mr, nr, b, nv, act, res, y as tile_fma_store's. No bounds checks: the caller keeps
    every read inside a.
    """
    return _build_tiles(numba)[2]


def _build_prefetch(numba, write):
    """prefetch(a, off): ask the caches for the line holding a[off] (a any array; off an element offset
    the caller keeps inside a), to be read (write=False) or written (write=True). A hint: it never faults
    and changes no value."""
    from llvmlite import ir
    from numba.core import types
    from numba.extending import intrinsic

    i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)

    @intrinsic
    def prefetch(typingctx, a, off):
        sig = types.void(a, off)

        def codegen(context, builder, signature, args):
            data = context.make_array(signature.args[0])(context, builder, args[0]).data
            index = context.cast(builder, args[1], signature.args[1], types.int64)
            ptr = builder.bitcast(builder.gep(data, [index]), i8p)
            fn = builder.module.globals.get("llvm.prefetch.p0i8") or ir.Function(
                builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0i8")
            # (address, 1 = for a write, 3 = keep in every cache level, 1 = data)
            builder.call(fn, [ptr, ir.Constant(i32, int(write)), ir.Constant(i32, 3), ir.Constant(i32, 1)])
            return context.get_dummy_value()

        return sig, codegen

    return prefetch


@lowlevel
def prefetch_read(numba):
    """prefetch_read(a, off): fetch the line holding a[off] into the caches, to be read."""
    return _build_prefetch(numba, False)


@lowlevel
def prefetch_write(numba):
    """prefetch_write(a, off): fetch the line holding a[off] into the caches, owned, to be written."""
    return _build_prefetch(numba, True)


# --------------------------------------------------------------------------- the epilogue

# Each loop tests `act` once and then runs a loop specialised to that constant code
# (act_scalar's if-chain folds away), so LLVM vectorises it. They never read and write the
# same element through two different arguments: with `out is x` LLVM's runtime overlap
# check fails and it falls back to scalar code (measured 4x slower on the expand epilogue).


@kernel
def bias_act_inplace(a, b, act, alpha):
    """a[c] = act(a[c] + b[c])."""
    n = a.shape[0]
    if act == ACT_NONE:
        for c in range(n):
            a[c] = a[c] + b[c]
    elif act == ACT_RELU:
        for c in range(n):
            a[c] = relu_scalar(a[c] + b[c])
    elif act == ACT_RELU6:
        for c in range(n):
            a[c] = relu6_scalar(a[c] + b[c])
    elif act == ACT_HARD_SWISH:
        for c in range(n):
            a[c] = hard_swish_scalar(a[c] + b[c])
    elif act == ACT_ELU:  # seed 000's and seed 001's networks
        for c in range(n):
            a[c] = elu_scalar(a[c] + b[c], alpha)
    else:
        for c in range(n):
            a[c] = act_scalar(a[c] + b[c], act, alpha)


@kernel
def bias_act_store(a, b, act, alpha, out):
    """out[c] = act(a[c] + b[c]); a and out are different arrays."""
    n = a.shape[0]
    if act == ACT_NONE:
        for c in range(n):
            out[c] = a[c] + b[c]
    elif act == ACT_RELU:
        for c in range(n):
            out[c] = relu_scalar(a[c] + b[c])
    elif act == ACT_RELU6:
        for c in range(n):
            out[c] = relu6_scalar(a[c] + b[c])
    elif act == ACT_HARD_SWISH:
        for c in range(n):
            out[c] = hard_swish_scalar(a[c] + b[c])
    elif act == ACT_ELU:
        for c in range(n):
            out[c] = elu_scalar(a[c] + b[c], alpha)
    else:
        for c in range(n):
            out[c] = act_scalar(a[c] + b[c], act, alpha)


@kernel
def epilogue_tile(acc, b, res, use_res, act, alpha, y, r0, col0):
    """y[r0 + r, col0:col0 + O] = act(acc[r] + b) (+ res[r0 + r, col0:col0 + O]) for each row r of acc (R, O)."""
    n_out = acc.shape[1]
    for r in range(acc.shape[0]):
        _epilogue_row(acc[r], b, res, use_res, act, alpha, y, r0 + r, col0, n_out)


@kernel
def _epilogue_row(a, b, res, use_res, act, alpha, y, row, col0, n):
    """y[row, col0:col0 + n] = act(a[:n] + b[:n]) (+ res[row, col0:col0 + n])."""
    dst = y[row, col0:col0 + n]
    if use_res:
        # The skip joins after the activation (MobileNet's project has none; Fire's bypass
        # adds to the ReLU output), in the same rounding order as the layer path.
        bias_act_inplace(a[:n], b[:n], act, alpha)
        rr = res[row, col0:col0 + n]
        for c in range(n):
            dst[c] = a[c] + rr[c]
    else:
        bias_act_store(a[:n], b[:n], act, alpha, dst)


# --------------------------------------------------------------------------- rows x panels


@kernel
def epilogue_in_ir(act, alpha):
    """True when the tiles' IR epilogue applies `act` itself (ELU only with alpha = 1: the IR takes no alpha)."""
    return (act == ACT_NONE or act == ACT_RELU or act == ACT_RELU6 or act == ACT_HARD_SWISH
            or (act == ACT_ELU and alpha == 1.0))


@kernel
def _prefetch_rows_read(a, r0, k):
    """Prefetch rows r0..r0 + MR - 1 of a (M, K) (those that exist), every line of each, to be read."""
    for r in range(r0, min(r0 + MR, a.shape[0])):
        for c in range(0, k, 16):
            prefetch_read(a, r * k + c)


@kernel
def _prefetch_tile_write(y, row0, ldy, c0, nv):
    """Prefetch, to be written, the lines of y (rows, ldy) a tile writes: rows row0..row0 + MR - 1 (those that
    exist), columns c0..c0 + nv - 1 (nv <= 32: one or two 16-float vectors a row)."""
    for r in range(row0, min(row0 + MR, y.shape[0])):
        prefetch_write(y, r * ldy + c0)
        if nv > 16:
            prefetch_write(y, r * ldy + c0 + 16)


@kernel
def gemm_rows(a, r0, r1, wp, n_out, p_lo, p_hi, b, res, use_res, act, alpha, y, yr0, col0, acc):
    """y[yr0 + r - r0, col0 + o] = act(a[r] @ w[:, o] + b[o]) (+ res[same]) for r0 <= r < r1, o in panels [p_lo, p_hi).

    a (M, K) C-contiguous; wp = pack_panels(w (K, O)); b (O,); res and y (rows, >= col0 + O)
    (res a dummy when not use_res); acc a (MR, NR) float32 scratch. Serial: the callers split
    rows or panels over threads. Panel by panel, so a panel (K x 32 floats) stays in cache while
    the rows stream past it; rows in chunks of GEMM_CHUNK_BYTES, so they stream from L2, not L3.
    """
    k = a.shape[1]
    n_panels = (n_out + NR - 1) // NR
    last_width = 16 if n_out - (n_panels - 1) * NR <= 16 else NR
    in_ir = epilogue_in_ir(act, alpha)
    ldy, ldres = y.shape[1], res.shape[1]
    # Row tiles of equal height (+-1), at most MR: a 49-row GEMM (7x7 at batch 1) as 9 + 4 x 10 rows, not
    # 4 x 12 + 1, whose one-row tile waits on the FMA latency and costs a third of a full tile.
    chunk = max(MR, GEMM_CHUNK_BYTES // (4 * k) // MR * MR)
    read_ahead = k <= PREFETCH_READ_MAX_K and a.size * 4 >= PREFETCH_MIN_BYTES
    write_ahead = y.size * 4 >= PREFETCH_MIN_BYTES
    for ch0 in range(r0, r1, chunk):
        m = min(r1, ch0 + chunk) - ch0
        n_tiles = (m + MR - 1) // MR
        for p in range(p_lo, p_hi):
            c0 = p * NR
            nr = NR if p < n_panels - 1 else last_width
            nv = min(NR, n_out - c0)
            bp = b[c0:c0 + nv]
            for t in range(n_tiles):
                i0 = ch0 + t * m // n_tiles
                mr = ch0 + (t + 1) * m // n_tiles - i0
                row = yr0 + i0 - r0
                if p == p_lo and read_ahead:
                    _prefetch_rows_read(a, i0 + PREFETCH_TILES * MR, k)
                if write_ahead:
                    _prefetch_tile_write(y, row + PREFETCH_TILES * MR, ldy, col0 + c0, nv)
                if in_ir:
                    off = row * ldy + col0 + c0
                    tile_fma_store(a, i0 * k, k, wp, c0 * k, k, mr, nr, bp, nv, act, res, row * ldres + col0 + c0,
                                   ldres, use_res, y, off, ldy)
                else:
                    tile_fma(a, i0 * k, k, wp, c0 * k, k, mr, nr, acc)
                    for i in range(mr):
                        _epilogue_row(acc[i], bp, res, use_res, act, alpha, y, row + i, col0 + c0, nv)


_NO_BIAS = np.zeros(NR, np.float32)  # a constant in compiled code: conv_rows allocates nothing per call


@kernel
def conv_rows(a, rows, n_rows, segs, seg_len, wp, n_out, b, res, use_res, act, alpha, y, yr0, col0, acc):
    """The implicit-GEMM twin of gemm_rows, for KxK convolutions without an im2col matrix:

        y[yr0 + r, col0 + o] = act(sum_{s, u} a[rows[r] + segs[s] + u] * w[s*seg_len + u, o] + b[o]) (+ res[same])

    for r < n_rows and every o < O. a is the input as a flat float32 array; rows (>= n_rows,) int64
    holds where output row r's receptive field starts in a, segs (n_seg,) int64 where each of its
    kernel rows starts relative to that (a kernel row is seg_len = KW*C contiguous floats of an
    NHWC image); wp = pack_panels(w2d (n_seg*seg_len, O)) (HWIO reshaped); the rest as gemm_rows'.
    Serial. In chunks of CONV_CHUNK_ROWS rows, each panel by panel as gemm_rows: the input a chunk reads
    stays in L1 while every panel passes over it (a whole Fire band panel by panel re-read it from L2).
    """
    n_seg = segs.shape[0]
    k = n_seg * seg_len
    n_panels = (n_out + NR - 1) // NR
    last_width = 16 if n_out - (n_panels - 1) * NR <= 16 else NR
    in_ir = epilogue_in_ir(act, alpha)
    ldy, ldres = y.shape[1], res.shape[1]
    write_ahead = y.size * 4 >= PREFETCH_MIN_BYTES
    for r0 in range(0, n_rows, CONV_CHUNK_ROWS):
        r1 = min(n_rows, r0 + CONV_CHUNK_ROWS)
        for p in range(n_panels):
            c0 = p * NR
            nr = NR if p < n_panels - 1 else last_width
            nv = min(NR, n_out - c0)
            bp = b[c0:c0 + nv]
            for i0 in range(r0, r1, MR):
                mr = min(MR, r1 - i0)
                row = yr0 + i0
                if write_ahead:
                    _prefetch_tile_write(y, row + PREFETCH_TILES * MR, ldy, col0 + c0, nv)
                # One call site of the tile (each inlines all 24 (mr, nr) cases, which is compile time):
                # an activation the IR lacks gets the raw sums in acc and the Numba epilogue after.
                if in_ir:
                    tb, out, out_off, ld, tile_act, tile_res = bp, y, row * ldy + col0 + c0, ldy, act, use_res
                else:
                    tb, out, out_off, ld, tile_act, tile_res = _NO_BIAS[:nv], acc, 0, NR, ACT_NONE, False
                tile_conv_store(a, rows, i0, segs, n_seg, seg_len, wp, c0 * k, mr, nr, tb, nv, tile_act, res,
                                row * ldres + col0 + c0, ldres, tile_res, out, out_off, ld)
                if not in_ir:
                    for i in range(mr):
                        _epilogue_row(acc[i], bp, res, use_res, act, alpha, y, row + i, col0 + c0, nv)
