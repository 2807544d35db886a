"""Time a 3x3 convolution's forward and backward pass in both memory layouts.

    python scripts/conv_backward_layout.py [--threads 1] [--channels 64] [--size 192]

The detector trains its dense stage on contiguous tensors and infers on channels-last
ones (haltdet/model/detector.py, Detector.train) because on CPUs (oneDNN) the
channels-last backward pass can be much slower while its forward pass is faster; this
script measures both on the machine at hand (batch 2, best of 3).
"""

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=192, help="map side in cells")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for name, layout in (("channels-last", torch.channels_last), ("contiguous", torch.contiguous_format)):
        conv = torch.nn.Conv2d(args.channels, args.channels, 3, padding=1).to(memory_format=layout)
        x = torch.randn(2, args.channels, args.size, args.size).to(memory_format=layout).requires_grad_(True)
        forward = backward = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            y = conv(x)
            middle = time.perf_counter()
            y.backward(torch.ones_like(y))
            forward, backward = min(forward, middle - start), min(backward, time.perf_counter() - middle)
        print(f"{name:>14}: forward {forward * 1000:6.1f} ms, backward {backward * 1000:6.1f} ms")


if __name__ == "__main__":
    main()
