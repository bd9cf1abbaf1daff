"""Depthwise 2-D convolution: one KHxKW filter per channel, no mixing across channels.

    y[n, oh, ow, c] = act( b[c] + sum_{i < KH, j < KW} xpad[n, oh*SH + i, ow*SW + j, c] * w[i, j, c] )

x (N,H,W,C), w (KH,KW,C), b (C,) -> y (N,Ho,Wo,C); xpad is x with zero padding
(top, bottom, left, right). PyTorch's symmetric padding and TensorFlow "SAME" (e.g. (0,1,0,1)
for a stride-2 3x3 on an even input) are both just four numbers; see lightcnn.kernels.shapes.

Output size: Ho = floor((H + top + bottom - KH) / SH) + 1, likewise Wo.
Cost: 2*KH*KW FLOPs per output element, i.e. C times fewer than a dense conv of the same
shape, so the kernel is bound by memory and loop overhead rather than arithmetic. That is why
it is written the way it is:
  - the channel loop is innermost: in NHWC the C values of one pixel are contiguous, so every
    multiply-add is a unit-stride vector operation over C (and w[i, j, :] is contiguous too);
  - one thread handles one (image, output row) at a time, with a C-length accumulator that
    stays in L1; the KH input rows it reads are reused by the neighbouring output pixels;
  - padding is never materialised: each output pixel clamps its window to the rows/columns
    that lie inside the input, so border pixels simply run fewer taps;
  - for float32 3x3 and 5x5 kernels (all MobileNet depthwise layers) a whole output row, borders
    included, is one call of _row3x3 / _row5x5 (LLVM IR: 16 channels per vector, the K*K weight
    vectors held in registers along the row, taps outside the input skipped by masked loads;
    3.4x faster than Numba loops on 112x112x32 3x3, ~1.5x on MobileNetV3's 28x28x120 5x5);
  - other kernels and dtypes go pixel by pixel (_border_pixels): interior 3x3 / 5x5 windows sum
    every tap in one pass over C, border pixels run one pass over C per tap inside the input.
The bias and the activation (an ACT_* code from lightcnn.kernels.activation) are fused into
the store of each output pixel, so y is written exactly once.

Backward (dy is the gradient w.r.t. the pre-activation output, as for every conv kernel):
    dx[n, h, w, c] = sum over the (i, j, oh, ow) with oh*SH + i - top = h, ow*SW + j - left = w
                     of dy[n, oh, ow, c] * w[i, j, c]           gathered per input row, parallel-safe
    dw[i, j, c]    = sum_{n, oh, ow} dy[n, oh, ow, c] * xpad[n, oh*SH + i, ow*SW + j, c]
    db[c]          = sum_{n, oh, ow} dy[n, oh, ow, c]
dw and db are accumulated in a fixed number of per-chunk partial buffers (rows split into
chunks, one chunk per parallel iteration) and summed afterwards, so no two threads write the
same cell and the result does not depend on the thread count.

Deliberately not here: channel multipliers > 1 (no supported model uses them), dilation, and
the activation derivative in backward (apply activation_backward first).
"""

import numpy as np

from lightcnn._jit import kernel, lowlevel, prange
from lightcnn.kernels.activation import (ACT_HARD_SWISH, ACT_NONE, ACT_RELU, ACT_RELU6, ACTIVATIONS, act_inplace,
                                         act_scalar, hard_swish_scalar, relu6_scalar, relu_scalar)
from lightcnn.kernels.shapes import conv_output_size

__all__ = ["depthwise_conv2d_forward", "depthwise_conv2d_backward"]

# Partial dw/db buffers for the backward; fixed so the summation order never depends on threads.
_DW_CHUNKS = 16
# A typed 0 for callee arguments: a literal 0 would compile the callee once more for Literal[int](0).
ZERO = np.int64(0)


# --------------------------------------------------------------------------- argument checks


def _check_nhwc(x, name):
    if not isinstance(x, np.ndarray) or x.ndim != 4:
        shape = getattr(x, "shape", type(x).__name__)
        raise ValueError(f"{name} must be a 4-D array of shape (N,H,W,C); got {shape}")
    if x.dtype not in (np.float32, np.float64):
        raise ValueError(f"{name} must be float32 or float64; got {x.dtype}")
    return np.ascontiguousarray(x)


def _check_args(x, w, stride, pad):
    """Validate x (N,H,W,C), w (KH,KW,C), stride, pad; return (x, w, (sh, sw), pad4, Ho, Wo)."""
    x = _check_nhwc(x, "x")
    w = np.asarray(w)
    n, h, wd, c = x.shape
    if w.ndim != 3 or w.shape[2] != c:
        raise ValueError(f"w must have shape (KH,KW,C) with C={c} to match x (N,H,W,C)={x.shape}; got {w.shape}")
    w = np.ascontiguousarray(w, dtype=x.dtype)
    if np.isscalar(stride):
        stride = (stride, stride)
    stride = tuple(int(s) for s in stride)
    if len(stride) != 2 or min(stride) < 1:
        raise ValueError(f"stride must be a pair of positive ints (SH, SW); got {stride}")
    pad = tuple(int(p) for p in pad)
    if len(pad) != 4 or min(pad) < 0:
        raise ValueError(f"pad must be four non-negative ints (top, bottom, left, right); got {pad}")
    kh, kw, _ = w.shape
    ho = conv_output_size(h, kh, stride[0], pad[0], pad[1])
    wo = conv_output_size(wd, kw, stride[1], pad[2], pad[3])
    return x, w, stride, pad, ho, wo


def _act_code(act):
    code = ACTIVATIONS.get(act) if isinstance(act, str) else int(act)
    if code not in ACTIVATIONS.values():
        raise ValueError(f"unknown activation {act!r}; expected an ACT_* code or one of {sorted(ACTIVATIONS)}")
    return code


# --------------------------------------------------------------------------- forward


@kernel
def _epilogue(acc, act, alpha, out):
    """out[c] = act(acc[c]); `act` is branched on once, outside the channel loop."""
    # Passing act_scalar a constant code lets its if-chain fold away, leaving a branch-free
    # loop that LLVM vectorises; with the runtime code the chain would run per element.
    n_ch = acc.shape[0]
    if act == ACT_RELU:
        for c in range(n_ch):
            out[c] = relu_scalar(acc[c])
    elif act == ACT_RELU6:
        for c in range(n_ch):
            out[c] = relu6_scalar(acc[c])
    elif act == ACT_HARD_SWISH:
        for c in range(n_ch):
            out[c] = hard_swish_scalar(acc[c])
    elif act == ACT_NONE:
        for c in range(n_ch):
            out[c] = acc[c]
    else:
        for c in range(n_ch):
            out[c] = act_scalar(acc[c], act, alpha)


@kernel
def _taps3(r, wr, c):
    return r[0, c] * wr[0, c] + r[1, c] * wr[1, c] + r[2, c] * wr[2, c]


@kernel
def _taps5(r, wr, c):
    return r[0, c] * wr[0, c] + r[1, c] * wr[1, c] + r[2, c] * wr[2, c] + r[3, c] * wr[3, c] + r[4, c] * wr[4, c]


@kernel
def _window3x3(r0, r1, r2, w, b, acc):
    # All 9 taps in one pass over C: acc is stored once instead of loaded and stored per tap,
    # which is what bounds the generic loop (about 1.8x faster on MobileNet shapes).
    for c in range(acc.shape[0]):
        acc[c] = b[c] + _taps3(r0, w[0], c) + _taps3(r1, w[1], c) + _taps3(r2, w[2], c)


@kernel
def _window5x5(r0, r1, r2, r3, r4, w, b, acc):
    for c in range(acc.shape[0]):
        acc[c] = (b[c] + _taps5(r0, w[0], c) + _taps5(r1, w[1], c) + _taps5(r2, w[2], c)
                  + _taps5(r3, w[3], c) + _taps5(r4, w[4], c))


def _build_row(numba, k):
    """The row intrinsic of a KxK depthwise conv (k = 3 or 5): see _row3x3."""
    from llvmlite import ir
    from numba.core import types
    from numba.extending import intrinsic

    i1, i32, i64, f32 = ir.IntType(1), ir.IntType(32), ir.IntType(64), ir.FloatType()
    vec, mask_t, ivec = ir.VectorType(f32, 16), ir.VectorType(i1, 16), ir.VectorType(i32, 16)
    lanes = ir.Constant(ivec, list(range(16)))
    zero, three, six = (ir.Constant(vec, [v] * 16) for v in (0.0, 3.0, 6.0))
    sixth = ir.Constant(vec, [float(np.float32(1.0 / 6.0))] * 16)
    splat0 = ir.Constant(ivec, [0] * 16)

    def declare(module, name, ret, args):
        return module.globals.get(name) or ir.Function(module, ir.FunctionType(ret, args), name)

    def broadcast(builder, scalar, vtype):
        u = ir.Constant(vtype, ir.Undefined)
        return builder.shuffle_vector(builder.insert_element(u, scalar, ir.Constant(i32, 0)), u, splat0)

    def row(typingctx, src, off0, row_len, sw, i_lo, i_hi, col0, w_in, w, b, act, n_px, n_ch, out, o_off):
        sig = types.boolean(src, off0, row_len, sw, i_lo, i_hi, col0, w_in, w, b, act, n_px, n_ch, out, o_off)
        if not all(getattr(a, "dtype", None) == types.float32 for a in (src, w, b, out)):
            return sig, lambda context, builder, signature, args: ir.Constant(i1, 0)  # not float32: caller's loop

        def codegen(context, builder, signature, args):
            src_p, w_p, b_p, out_p = [context.make_array(signature.args[j])(context, builder, args[j]).data
                                      for j in (0, 8, 9, 13)]
            (off0_v, row_len_v, sw_v, i_lo_v, i_hi_v, col0_v, w_in_v, act_v, n_px_v, n_ch_v, o_off_v) = [
                context.cast(builder, args[j], signature.args[j], types.int64) for j in (1, 2, 3, 4, 5, 6, 7, 10, 11,
                                                                                         12, 14)]
            module = builder.module
            fma = declare(module, "llvm.fma.v16f32", vec, [vec, vec, vec])
            mload = declare(module, "llvm.masked.load.v16f32.p0", vec, [vec.as_pointer(), i32, mask_t, vec])
            mstore = declare(module, "llvm.masked.store.v16f32.p0", ir.VoidType(), [vec, vec.as_pointer(), i32, mask_t])
            clamp0 = broadcast(builder, builder.or_(builder.icmp_signed("==", act_v, ir.Constant(i64, ACT_RELU)),
                                                    builder.icmp_signed("==", act_v, ir.Constant(i64, ACT_RELU6))),
                               mask_t)
            clamp6 = broadcast(builder, builder.icmp_signed("==", act_v, ir.Constant(i64, ACT_RELU6)), mask_t)
            swish = builder.icmp_signed("==", act_v, ir.Constant(i64, ACT_HARD_SWISH))
            four = ir.Constant(i32, 4)
            kc = ir.Constant(i64, k)
            row_ok = [builder.and_(builder.icmp_signed("<=", i_lo_v, ir.Constant(i64, i)),
                                   builder.icmp_signed(">", i_hi_v, ir.Constant(i64, i))) for i in range(k)]
            all_rows = builder.and_(builder.icmp_signed("==", i_lo_v, ir.Constant(i64, 0)),
                                    builder.icmp_signed("==", i_hi_v, kc))

            def vptr(base, offset):
                return builder.bitcast(builder.gep(base, [offset]), vec.as_pointer())

            entry = builder.block
            c_loop = builder.append_basic_block("dw.c")
            p_loop = builder.append_basic_block("dw.p")
            inside_b = builder.append_basic_block("dw.inside")
            border_b = builder.append_basic_block("dw.border")
            join_b = builder.append_basic_block("dw.join")
            swish_b = builder.append_basic_block("dw.swish")
            clamp_b = builder.append_basic_block("dw.clamp")
            store_b = builder.append_basic_block("dw.store")
            c_next_b = builder.append_basic_block("dw.cnext")
            done = builder.append_basic_block("dw.done")
            ok = builder.and_(builder.icmp_signed(">", n_ch_v, ir.Constant(i64, 0)),
                              builder.icmp_signed(">", n_px_v, ir.Constant(i64, 0)))
            builder.cbranch(ok, c_loop, done)
            # channel chunks: the K*K weight vectors and the bias into registers
            builder.position_at_end(c_loop)
            c = builder.phi(i64)
            c.add_incoming(ir.Constant(i64, 0), entry)
            left = builder.trunc(builder.sub(n_ch_v, c), i32)
            mask = builder.icmp_signed("<", lanes, broadcast(builder, left, ivec))
            wv = [builder.call(mload, [vptr(w_p, builder.add(builder.mul(ir.Constant(i64, t), n_ch_v), c)), four,
                                       mask, zero]) for t in range(k * k)]
            bv = builder.call(mload, [vptr(b_p, c), four, mask, zero])
            row_offs = [builder.add(builder.add(off0_v, builder.mul(ir.Constant(i64, i), row_len_v)), c)
                        for i in range(k)]
            o_base = builder.add(o_off_v, c)
            tap_off = [builder.mul(ir.Constant(i64, j), n_ch_v) for j in range(k)]
            builder.branch(p_loop)
            # pixels along the row: a window wholly inside the input sums every tap; one that crosses
            # the border skips the taps outside (masked loads, so nothing outside is read)
            builder.position_at_end(p_loop)
            px = builder.phi(i64)
            px.add_incoming(ir.Constant(i64, 0), c_loop)
            tap0 = builder.mul(px, sw_v)  # pixel px's first tap column, relative to col0
            first_col = builder.add(col0_v, tap0)
            inside = builder.and_(all_rows, builder.and_(
                builder.icmp_signed(">=", first_col, ir.Constant(i64, 0)),
                builder.icmp_signed("<=", builder.add(first_col, kc), w_in_v)))
            builder.cbranch(inside, inside_b, border_b)

            def window(valid):
                """b + the taps of pixel px, one FMA chain per kernel row, then summed; valid(i, j) -> i1 or None."""
                rows = []
                for i in range(k):
                    part = bv if i == 0 else zero
                    # Kernel row i of pixel px starts at row_ptr; its taps are row_ptr + j*C. The pointer goes
                    # through an empty asm statement, so LLVM cannot see the taps as K*K separate affine
                    # sequences in px: it strength-reduced them into K*K pointers, spilled to the stack and
                    # incremented there every pixel (3x slower on 5x5 than the FMAs alone).
                    row_ptr = builder.asm(ir.FunctionType(f32.as_pointer(), [f32.as_pointer()]), "", "=r,0",
                                          [builder.gep(src_p, [builder.add(row_offs[i], builder.mul(tap0, n_ch_v))])],
                                          False)
                    for j in range(k):
                        tap_ptr = builder.gep(row_ptr, [tap_off[j]])
                        ok_ij = valid(i, j)
                        if ok_ij is None:
                            part = builder.call(fma, [builder.call(mload, [builder.bitcast(tap_ptr, vec.as_pointer()),
                                                                           four, mask, zero]),
                                                      wv[k * i + j], part])
                        else:
                            m = builder.and_(mask, broadcast(builder, ok_ij, mask_t))
                            x = builder.call(mload, [builder.bitcast(tap_ptr, vec.as_pointer()), four, m, zero])
                            part = builder.select(ok_ij, builder.call(fma, [x, wv[k * i + j], part]), part)
                    rows.append(part)
                acc = rows[0]
                for part in rows[1:]:
                    acc = builder.fadd(acc, part)
                return acc

            builder.position_at_end(inside_b)
            acc_in = window(lambda i, j: None)
            builder.branch(join_b)
            builder.position_at_end(border_b)
            col_ok = []
            for j in range(k):
                col = builder.add(first_col, ir.Constant(i64, j))
                col_ok.append(builder.and_(builder.icmp_signed(">=", col, ir.Constant(i64, 0)),
                                           builder.icmp_signed("<", col, w_in_v)))
            acc_border = window(lambda i, j: builder.and_(row_ok[i], col_ok[j]))
            border_end = builder.block
            builder.branch(join_b)

            builder.position_at_end(join_b)
            acc = builder.phi(vec)
            acc.add_incoming(acc_in, inside_b)
            acc.add_incoming(acc_border, border_end)
            builder.cbranch(swish, swish_b, clamp_b)
            # hard-swish in float32, as gemm's tile epilogue computes it (float64 divisions cost as much as the taps)
            builder.position_at_end(swish_b)
            t = builder.fadd(acc, three)
            t = builder.select(builder.fcmp_ordered("<", t, zero), zero, t)
            t = builder.select(builder.fcmp_ordered(">", t, six), six, t)
            y_swish = builder.fmul(builder.fmul(acc, t), sixth)
            builder.branch(store_b)
            builder.position_at_end(clamp_b)
            y_clamp = builder.select(builder.and_(clamp0, builder.fcmp_ordered("<", acc, zero)), zero, acc)
            y_clamp = builder.select(builder.and_(clamp6, builder.fcmp_ordered(">", y_clamp, six)), six, y_clamp)
            builder.branch(store_b)
            builder.position_at_end(store_b)
            y = builder.phi(vec)
            y.add_incoming(y_swish, swish_b)
            y.add_incoming(y_clamp, clamp_b)
            builder.call(mstore, [y, vptr(out_p, builder.add(o_base, builder.mul(px, n_ch_v))), four, mask])
            px_next = builder.add(px, ir.Constant(i64, 1))
            px.add_incoming(px_next, store_b)
            builder.cbranch(builder.icmp_signed("<", px_next, n_px_v), p_loop, c_next_b)
            builder.position_at_end(c_next_b)
            c_next = builder.add(c, ir.Constant(i64, 16))
            c.add_incoming(c_next, c_next_b)
            builder.cbranch(builder.icmp_signed("<", c_next, n_ch_v), c_loop, done)
            builder.position_at_end(done)
            return ir.Constant(i1, 1)

        return sig, codegen

    row.__name__ = row.__qualname__ = f"row{k}x{k}"
    return intrinsic(row)


@lowlevel
def _row3x3(numba):
    """One output row of a 3x3 depthwise conv, vectorised over channels, borders included:

        out[o_off + p*C + c] = act(b[c] + sum over the taps (i, j) inside the input of
                                   src[off0 + i*row_len + (p*sw + j)*C + c] * w[(3i + j)*C + c])

    for p < n_px, c < C, where tap (i, j) of pixel p is inside when i_lo <= i < i_hi (the kernel rows
    that lie in the image) and 0 <= col0 + p*sw + j < w_in (col0: the input column of pixel 0's first
    tap, negative on a padded left border). _row3x3(src, off0, row_len, sw, i_lo, i_hi, col0, w_in, w, b,
    act, n_px, n_ch, out, o_off); src, w (3,3,C), b and out C-contiguous float32 (any other dtype: returns
    False and does nothing; True when done). Taps outside are never read (masked loads), so off0 may
    point before src's first element on a padded border. The channels go 16 at a time (the last 16
    masked): the 9 weight vectors and the bias stay in registers while the loop walks the row, so an
    interior output vector costs 9 loads, 9 FMAs (three chains, one per kernel row, then summed) and one
    store. act: ACT_NONE, ACT_RELU, ACT_RELU6 and ACT_HARD_SWISH are applied here; any other code is left
    to the caller (the row holds the pre-activation values). LLVM IR for the same reason as
    lightcnn.kernels.gemm.tile_fma: in Numba loops the per-pixel overhead of a 32-channel loop dominated
    (~4 GFLOP/s on 112x112x32).
    """
    return _build_row(numba, 3)


@lowlevel
def _row5x5(numba):
    """_row3x3 for 5x5 kernels (MobileNetV3's), w (5,5,C): 25 weight vectors in registers, five chains.

    Why borders are in it too: at 7x7 and 14x14, a 5x5 window with padding 2 crosses the border at 4 of 7
    (8 of 14) pixels a row; per pixel in Numba, one pass over C per tap, those cost more than the interior.
    """
    return _build_row(numba, 5)


@kernel
def dw_output_row(src, r_base, h_in, w, b, sh, sw, top, left, act, alpha, oh, acc, out):
    """One output row: out (Wo, C) = act(b + depthwise conv of the image rows around oh).

    src (R, W, C) holds input rows r_base .. r_base + R - 1 of an image with h_in rows (the
    whole image, r_base = 0, or a band of rows kept in cache by a fused kernel); it must
    contain every in-image row the window of output row oh touches. acc (C,) is scratch.
    """
    kh, kw, _ = w.shape
    w_in, n_ch = src.shape[1], src.shape[2]
    w_out = out.shape[0]
    h0 = oh * sh - top
    # Clamp the window to the input instead of reading a padded copy.
    i_lo = max(0, -h0)
    i_hi = min(kh, h_in - h0)
    r0 = h0 - r_base  # src row of input row h0
    if kh == kw and (kh == 3 or kh == 5):
        # The whole row, borders included, in one vectorised call (float32; other dtypes fall through).
        row_len = w_in * n_ch
        off0 = r0 * row_len - left * n_ch
        if kh == 3:
            done = _row3x3(src, off0, row_len, sw, i_lo, i_hi, -left, w_in, w, b, act, w_out, n_ch, out, ZERO)
        else:
            done = _row5x5(src, off0, row_len, sw, i_lo, i_hi, -left, w_in, w, b, act, w_out, n_ch, out, ZERO)
        if done:
            if act != ACT_NONE and act != ACT_RELU and act != ACT_RELU6 and act != ACT_HARD_SWISH:
                act_inplace(out.reshape(-1), act, alpha)
            return
    _border_pixels(src, r0, i_lo, i_hi, w_in, n_ch, w, b, sw, left, act, alpha, ZERO, w_out, acc, out)


@kernel
def _border_pixels(src, r0, i_lo, i_hi, w_in, n_ch, w, b, sw, left, act, alpha, ow_lo, ow_hi, acc, out):
    """Output pixels ow_lo .. ow_hi - 1 one at a time (any kernel size, windows clamped to the input)."""
    kh, kw, _ = w.shape
    for ow in range(ow_lo, ow_hi):
        w0 = ow * sw - left
        j_lo = max(0, -w0)
        j_hi = min(kw, w_in - w0)
        inside = i_lo == 0 and i_hi == kh and j_lo == 0 and j_hi == kw
        if inside and kh == 3 and kw == 3:
            _window3x3(src[r0, w0:w0 + 3], src[r0 + 1, w0:w0 + 3], src[r0 + 2, w0:w0 + 3], w, b, acc)
        elif inside and kh == 5 and kw == 5:
            _window5x5(src[r0, w0:w0 + 5], src[r0 + 1, w0:w0 + 5], src[r0 + 2, w0:w0 + 5],
                       src[r0 + 3, w0:w0 + 5], src[r0 + 4, w0:w0 + 5], w, b, acc)
        else:
            # Border pixels (and other kernel sizes): one pass over C per valid tap.
            for c in range(n_ch):
                acc[c] = b[c]
            for i in range(i_lo, i_hi):
                for j in range(j_lo, j_hi):
                    xr = src[r0 + i, w0 + j]
                    wr = w[i, j]
                    for c in range(n_ch):
                        acc[c] += xr[c] * wr[c]
        _epilogue(acc, act, alpha, out[ow])


def _dw_forward_body(x, w, b, sh, sw, top, left, act, alpha, y):
    n_img, h_in, w_in, n_ch = x.shape
    _, h_out, w_out, _ = y.shape
    for row in prange(n_img * h_out):
        n = row // h_out
        oh = row - n * h_out
        acc = np.empty(n_ch, dtype=y.dtype)
        dw_output_row(x[n], np.int64(0), h_in, w, b, sh, sw, top, left, act, alpha, oh, acc, y[n, oh])


dw_forward = kernel(parallel=True)(_dw_forward_body)
# The same loop on the calling thread only, for maps too small to share (the inference plan).
dw_forward_serial = kernel(_dw_forward_body)


def depthwise_conv2d_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, stride: tuple[int,
                             ...] = (1, 1),
                             pad: tuple[int, ...] = (0, 0, 0, 0), act: int = ACT_NONE,
                             alpha: float = 1.0) -> np.ndarray:
    """Depthwise conv with fused bias and activation: x (N,H,W,C), w (KH,KW,C), b (C,) -> y (N,Ho,Wo,C).

    stride (SH, SW) or int; pad (top, bottom, left, right); act an ACT_* code or name
    (alpha is ELU's). y has x's dtype.
    """
    x, w, (sh, sw), pad, ho, wo = _check_args(x, w, stride, pad)
    n, _, _, c = x.shape
    if b is None:
        b = np.zeros(c, dtype=x.dtype)
    else:
        b = np.asarray(b)
        if b.shape != (c,):
            raise ValueError(f"b must have shape (C,) = ({c},); got {b.shape}")
        b = np.ascontiguousarray(b, dtype=x.dtype)
    y = np.empty((n, ho, wo, c), dtype=x.dtype)
    dw_forward(x, w, b, sh, sw, pad[0], pad[2], _act_code(act), np.float32(alpha), y)
    return y


# --------------------------------------------------------------------------- backward


@kernel(parallel=True)
def _dw_backward_input(dy, w, sh, sw, top, left, dx):
    n_img, h_out, w_out, n_ch = dy.shape
    kh, kw, _ = w.shape
    _, h_in, w_in, _ = dx.shape
    # Gather: each thread owns one input row of dx, so no write is shared.
    for row in prange(n_img * h_in):
        n = row // h_in
        ih = row - n * h_in
        for iw in range(w_in):
            d = dx[n, ih, iw]
            for c in range(n_ch):
                d[c] = 0.0
            for i in range(kh):
                t = ih + top - i
                if t < 0 or t % sh != 0 or t // sh >= h_out:
                    continue
                oh = t // sh
                for j in range(kw):
                    u = iw + left - j
                    if u < 0 or u % sw != 0 or u // sw >= w_out:
                        continue
                    g = dy[n, oh, u // sw]
                    wr = w[i, j]
                    for c in range(n_ch):
                        d[c] += g[c] * wr[c]


@kernel(parallel=True)
def _dw_backward_params(dy, x, sh, sw, top, left, dw_part, db_part):
    n_img, h_in, w_in, n_ch = x.shape
    n_chunks, kh, kw, _ = dw_part.shape
    _, h_out, w_out, _ = dy.shape
    rows = n_img * h_out
    for chunk in prange(n_chunks):
        pw = dw_part[chunk]
        pb = db_part[chunk]
        for row in range(chunk * rows // n_chunks, (chunk + 1) * rows // n_chunks):
            n = row // h_out
            oh = row - n * h_out
            h0 = oh * sh - top
            i_lo = max(0, -h0)
            i_hi = min(kh, h_in - h0)
            for ow in range(w_out):
                w0 = ow * sw - left
                j_lo = max(0, -w0)
                j_hi = min(kw, w_in - w0)
                g = dy[n, oh, ow]
                for c in range(n_ch):
                    pb[c] += g[c]
                for i in range(i_lo, i_hi):
                    for j in range(j_lo, j_hi):
                        xr = x[n, h0 + i, w0 + j]
                        pwij = pw[i, j]
                        for c in range(n_ch):
                            pwij[c] += g[c] * xr[c]


def depthwise_conv2d_backward(dy: np.ndarray, x: np.ndarray, w: np.ndarray, stride: tuple[int, ...] = (1, 1),
                              pad: tuple[int, ...] = (0, 0, 0, 0)) -> tuple:
    """Gradients of the depthwise conv: dy (N,Ho,Wo,C) w.r.t. the pre-activation output,
    x (N,H,W,C), w (KH,KW,C) -> (dx (N,H,W,C), dw (KH,KW,C), db (C,)), all in x's dtype.
    """
    x, w, (sh, sw), pad, ho, wo = _check_args(x, w, stride, pad)
    dy = _check_nhwc(dy, "dy")
    n, h, wd, c = x.shape
    if dy.shape != (n, ho, wo, c):
        raise ValueError(f"dy must have shape (N,Ho,Wo,C) = {(n, ho, wo, c)}; got {dy.shape}")
    dy = dy.astype(x.dtype, copy=False)
    dx = np.empty_like(x)
    _dw_backward_input(dy, w, sh, sw, pad[0], pad[2], dx)
    chunks = max(1, min(_DW_CHUNKS, n * ho))
    dw_part = np.zeros((chunks,) + w.shape, dtype=x.dtype)
    db_part = np.zeros((chunks, c), dtype=x.dtype)
    _dw_backward_params(dy, x, sh, sw, pad[0], pad[2], dw_part, db_part)
    return dx, dw_part.sum(axis=0), db_part.sum(axis=0)
