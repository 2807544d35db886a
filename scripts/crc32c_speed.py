"""CRC-32C throughput: haltdet's numpy implementation against google-crc32c (if installed).

    python scripts/crc32c_speed.py [--megabytes 64]

Best of three on one buffer of random bytes; both must give the same value.
"""

import argparse
import time

import numpy as np

from haltdet.data.formats.tfrecord import crc32c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=64)
    args = parser.parse_args()
    data = np.random.default_rng(0).bytes(args.megabytes << 20)
    candidates = [("numpy (haltdet)", crc32c)]
    try:
        import google_crc32c
        candidates.append(("google-crc32c", google_crc32c.value))
    except ImportError:
        print("google-crc32c is not installed (pip install haltdet[real])")
    values = set()
    for name, function in candidates:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            values.add(function(data))
            best = min(best, time.perf_counter() - start)
        print(f"{name:>16}: {args.megabytes / best:8.0f} MB/s")
    assert len(values) == 1, "the implementations disagree"


if __name__ == "__main__":
    main()
