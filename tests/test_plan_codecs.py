"""`tec plan` and the compact codec (issue #16): bytes per view and cache size for every codec."""
from __future__ import annotations

from pathlib import Path

import pytest
from storage_helpers import write_gaussian_cache

from pipeline.config import load_config
from pipeline.plan import bytes_per_view, make_plan

REPO = Path(__file__).resolve().parent.parent


def test_plan_prints_bytes_per_view_and_cache_size_for_every_codec():
    cfg = load_config(REPO / "configs" / "imagenet_mae_vitb.yaml")
    plan = make_plan(cfg)
    assert set(plan.codecs) == {"float16", "int8", "lowrank"}
    assert plan.codecs["lowrank"] <= 48 * 1024 < plan.codecs["int8"] < plan.codecs["float16"]
    text = plan.format()
    for name, n in plan.codecs.items():
        assert f"codec {name:<8} {n:,} B per view" in text
    # 1,281,167 images x 75 views x 46,261 B = 4.45 TB (fb 1.45, 3-bit attention: the config)
    assert "codec lowrank  46,261 B per view (45.2 KiB), 4.4 TB in all  <- targets.codec" in text


def test_plan_uses_the_configured_lowrank_parameters_and_refuses_bad_ones():
    from stages.configs import ConfigError

    small = bytes_per_view(num_patches=196, channels=768, heads=12, k_max=16, codec="lowrank",
                           codec_params={"feature_bits": 0.5, "attn_bits": 2})["stored"]
    default = bytes_per_view(num_patches=196, channels=768, heads=12, k_max=16,
                             codec="lowrank")["stored"]
    assert small < default <= 48 * 1024
    with pytest.raises(ConfigError, match="targets.codec_params.rank=999"):
        bytes_per_view(num_patches=196, channels=768, heads=12, k_max=16, codec="lowrank",
                       codec_params={"rank": 999})


@pytest.mark.parametrize("backend", ["zarr", "webdataset"])
def test_a_written_vit_b_lowrank_view_takes_at_most_48_kib_on_disk(tmp_path, backend):
    import storage

    L, C, H, k_max, K, n = 196, 768, 12, 16, 2, 4
    spec = storage.CacheSpec(num_patches=L, channels=C, heads=H, k_max=k_max, views=K,
                             codec="lowrank", backend=backend)
    planned = bytes_per_view(num_patches=L, channels=C, heads=H, k_max=k_max, codec="lowrank")
    write_gaussian_cache(tmp_path / "cache", spec, n)
    on_disk = storage.inspect_cache(tmp_path / "cache")["bytes_per_view"]
    # the planned tensor bytes, less what blosc finds in the codes (Gaussian-like values use the
    # middle levels more often), plus framing (zarr: checksums, shard index, metadata; tar headers)
    assert 0.8 * planned["stored"] <= on_disk <= 48 * 1024, on_disk
