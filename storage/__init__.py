"""The target cache: schema v1, manifest, Zarr and WebDataset backends, codecs, integrity checks.

Knows nothing about models: numpy, zarr, numcodecs and the standard library only.

Stage 1 writes::

    writer = create_cache(path, CacheSpec(L, C, H, k_max, K), base_model=..., view_policy=...,
                          source=..., parts=[(part, slots), ...])
    for part in writer.parts:
        if writer.is_committed(part):
            continue                                  # resume
        with writer.open_part(part) as pw:
            pw.write(slot, key, view_records)         # all K views of one sample
            pw.commit(report=bad_samples)             # atomic: invisible until here
    writer.finalize()

Stage 2 reads::

    cache = open_cache(path)                          # refuses unknown schema / incomplete
    cache.check_base_model(expected_fingerprint)      # refuses another base model
    rec = cache.read(sample_index, view)              # float32 arrays
    for rec in cache.iter_records(per_sample=view_of_each_sample): ...
"""
from .cache import CacheReader, CacheWriter, PartWriter, create_cache, open_cache, open_writer
from .codecs import dequantize_rows, quantize_rows
from .integrity import format_inspect, inspect_cache, verify_cache
from .schema import (
                     FORMAT_NAME,
                     SCHEMA_VERSION,
                     CacheError,
                     CacheSpec,
                     PartCommittedError,
                     decoded_nbytes,
                     fingerprint_mismatch,
                     part_name_for,
                     record_nbytes,
)
from .wds_backend import decode_wds_sample

__all__ = [
    "CacheError", "CacheReader", "CacheSpec", "CacheWriter", "FORMAT_NAME", "PartCommittedError",
    "PartWriter", "SCHEMA_VERSION", "create_cache", "decode_wds_sample", "decoded_nbytes",
    "dequantize_rows", "fingerprint_mismatch", "format_inspect", "inspect_cache", "open_cache",
    "open_writer",
    "part_name_for", "quantize_rows", "record_nbytes", "verify_cache",
]
