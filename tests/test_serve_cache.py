"""The artifact cache: keys, atomic commits, and corrupt entries detected and rebuilt, never served."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from edge.serve import compile_model
from edge.serve.cache import ArtifactCache, CacheKey, default_cache_dir, sha256_file
from edge.serve.testing import make_tiny_model, synthetic_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def built(tiny, tmp_path):
    """A fresh cache holding the tiny model's onnxruntime int8 artifact."""
    result = compile_model(tiny, backend="onnxruntime", precision="int8", cache_dir=tmp_path, progress=False)
    return tmp_path, result


def test_first_compile_misses_and_the_second_hits(built, tiny):
    cache_dir, first = built

    second = compile_model(tiny, backend="onnxruntime", precision="int8", cache_dir=cache_dir, progress=False)

    assert first.cache == "miss" and second.cache == "hit"
    assert second.artifact_dir == first.artifact_dir and second.artifact_hash == first.artifact_hash
    assert second.parity.passed and second.parity_at_build["passed"]


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "delete_meta", "delete_golden"])
def test_a_damaged_artifact_is_detected_deleted_and_rebuilt(built, tiny, damage):
    cache_dir, first = built
    onnx_file = first.artifact_dir / "model.onnx"
    if damage == "truncate":
        onnx_file.write_bytes(onnx_file.read_bytes()[:-100])
    elif damage == "flip_byte":
        data = bytearray(onnx_file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        onnx_file.write_bytes(bytes(data))
    elif damage == "delete_meta":
        (first.artifact_dir / "meta.json").unlink()
    else:
        (first.artifact_dir / "golden.npz").unlink()

    again = compile_model(tiny, backend="onnxruntime", precision="int8", cache_dir=cache_dir, progress=False)

    assert again.cache.startswith("corrupt (") and again.cache.endswith("deleted"), again.cache
    assert {"truncate": "truncated", "flip_byte": "sha256 mismatch", "delete_meta": "meta.json",
            "delete_golden": "golden.npz is missing"}[damage] in again.cache
    meta = json.loads((again.artifact_dir / "meta.json").read_text())
    assert sha256_file(again.artifact_dir / "model.onnx") == meta["files"]["model.onnx"]["sha256"]
    assert again.parity.passed


def test_tampered_weights_with_a_valid_hash_fail_parity_on_load_and_are_rebuilt(built, tiny):
    cache_dir, first = built
    path = first.artifact_dir / "model.onnx"
    m = onnx.load(str(path))
    # Someone replaced the weights and re-signed the meta: only the parity gate can tell.
    for init in m.graph.initializer:
        if init.data_type == onnx.TensorProto.INT8 and len(init.dims) == 3:
            w = onnx.numpy_helper.to_array(init)
            init.CopyFrom(onnx.numpy_helper.from_array(np.flip(w, axis=0).copy(), init.name))
    onnx.save(m, str(path))
    meta_path = first.artifact_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["files"]["model.onnx"] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    meta_path.write_text(json.dumps(meta))

    again = compile_model(tiny, backend="onnxruntime", precision="int8", cache_dir=cache_dir, progress=False)

    assert again.cache.startswith("refused on load ("), again.cache
    assert "cosine" in again.cache or "agreement" in again.cache
    assert again.parity.passed and again.artifact_hash == first.artifact_hash


def test_served_features_after_a_rebuild_match_the_original(built, tiny):
    cache_dir, first = built
    (first.artifact_dir / "model.onnx").write_bytes(b"not an onnx model")
    x, _ = synthetic_dataset(4, seed=5)
    from edge.serve import load_backbone

    backend, reason = load_backbone(tiny, backend="onnxruntime", precision="int8", cache_dir=cache_dir)

    assert "corrupt" in reason and backend.precision == "int8"
    assert backend.describe()["artifact_sha256"] == first.artifact_hash
    assert backend.features(x).shape == (4, tiny.manifest.feature_size)


def test_keys_separate_model_backend_precision_and_platform():
    base = dict(model_name="m", model_hash="ab" * 32, backend="onnxruntime", precision="int8")
    paths = {
        CacheKey(**base, platform={"ort": "1.20"}).relpath,
        CacheKey(**{**base, "precision": "fp32"}, platform={"ort": "1.20"}).relpath,
        CacheKey(**{**base, "backend": "tensorrt"}, platform={"ort": "1.20"}).relpath,
        CacheKey(**{**base, "model_hash": "cd" * 32}, platform={"ort": "1.20"}).relpath,
        CacheKey(**base, platform={"ort": "1.21"}).relpath,
    }
    assert len(paths) == 5


def test_a_staged_entry_is_invisible_until_committed(tmp_path):
    cache = ArtifactCache(tmp_path)
    key = CacheKey("m", "00" * 32, "onnxruntime", "fp32", {"x": 1})
    staged = cache.staging()
    (staged / "a.bin").write_bytes(b"abc")

    before, why = cache.lookup(key)
    entry = cache.commit(key, staged, ["a.bin"])
    after, hit = cache.lookup(key)

    assert before is None and why == "miss"
    assert hit == "hit" and after.dir == entry.dir and not staged.exists()
    assert after.meta["files"]["a.bin"]["size"] == 3
    assert [e.dir for e in cache.entries()] == [entry.dir]


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGE_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("EDGE_CACHE_DIR")
    assert default_cache_dir().parts[-2:] == (".cache", "edge-runtime")
