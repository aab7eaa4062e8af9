"""Files like those an algorithm writes to /output/, of any size, made quickly."""

import os
import random

from bench.measures import MB

CSV_BLOCK_BYTES = 4 * MB


def write_random_file(path, size_bytes):
    """size_bytes of one random MB block over and over: gzip finds no repeat within its 32 kB window."""
    block = os.urandom(min(MB, size_bytes))
    write_repeated(path, block, size_bytes)


def write_csv_file(path, size_bytes, seed=0):
    """size_bytes of rows like a cohort's table (ids, ages, sexes, codes, measurements), a block of 4 MB of random
    rows over and over: gzip's window (32 kB) sees no repeat, and gigabytes take seconds to write."""
    generator = random.Random(seed)
    rows, length = [], 0
    while length < min(CSV_BLOCK_BYTES, size_bytes):
        row = (f"{generator.randrange(10 ** 7)},{generator.randint(18, 90)},{generator.choice('MF')},"
               f"C{generator.randrange(100):02},{generator.gauss(120, 15):.2f},{generator.random():.6f}\n")
        rows.append(row)
        length += len(row)
    write_repeated(path, "".join(rows).encode(), size_bytes)


def write_repeated(path, block, size_bytes):
    with open(path, "wb") as file:
        for offset in range(0, size_bytes, len(block)):
            file.write(block[:size_bytes - offset])
