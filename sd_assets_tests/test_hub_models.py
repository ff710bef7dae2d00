"""Hub models through the real huggingface_hub code path, offline, against a pre-filled HF cache.

The cache holds the tiny model as ``sd-assets-test/tiny-sd`` in the layout huggingface_hub
writes (``blobs/``, ``snapshots/<sha>/`` of symlinks, ``refs/main``), in plain and fp16 weights
plus parts a generating worker does not need.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import shutil
import socket
import threading
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from sd_assets.domain.errors import ModelError
from sd_assets.domain.grid import ModelConfig
from sd_assets.domain.hub import HubSettings, resolve_commit, select_pipeline_files
from sd_assets.domain.models import MANIFEST, VERIFIED, ensure_model, model_prefix, read_model_ref
from sd_assets.domain.pngmeta import PARAMETERS_CHUNK, PROVENANCE_CHUNK
from sd_assets.domain.store import LocalStore
from sd_assets_tests.helpers import materialize_style, write_grid

REPO = "sd-assets-test/tiny-sd"
SHA = "0123456789abcdef0123456789abcdef01234567"
EXTRAS = {  # in the repo, never needed to generate
    "safety_checker/config.json": b"{}",
    "safety_checker/model.safetensors": b"not needed",
    "feature_extractor/preprocessor_config.json": b"{}",
    "tiny-sd.ckpt": b"a single-file checkpoint",
}


def _add_to_cache(repo_root: Path, relative: str, data: bytes) -> None:
    blob = repo_root / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo_root / "snapshots" / SHA / relative
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, tiny_model_store) -> Path:
    """An HF_HOME whose hub cache holds the tiny model as REPO at SHA, with refs/main -> SHA."""
    import torch

    from sd_assets.domain.tiny_model import build_tiny_pipeline

    home = tmp_path_factory.mktemp("hf-home")
    repo_root = home / "hub" / ("models--" + REPO.replace("/", "--"))
    # The revision's folder, not refs/ beside it: a folder lists its entries in no set order.
    plain = next(tiny_model_store.root.glob(f"models/tiny-random/*/{MANIFEST}")).parent
    files = {p.relative_to(plain).as_posix(): p.read_bytes() for p in plain.rglob("*") if p.is_file()}
    files.pop(MANIFEST)
    files.pop(VERIFIED)
    fp16 = tmp_path_factory.mktemp("fp16")
    build_tiny_pipeline().to(torch.float16).save_pretrained(fp16, variant="fp16")
    files.update({p.relative_to(fp16).as_posix(): p.read_bytes() for p in fp16.rglob("*.fp16.*")})
    files.update(EXTRAS)
    for relative, data in files.items():
        _add_to_cache(repo_root, relative, data)
    (repo_root / "refs").mkdir()
    (repo_root / "refs" / "main").write_text(SHA)
    return home


def _hub_grid(folder: Path, revision: str = "main", variant: str = "auto") -> Path:
    path = write_grid(folder, styles=("Banksy",), subjects=("alan turing",), images_per_prompt=2)
    text = path.read_text().replace(
        "model: {id: tiny-random, revision: main}", f"model: {{id: {REPO}, revision: {revision}, variant: {variant}}}"
    )
    path.write_text(text)
    return path


def _metadata(result, asset: str) -> dict:
    events = [e for e in result.get_asset_materialization_events() if e.asset_key.path[-1] == asset]
    return {name: value.value for name, value in events[0].materialization.metadata.items()}


def test_offline_hub_model_is_cached_verified_and_recorded(hf_home, tmp_path, instance):
    grid_path = _hub_grid(tmp_path)
    environ = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home)}

    first = materialize_style(grid_path, "Banksy", instance, **environ)

    weights = _metadata(first, "model_weights")
    assert weights["revision"] == SHA and weights["model_id"] == REPO
    assert weights["cache"] == "downloaded" and weights["variant"] == "fp16"
    assert weights["bytes_downloaded"] == 0  # everything came from the pre-filled HF cache
    store = LocalStore(tmp_path / "data")
    manifest = json.loads(store.read_text(model_prefix(REPO, SHA) + MANIFEST))
    paths = {entry["path"] for entry in manifest["files"]}
    assert manifest["revision"] == SHA and manifest["variant"] == "fp16"
    assert {"model_index.json", "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/diffusion_pytorch_model.fp16.safetensors", "text_encoder/model.fp16.safetensors",
            "unet/config.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer.json"} <= paths  # fmt: skip
    assert not [p for p in paths if p.endswith(".safetensors") and ".fp16." not in p]
    assert not paths & set(EXTRAS) and not [p for p in paths if p.startswith(("safety_checker/", "feature_extractor/"))]
    snapshot = hf_home / "hub" / ("models--" + REPO.replace("/", "--")) / "snapshots" / SHA
    for entry in manifest["files"]:
        data = (snapshot / entry["path"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["bytes"], entry["sha256"])

    assert _metadata(first, "style_images")["model_revision"] == SHA
    catalog = pd.read_parquet(tmp_path / "data" / "catalog" / "banksy.parquet")
    assert len(catalog) == 2 and set(catalog["model_revision"]) == {SHA} and set(catalog["model_id"]) == {REPO}
    assert set(catalog["model_variant"]) == {"fp16"}  # the weights loaded, which move pixels by rounding
    for path in catalog["path"]:
        with Image.open(io.BytesIO(Path(path).read_bytes())) as image:
            assert json.loads(image.text[PROVENANCE_CHUNK])["model_revision"] == SHA
            assert f"Model: {REPO}, Model revision: {SHA}" in image.text[PARAMETERS_CHUNK]

    # A sound cache is used as it is, without reading it again; a corrupted file makes model_weights
    # rebuild it.
    warm = _metadata(materialize_style(grid_path, "Banksy", instance, **environ), "model_weights")
    assert warm["cache"] == "cached" and warm["bytes_hashed"] == 0
    unet = tmp_path / "data" / model_prefix(REPO, SHA) / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    unet.write_bytes(b"\0" * unet.stat().st_size)
    rebuilt = _metadata(materialize_style(grid_path, "Banksy", instance, **environ), "model_weights")
    assert rebuilt["cache"] == "downloaded" and "unet/diffusion_pytorch_model.fp16.safetensors" in rebuilt["rebuilt_because"]
    assert hashlib.sha256(unet.read_bytes()).hexdigest() == next(
        e["sha256"] for e in manifest["files"] if e["path"] == "unet/diffusion_pytorch_model.fp16.safetensors"
    )


def test_variant_and_safety_checker_choose_the_files(hf_home):
    snapshot = next(hf_home.glob("hub/*/snapshots/*"))
    files = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
    plain = select_pipeline_files(REPO, files, variant="none")
    assert plain.variant is None and "unet/diffusion_pytorch_model.safetensors" in plain.paths
    assert not [p for p in plain.paths if ".fp16." in p]
    with_checker = select_pipeline_files(REPO, files, variant="auto", safety_checker=True)
    assert with_checker.variant is None  # the safety checker has no fp16 weights here
    assert {"safety_checker/model.safetensors", "feature_extractor/preprocessor_config.json"} <= set(with_checker.paths)
    no_fp16 = [f for f in files if ".fp16." not in f]
    with pytest.raises(ModelError, match="no fp16 weights.*model.variant"):
        select_pipeline_files(REPO, no_fp16, variant="fp16")
    with pytest.raises(ModelError, match="no model_index.json"):
        select_pipeline_files(REPO, [f for f in files if f != "model_index.json"])


def test_training_only_weights_beside_the_plain_ones_are_not_downloaded(hf_home):
    snapshot = next(hf_home.glob("hub/*/snapshots/*"))
    files = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
    # The other UNet files a published Stable Diffusion 1.5 repo holds.
    extra = ("bin", "fp16.bin", "non_ema.bin", "non_ema.safetensors")
    files += [f"unet/diffusion_pytorch_model.{name}" for name in extra]
    for variant, weights in (("none", "safetensors"), ("auto", "fp16.safetensors")):
        selection = select_pipeline_files(REPO, files, variant=variant)
        unet_weights = [p for p in selection.paths if p.startswith("unet/diffusion_pytorch_model")]
        assert unet_weights == [f"unet/diffusion_pytorch_model.{weights}"]


def test_offline_without_the_model_says_how_to_fill_the_cache(tmp_path):
    with pytest.raises(ModelError, match=r"HF_HUB_OFFLINE=1 forbids downloading it.*HF_HOME or HF_HUB_CACHE"):
        resolve_commit(REPO, "main", HubSettings(offline=True, cache_dir=str(tmp_path)))


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_no_network_names_the_offline_setting(tmp_path):
    settings = HubSettings(cache_dir=str(tmp_path), endpoint=f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(ModelError, match="cannot reach the Hugging Face hub.*set HF_HUB_OFFLINE=1"):
        resolve_commit(REPO, "main", settings)


class _HubAnswers(http.server.BaseHTTPRequestHandler):
    """The hub's answers for a missing repo, a gated repo and a missing revision."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if "/gated" in self.path:
            status, code = 403, "GatedRepo"
        elif "/revision/no-such-branch" in self.path:
            status, code = 404, "RevisionNotFound"
        else:
            status, code = 404, "RepoNotFound"
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "stub"}')

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def stub_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HubAnswers)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("repo", "revision", "token", "message"),
    [
        ("org/missing", "main", None, "no such model repo on the Hugging Face hub; check model.id"),
        ("org/gated", "main", None, "is gated: accept its licence at https://huggingface.co/org/gated and set HF_TOKEN"),
        ("org/gated", "main", "hf_x", "the HF_TOKEN given has no access"),
        ("org/real", "no-such-branch", None, "has no revision 'no-such-branch'"),
    ],
)
def test_hub_errors_say_what_to_change(stub_hub, tmp_path, repo, revision, token, message):
    settings = HubSettings(token=token, cache_dir=str(tmp_path), endpoint=stub_hub)
    with pytest.raises(ModelError, match=message):
        resolve_commit(repo, revision, settings)


def test_a_commit_sha_in_the_store_needs_no_hub(hf_home, tmp_path, instance):
    """Pinned to a commit sha, a run whose store holds the weights never asks the hub or its cache."""
    grid_path = _hub_grid(tmp_path, revision=SHA)
    materialize_style(grid_path, "Banksy", instance, HF_HUB_OFFLINE="1", HF_HOME=str(hf_home))
    empty_home = tmp_path / "empty-hf-home"
    shutil.rmtree(empty_home, ignore_errors=True)
    result = materialize_style(grid_path, "Banksy", instance, HF_HUB_OFFLINE="1", HF_HOME=str(empty_home))
    assert _metadata(result, "model_weights")["cache"] == "cached"


def test_a_sharded_fp16_unet_is_downloaded_with_its_index(hf_home):
    snapshot = next(hf_home.glob("hub/*/snapshots/*"))
    files = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
    # How diffusers saves an fp16 UNet too large for one file.
    sharded = [
        "unet/diffusion_pytorch_model-00001-of-00002.fp16.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.fp16.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
    ]
    files = [f for f in files if f != "unet/diffusion_pytorch_model.fp16.safetensors"] + sharded

    selection = select_pipeline_files(REPO, files, variant="auto")

    assert selection.variant == "fp16"
    assert [p for p in selection.paths if p.startswith("unet/diffusion_pytorch_model")] == sorted(sharded)


MOVED_SHA = "fedcba9876543210fedcba9876543210fedcba98"


class _MainMoved(http.server.BaseHTTPRequestHandler):
    """A hub on which the repo's main branch has moved on to MOVED_SHA; notes each path asked for."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.asked.append(self.path)
        body = json.dumps({"id": REPO, "sha": MOVED_SHA, "siblings": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def main_moved_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _MainMoved)
    server.asked = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_offline_setting_reads_the_cached_ref_without_asking_the_hub(main_moved_hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # offline only through the hub resource's setting
    refs = tmp_path / ("models--" + REPO.replace("/", "--")) / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(SHA)
    endpoint = f"http://127.0.0.1:{main_moved_hub.server_address[1]}"

    assert resolve_commit(REPO, "main", HubSettings(offline=True, cache_dir=str(tmp_path), endpoint=endpoint)) == SHA
    assert main_moved_hub.asked == []
    assert (refs / "main").read_text() == SHA


def test_a_model_cached_in_fp16_is_fetched_again_when_the_grid_asks_for_plain_weights(hf_home, tmp_path):
    store = LocalStore(tmp_path / "data")
    hub = HubSettings(offline=True, cache_dir=str(hf_home / "hub"))
    assert ensure_model(store, ModelConfig(id=REPO, variant="auto"), hub).ref.variant == "fp16"

    plain = ensure_model(store, ModelConfig(id=REPO, variant="none"), hub)

    assert plain.action == "downloaded"
    assert plain.problems == ("cached with the fp16 variant, grid asks for model.variant none",)
    manifest = json.loads(store.read_text(model_prefix(REPO, SHA) + MANIFEST))
    assert manifest["variant"] is None
    assert "unet/diffusion_pytorch_model.safetensors" in {entry["path"] for entry in manifest["files"]}
    assert not [entry["path"] for entry in manifest["files"] if ".fp16." in entry["path"]]


def test_a_cached_branch_serves_the_grid_pinned_to_its_commit_sha(hf_home, tmp_path):
    store = LocalStore(tmp_path / "data")
    hub = HubSettings(offline=True, cache_dir=str(hf_home / "hub"))
    assert ensure_model(store, ModelConfig(id=REPO, revision="main"), hub).action == "downloaded"

    pinned = ModelConfig(id=REPO, revision=SHA)
    assert ensure_model(store, pinned, hub).action == "cached"
    ref = read_model_ref(store, pinned)
    assert (ref.model_id, ref.revision, ref.variant) == (REPO, SHA, "fp16")


def test_a_repo_without_weights_for_a_part_of_the_pipeline_is_named_before_any_download():
    # A repo whose VAE has its config and no weights (an upload that stopped half-way, say).
    files = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "unet/config.json",
             "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "text_encoder/config.json",
             "text_encoder/model.safetensors"]  # fmt: skip
    with pytest.raises(ModelError, match=r"^model org/unet-only: no weights for vae; not a Stable Diffusion repo$"):
        select_pipeline_files("org/unet-only", files)


def test_a_repo_whose_parts_have_weights_in_different_variants_is_made_from_each_parts_own():
    # The UNet only in fp16, the text encoder only in plain weights: diffusers, asked for the fp16
    # variant, loads the fp16 files where a part has them and the plain ones elsewhere.
    files = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "unet/config.json",
             "unet/diffusion_pytorch_model.fp16.safetensors", "vae/config.json",
             "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
             "text_encoder/config.json", "text_encoder/model.safetensors"]  # fmt: skip
    selection = select_pipeline_files("org/mixed", files, variant="auto")
    assert selection.variant == "fp16"
    assert [p for p in selection.paths if p.endswith(".safetensors")] == [
        "text_encoder/model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ]  # fmt: skip
    # Plain weights for every part cannot be had, nor fp16 for every part.
    with pytest.raises(ModelError, match=r"^model org/mixed: no plain weights for unet; set model.variant to 'auto'"):
        select_pipeline_files("org/mixed", files, variant="none")
    with pytest.raises(ModelError, match=r"^model org/mixed has no fp16 weights for every component"):
        select_pipeline_files("org/mixed", files, variant="fp16")


def test_a_model_whose_unet_has_only_fp16_weights_makes_images(hf_home, tmp_path, instance):
    # The test repo with its UNet's plain weights and its text encoder's fp16 weights gone.
    home = tmp_path / "hf-home"
    shutil.copytree(hf_home, home, symlinks=True)
    snapshot = home / "hub" / ("models--" + REPO.replace("/", "--")) / "snapshots" / SHA
    (snapshot / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (snapshot / "text_encoder" / "model.fp16.safetensors").unlink()

    result = materialize_style(_hub_grid(tmp_path), "Banksy", instance, HF_HUB_OFFLINE="1", HF_HOME=str(home))

    assert _metadata(result, "model_weights")["variant"] == "fp16"
    manifest = json.loads(LocalStore(tmp_path / "data").read_text(model_prefix(REPO, SHA) + MANIFEST))
    assert sorted(e["path"] for e in manifest["files"] if e["path"].endswith(".safetensors")) == [
        "text_encoder/model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ]  # fmt: skip
    assert _metadata(result, "style_images")["generated"] == 2
    assert len(pd.read_parquet(tmp_path / "data" / "catalog" / "banksy.parquet")) == 2
