"""Output-size and padding rules shared by every windowed kernel.

Padding is always four explicit numbers ``(top, bottom, left, right)``.

    out = floor((in + pad_before + pad_after - k) / stride) + 1          (floor mode)
    out = ceil((in + pad_before + pad_after - k) / stride) + 1           (ceil mode,
          with PyTorch's rule that the last window must start inside the
          input or the left padding, so it is dropped when it would start in
          the right padding)
"""


def conv_output_size(size, kernel, stride, pad_before, pad_after, ceil_mode=False):
    """Spatial output length of a convolution or pooling window along one axis."""
    span = size + pad_before + pad_after - kernel
    if span < 0:
        raise ValueError(
            f"window of {kernel} does not fit an input of {size} with padding ({pad_before}, {pad_after})"
        )
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    if (out - 1) * stride >= size + pad_before:
        out -= 1
    return out


def torch_padding(kernel, padding=None):
    """PyTorch's symmetric padding: ``padding`` on every side (default ``kernel // 2``)."""
    p = kernel // 2 if padding is None else int(padding)
    return (p, p, p, p)


def same_padding(height, width, kernel_h, kernel_w, stride_h, stride_w):
    """TensorFlow/Keras "SAME" padding as (top, bottom, left, right).

    The output is ceil(in / stride); the total padding needed is split with the
    extra pixel at the bottom/right, so a stride-2 3x3 conv on an even input
    pads (0, 1) rather than PyTorch's (1, 1).
    """

    def split(size, k, s):
        out = -(-size // s)
        total = max((out - 1) * s + k - size, 0)
        return total // 2, total - total // 2

    top, bottom = split(height, kernel_h, stride_h)
    left, right = split(width, kernel_w, stride_w)
    return (top, bottom, left, right)


def transpose_output_size(size, kernel, stride, pad_before, pad_after, output_padding=0):
    """Output length of a transpose convolution (the inverse of conv_output_size)."""
    return (size - 1) * stride - pad_before - pad_after + kernel + output_padding
