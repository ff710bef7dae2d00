"""The S3 backend against moto's S3 server on loopback: the store itself, then whole runs on it."""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import json
import os
import posixpath
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import boto3
import botocore.config
import botocore.exceptions
import dagster as dg
import pandas as pd
import pytest
from moto.server import ThreadedMotoServer
from PIL import Image

from sd_assets.cli import main
from sd_assets.definitions import store_from_environment
from sd_assets.domain.catalog import read_catalog, rebuild_catalogs
from sd_assets.domain.found_images import show_images
from sd_assets.domain.errors import GridError, ModelError, StoreError, StoreUnavailable
from sd_assets.domain.grid import load_grid
from sd_assets.domain.models import (
    MANIFEST,
    VERIFIED,
    local_model_folder,
    read_model_ref,
)
from sd_assets.domain.pngmeta import PROVENANCE_CHUNK
from sd_assets.domain.s3_store import S3Store
from sd_assets.domain.store import open_store
from sd_assets.domain.subject_lists import (
    StoreSource,
    read_subject_lists,
    scan_subject_lists,
)
from sd_assets_tests.helpers import free_port, materialize_style, write_grid


@pytest.fixture(scope="module")
def s3_endpoint():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint, monkeypatch) -> str:
    """A fresh bucket, with the standard AWS variables pointing boto3 at the moto server."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    name = f"sd-assets-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def _metadata(result, asset: str) -> dict:
    events = [e for e in result.get_asset_materialization_events() if e.asset_key.path[-1] == asset]
    assert len(events) == 1, asset
    return {name: value.value for name, value in events[0].materialization.metadata.items()}


# --- the store ---------------------------------------------------------------------------------


def test_round_trip_listing_and_content_types(bucket, tmp_path):
    store = open_store(f"s3://{bucket}/run-1")
    assert isinstance(store, S3Store)
    store.write_text("gallery/index.html", "<p>hi</p>")
    store.write_bytes("images/ab/abcd.png", b"png-bytes")
    store.write_bytes("images/cd/cdef.png", b"other")
    source = tmp_path / "weights.bin"
    source.write_bytes(b"w" * 1000)
    store.upload_file(source, "models/m/r/unet/weights.bin")

    assert store.read_text("gallery/index.html") == "<p>hi</p>"
    assert store.exists("images/ab/abcd.png") and not store.exists("images/ab/none.png")
    assert sorted(store.list_keys("images/")) == ["images/ab/abcd.png", "images/cd/cdef.png"]
    assert store.existing(["images/ab/abcd.png", "images/ab/none.png", "images/cd/cdef.png"]) == {
        "images/ab/abcd.png", "images/cd/cdef.png",
    }  # fmt: skip
    assert len(store.read_bytes("models/m/r/unet/weights.bin")) == 1000
    assert store.location("images/ab/abcd.png") == f"s3://{bucket}/run-1/images/ab/abcd.png"

    raw = boto3.client("s3")
    assert raw.head_object(Bucket=bucket, Key="run-1/gallery/index.html")["ContentType"].startswith("text/html")
    assert raw.head_object(Bucket=bucket, Key="run-1/images/ab/abcd.png")["ContentType"] == "image/png"

    target = tmp_path / "copy" / "weights.bin"
    store.download_file("models/m/r/unet/weights.bin", target)
    assert target.read_bytes() == b"w" * 1000
    assert [p.name for p in target.parent.iterdir()] == ["weights.bin"]  # no temporary file left
    # The node's disk refusing the copy (here a file where its folder should be) is a StoreError naming both.
    (tmp_path / "a-file").write_text("")
    with pytest.raises(StoreError, match=rf"^cannot write {tmp_path}/a-file/weights.bin \(a copy of s3://{bucket}/"
                       rf"run-1/models/m/r/unet/weights.bin\): {tmp_path}/a-file is a file, not a folder$"):  # fmt: skip
        store.download_file("models/m/r/unet/weights.bin", tmp_path / "a-file" / "weights.bin")
    # An object that is not there: a StoreError, and no half-written copy left on the node.
    with pytest.raises(StoreError, match=rf"^cannot download at s3://{bucket}/run-1/models/m/r/unet/gone.bin: "):
        store.download_file("models/m/r/unet/gone.bin", target.parent / "gone.bin")
    assert [p.name for p in target.parent.iterdir()] == ["weights.bin"]

    store.delete("images/cd/cdef.png")
    assert not store.exists("images/cd/cdef.png")
    with pytest.raises(StoreError, match="does not exist"):
        store.read_bytes("images/cd/cdef.png")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3://", "no bucket"),
        ("s3:///prefix", "no bucket"),
        ("s3://Bad_Bucket/x", "not a valid S3 bucket name"),
        ("gs://bucket/x", "unsupported scheme"),
        ("s3:/bucket/x", "an S3 store is written s3://bucket/prefix"),  # not a folder named "s3:"
        ("S3://bucket/x", "an S3 store is written s3://bucket/prefix"),
        ("s3://bucket/a//b", "the prefix 'a//b' has an empty, '.' or '..' part; write s3://bucket/some/prefix"),
        ("s3://bucket/./p", "the prefix './p' has an empty, '.' or '..' part"),
    ],
)
def test_bad_urls_say_what_to_write(url, message, tmp_path):
    with pytest.raises(StoreError, match=re.escape(message)):
        open_store(url)
    # In a grid file it is refused as the file is read, naming the file and the field.
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"styles: [Banksy]\nsubjects_dir: subjects\nmodel: {{id: tiny-random}}\nstorage: {url}\n")
    with pytest.raises(GridError, match=re.escape(f"{grid}: field 'storage' = {url!r}: ") + ".*" + re.escape(message)):
        load_grid(grid)


def test_listings_of_more_than_one_page_find_every_key(bucket):
    # S3 lists 1,000 keys a page: a folder of images, or of subject lists, holds more.
    store = open_store(f"s3://{bucket}/big")
    raw = boto3.client("s3")
    keys = [f"images/ab/ab{i:04d}.png" for i in range(1001)]
    for key in keys:
        raw.put_object(Bucket=bucket, Key=f"big/{key}", Body=b"")
    assert sorted(store.list_keys("images/")) == keys
    assert store.existing([keys[-1], "images/ab/none.png"]) == {keys[-1]}


def test_which_images_exist_is_one_listing_a_folder_not_a_request_an_image(bucket):
    # A style of 300 images over 3 of the 256 folders, 200 of them made: an unchanged run asks this.
    store = open_store(f"s3://{bucket}/many")
    keys = [f"images/{folder}/{folder}{n:062x}.png" for folder in ("0a", "7f", "e3") for n in range(100)]
    for key in keys[:200]:
        store.write_bytes(key, b"png")
    store.write_bytes("images/7f/other.png", b"not asked for")
    calls: list[str] = []
    store.client.meta.events.register("before-call.s3.*", lambda model, **_: calls.append(model.name))
    assert store.existing(keys) == set(keys[:200])
    assert sorted(calls) == ["ListObjectsV2"] * 3


def test_missing_bucket_is_named_with_the_endpoint_asked(bucket, s3_endpoint):
    # The endpoint is named: a bucket missing from the wrong service is not to be created there.
    with pytest.raises(StoreError) as missing:
        open_store("s3://no-such-bucket-here/x")
    assert str(missing.value) == (
        f"cannot open the bucket: bucket 'no-such-bucket-here' does not exist at {s3_endpoint}; create it there, "
        "or fix the storage URL, or AWS_ENDPOINT_URL if that is not your S3 service"
    )


def test_missing_credentials_name_the_variables(bucket, monkeypatch, tmp_path):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StoreError, match="no AWS credentials found; set AWS_ACCESS_KEY_ID"):
        open_store(f"s3://{bucket}/x")


def test_an_endpoint_that_is_not_a_url_is_named_by_either_client(monkeypatch):
    # boto3 refuses it as it makes the client, before any request: no server is needed.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "127.0.0.1:5917")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    expected = (
        "cannot open the bucket at s3://some-bucket/sd: AWS_ENDPOINT_URL='127.0.0.1:5917' is not a URL; "
        "write it as http://host[:port] or https://host[:port]"
    )
    with pytest.raises(StoreError) as default_client:
        open_store("s3://some-bucket/sd")
    assert str(default_client.value) == expected
    resource = store_from_environment("s3://some-bucket/sd", {"AWS_ENDPOINT_URL": "127.0.0.1:5917"})
    with pytest.raises(StoreError) as dagster_aws_client:  # the client of a run's steps
        resource.open()
    assert str(dagster_aws_client.value) == expected
    # botocore takes the S3 one first: the message names the variable the endpoint came from.
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "localhost:9000")
    with pytest.raises(StoreError, match=r"^cannot open the bucket at s3://some-bucket/sd: AWS_ENDPOINT_URL_S3="):
        open_store("s3://some-bucket/sd")


class _RegionBoundS3(http.server.BaseHTTPRequestHandler):
    """An S3-compatible service in region 'garage' (Garage's default) with one empty bucket: a request
    signed for another region gets a bare 400, without the region that boto3 could redirect to."""

    def _signed_here(self) -> bool:
        return "/garage/s3/aws4_request" in self.headers.get("Authorization", "")

    def _answer(self, body: bytes = b"") -> None:
        self.send_response(200 if self._signed_here() else 400)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    def do_HEAD(self):
        self._answer()

    def do_GET(self):
        empty = b"<ListBucketResult><Name>sd-region</Name><KeyCount>0</KeyCount><IsTruncated>false</IsTruncated>"
        self._answer(empty + b"</ListBucketResult>" if self._signed_here() else b"")

    def log_message(self, *args):
        pass


def test_search_and_rebuild_catalog_sign_for_aws_region_as_the_runs_do(monkeypatch, capsys):
    # boto3 alone reads AWS_DEFAULT_REGION, not AWS_REGION, which the docs name first.
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RegionBoundS3)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("AWS_REGION", "garage")
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("SD_ASSETS_STORAGE", "s3://sd-region/x")
    try:
        assert main(["search"]) == 2
        assert capsys.readouterr().err == (
            "sd-assets: no catalog in s3://sd-region/x: no style has been made there yet (make demo, or dagster "
            "job execute)\n"
        )
        assert main(["rebuild-catalog"]) == 2
        assert "no images and no catalog in s3://sd-region/x" in capsys.readouterr().err
    finally:
        server.shutdown()


def test_an_endpoint_that_stops_answering_after_the_bucket_opened_says_to_run_again(monkeypatch):
    # The S3 service going away mid-run (restarted, its network lost): the endpoint was right a moment
    # ago, so the message says to run again once it answers, not to check AWS_ENDPOINT_URL.
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", "import time; from moto.server import ThreadedMotoServer; "
         f"ThreadedMotoServer(ip_address='127.0.0.1', port={port}, verbose=False).start(); time.sleep(600)"],
        start_new_session=True,
    )  # fmt: skip
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for name, value in [("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                            ("AWS_REGION", "us-east-1"), ("AWS_ENDPOINT_URL", endpoint)]:  # fmt: skip
            monkeypatch.setenv(name, value)
        deadline = time.monotonic() + 30
        while True:
            try:
                boto3.client("s3").create_bucket(Bucket="going-away")
                break
            except botocore.exceptions.EndpointConnectionError:
                assert time.monotonic() < deadline, "the moto server did not start"
                time.sleep(0.2)
        store = open_store("s3://going-away/sd")
        store.write_bytes("images/aa/first.png", b"first")
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    with pytest.raises(StoreError) as stopped:
        store.write_bytes("images/ab/second.png", b"second")
    assert str(stopped.value) == (
        f"cannot write at s3://going-away/sd/images/ab/second.png: the S3 endpoint {endpoint} stopped answering "
        "(no connection); once it answers again, run again: what was written is kept, and a run makes only "
        "the images still missing"
    )
    assert isinstance(stopped.value, StoreUnavailable) and stopped.value.answered
    # A store opened since (the next step's) meets the same outage: the endpoint answered this process.
    with pytest.raises(StoreUnavailable) as reopened:
        open_store("s3://going-away/sd")
    assert "stopped answering (no connection)" in str(reopened.value) and reopened.value.answered
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StoreUnavailable) as never_opened:  # never answered: the endpoint itself may be wrong
        open_store("s3://going-away/sd")
    # It may be right and down, as for a run the daemon launches during an outage (a process of its own).
    assert str(never_opened.value).endswith(
        "(check AWS_ENDPOINT_URL and AWS_REGION; if they are right, the S3 service is down or out of reach: "
        "run again once it answers)"
    )
    assert not never_opened.value.answered


def _dropping_endpoint(held: list) -> str:
    """An endpoint whose connections are never answered, as on a network that drops packets: a socket
    whose accept queue is full (Linux drops the next connections' SYNs)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    held.append(server)
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(server.getsockname())
        held.append(filler)
    time.sleep(0.2)
    return f"http://127.0.0.1:{server.getsockname()[1]}"


def test_every_s3_client_gives_up_connecting_after_seconds_not_a_minute(monkeypatch):
    # botocore waits 60 s for a connection, on each try: minutes a request on a network that drops packets.
    from sd_assets.environment import open_store_from_environment
    from sd_assets.orchestration.s3_resources import S3ArtifactStoreResource, S3ClientResource

    held: list = []
    endpoint = _dropping_endpoint(held)
    for name, value in [("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_REGION", "us-east-1"), ("AWS_ENDPOINT_URL", endpoint),
                        ("AWS_MAX_ATTEMPTS", "1")]:  # fmt: skip
        monkeypatch.setenv(name, value)
    assert isinstance(store_from_environment("s3://dropped/sd", {}).s3, S3ClientResource)
    clients = {
        "the runs'": S3ArtifactStoreResource(
            url="s3://dropped/sd", s3=S3ClientResource(region_name="us-east-1", endpoint_url=endpoint, max_attempts=1)
        ).open,
        "the command line's": lambda: open_store_from_environment("s3://dropped/sd"),
        "boto3's default": lambda: open_store("s3://dropped/sd"),
    }
    try:
        for name, open_it in clients.items():
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match=r"Connect timeout on endpoint URL"):
                open_it()
            assert time.monotonic() - started < 30, name
    finally:
        for sock in held:
            sock.close()


class _FailingS3(http.server.BaseHTTPRequestHandler):
    """An S3 service that is up but failing: the bucket opens, every other request gets 503 SlowDown."""

    status, code = 503, "SlowDown"

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_PUT(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = f"<Error><Code>{self.code}</Code><Message>Not now.</Message></Error>".encode()
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _serving(handler: type[http.server.BaseHTTPRequestHandler], monkeypatch) -> Iterator[str]:
    """An S3 service played by ``handler`` on loopback, the standard AWS variables pointing at it;
    yields its endpoint."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    for name, value in [("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_REGION", "us-east-1"), ("AWS_ENDPOINT_URL", endpoint)]:  # fmt: skip
        monkeypatch.setenv(name, value)
    try:
        yield endpoint
    finally:
        server.shutdown()


def test_a_service_that_answers_503_to_every_try_is_an_outage_to_wait_out(monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    with _serving(_FailingS3, monkeypatch) as endpoint:
        store = open_store("s3://failing/sd")
        with pytest.raises(StoreUnavailable) as failing:
            store.write_bytes("images/aa/one.png", b"one")
    assert failing.value.answered and failing.value.problem == str(failing.value).partition("; once")[0]
    assert str(failing.value) == (
        f"cannot write at s3://failing/sd/images/aa/one.png: the S3 service at {endpoint} answered SlowDown "
        "(overloaded or failing) to every try; once it recovers, run again: what was written is kept, and a run "
        "makes only the images still missing"
    )


class _LackingS3(_FailingS3):
    """An S3-compatible service without a feature a request asks for: 501 NotImplemented, every time."""

    status, code = 501, "NotImplemented"


def test_a_service_that_answers_501_refuses_the_request_it_is_no_outage(monkeypatch):
    # botocore does not try a 501 again, and waiting does not change the answer: a StoreError, not
    # an outage a step would wait 3.5 minutes for.
    with _serving(_LackingS3, monkeypatch):
        store = open_store("s3://lacking/sd")
        with pytest.raises(StoreError) as refused:
            store.write_bytes("images/aa/one.png", b"one")
    assert not isinstance(refused.value, StoreUnavailable)
    assert str(refused.value) == "cannot write at s3://lacking/sd/images/aa/one.png: NotImplemented"


class _CuttingS3(http.server.BaseHTTPRequestHandler):
    """An S3 service whose connection is lost while it sends an object: 10 of its 1,000 bytes come."""

    protocol_version = "HTTP/1.1"

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.send_header("ETag", '"cut"')
        self.end_headers()
        self.wfile.write(b"PAR1" + b"x" * 6)
        self.close_connection = True

    def log_message(self, *args):
        pass


def test_a_reply_cut_short_after_the_bucket_opened_is_an_outage_not_a_setting(monkeypatch):
    # A service restarting while it sends a catalog or a PNG: not a setting to check, a read to try again.
    with _serving(_CuttingS3, monkeypatch) as endpoint:
        store = open_store("s3://cutting/sd")
        with pytest.raises(StoreUnavailable) as cut:
            store.read_bytes("catalog/banksy.parquet")
    assert cut.value.answered
    assert str(cut.value) == (
        f"cannot read at s3://cutting/sd/catalog/banksy.parquet: the S3 endpoint {endpoint} stopped answering (the "
        "reply was cut short); once it answers again, run again: what was written is kept, and a run makes only "
        "the images still missing"
    )


def test_rebuild_catalog_through_a_blip_leaves_the_catalog_as_it_was(bucket):
    # A catalog that could not be read for the network's sake is not the file's fault: set aside and
    # rebuilt from the PNGs, it would lose the row of an image deleted since.
    from sd_assets.domain import catalog
    from sd_assets_tests.test_catalog_and_gallery import _provenance, _row

    row = _row("alan turing", "Banksy")
    store = open_store(f"s3://{bucket}/sd")
    catalog.write_pending(store, "Banksy", "run-000001", [catalog.catalog_record(_provenance(row, "run"), "")])
    catalog.merge_catalog(store, "Banksy", [])
    blips = []

    def blip(request, **kwargs):  # the first read of the catalog gets no connection, and no second try
        if not blips and "/catalog/" in request.url:
            blips.append(request.url)
            raise botocore.exceptions.EndpointConnectionError(endpoint_url=request.url)

    def client():
        made = boto3.client("s3", config=botocore.config.Config(retries={"total_max_attempts": 1}))
        made.meta.events.register("before-send.s3.GetObject", blip)
        return made

    with pytest.raises(StoreUnavailable):
        rebuild_catalogs(S3Store(f"s3://{bucket}/sd", client))

    assert blips and read_catalog(store)["key"].tolist() == [row.key]
    assert not list(store.list_keys("catalog/unreadable/"))

# --- whole runs on S3 ----------------------------------------------------------------------------


def test_two_styles_on_s3_then_a_corrupted_model_object(bucket, tmp_path, instance):
    grid_path = write_grid(tmp_path)
    url = f"s3://{bucket}/grid"
    environ = {"SD_ASSETS_STORAGE": url, "SD_ASSETS_MODEL_CACHE": str(tmp_path / "node-cache")}
    # With an S3 store, workers on every node read the subject lists from the bucket.
    boto3.client("s3").upload_file(str(tmp_path / "subjects" / "people.txt"), bucket, "grid/subjects/people.txt")

    first = materialize_style(grid_path, "Banksy", instance, **environ)
    second = materialize_style(grid_path, "Andy Warhol", instance, **environ)

    weights = _metadata(first, "model_weights")
    assert weights["cache"] == "built" and weights["location"].startswith(f"s3://{bucket}/grid/models/")
    assert _metadata(second, "model_weights")["cache"] == "cached"
    assert _metadata(second, "model_weights")["bytes_downloaded"] == 0
    assert _metadata(second, "model_weights")["bytes_hashed"] == 0, "unchanged objects are not read again"
    # The first run on this node copies the model down; the second finds the verified copy.
    assert _metadata(first, "style_images")["model_bytes_copied"] == weights["model_bytes"] > 0
    assert _metadata(second, "style_images")["model_bytes_copied"] == 0
    assert _metadata(second, "style_images")["generated"] == 4
    cached = [p for p in (tmp_path / "node-cache").rglob("*") if p.is_file()]
    (tmp_path / "plain").write_text("a file as open() makes it")
    usual = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert cached and {stat.S_IMODE(p.stat().st_mode) for p in cached} == {usual}, "other users' workers read it"

    raw = boto3.client("s3")
    keys = {o["Key"] for page in raw.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", ())}  # fmt: skip
    images = sorted(k for k in keys if k.startswith("grid/images/") and k.endswith(".png"))
    assert len(images) == 8  # 2 styles x 2 subjects x 2 images
    for key in images:
        data = raw.get_object(Bucket=bucket, Key=key)["Body"].read()
        with Image.open(io.BytesIO(data)) as image:
            provenance = json.loads(image.text[PROVENANCE_CHUNK])
        assert provenance["key"] in key and provenance["model_id"] == "tiny-random"

    index = raw.get_object(Bucket=bucket, Key="grid/gallery/index.html")
    assert index["ContentType"].startswith("text/html")
    html = index["Body"].read().decode()
    links = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert links and not [link for link in links if "://" in link or link.startswith("/")]
    assert "banksy/page-1.html" in links and "andy-warhol/page-1.html" in links
    for link in links:  # every page and image link resolves to an object in the bucket
        if link.endswith((".png", ".html")):
            assert posixpath.normpath(posixpath.join("grid/gallery", link)) in keys, link
    # The catalog's paths are the images' objects.
    paths = read_catalog(open_store(url))["path"]
    assert sorted(paths) == [f"s3://{bucket}/{key}" for key in images]
    # A notebook shows the images a search finds, read from the bucket.
    shown = show_images(read_catalog(open_store(url)), open_store(url))
    inline = {base64.b64encode(raw.get_object(Bucket=bucket, Key=key)["Body"].read()).decode() for key in images}
    assert (shown.shown, shown.unreadable) == (8, 0)
    assert set(re.findall(r'src="data:image/png;base64,([^"]+)"', shown.html)) == inline

    catalog_bytes = raw.get_object(Bucket=bucket, Key="grid/catalog/banksy.parquet")["Body"].read()
    catalog = pd.read_parquet(io.BytesIO(catalog_bytes))
    assert len(catalog) == 4 and set(catalog["style"]) == {"Banksy"}
    assert all(path.startswith(f"s3://{bucket}/grid/images/") for path in catalog["path"])
    # A lost catalog comes back from the PNGs in the bucket, row for row.
    raw.delete_object(Bucket=bucket, Key="grid/catalog/banksy.parquet")
    rebuild = rebuild_catalogs(open_store(url))
    assert [(r.catalog, r.rows, r.recovered_from_png) for r in rebuild.reports] == [("catalog/banksy.parquet", 4, 4)]
    assert rebuild.errors == [] and (rebuild.images, rebuild.catalogs) == (8, 1)
    rebuilt = pd.read_parquet(io.BytesIO(raw.get_object(Bucket=bucket, Key="grid/catalog/banksy.parquet")["Body"].read()))
    pd.testing.assert_frame_equal(rebuilt, catalog)

    store = open_store(url)
    ref = read_model_ref(store, load_grid(grid_path).model)
    manifest = json.loads(store.read_text(ref.prefix + MANIFEST))
    assert {ref.prefix + f["path"] for f in manifest["files"]} | {ref.prefix + MANIFEST, ref.prefix + VERIFIED} == {
        k.removeprefix("grid/") for k in keys if k.startswith("grid/" + ref.prefix)
    }
    for entry in manifest["files"]:
        assert len(store.read_bytes(ref.prefix + entry["path"])) == entry["bytes"]
        assert store.sha256(ref.prefix + entry["path"]) == entry["sha256"]

    # Corrupt one weights object, keeping its size, as a bad disk or a stray upload would.
    unet = next(f for f in manifest["files"] if f["path"].startswith("unet/") and f["path"].endswith(".safetensors"))
    object_key = f"grid/{ref.prefix}{unet['path']}"
    good = raw.get_object(Bucket=bucket, Key=object_key)["Body"].read()
    raw.put_object(Bucket=bucket, Key=object_key, Body=b"\0" * len(good))

    # A new node refuses to load it ...
    with pytest.raises(ModelError, match=re.escape(unet["path"]) + ".*does not match its manifest"):
        local_model_folder(store, ref, tmp_path / "new-node")
    assert not (tmp_path / "new-node" / "tiny-random" / ref.revision / MANIFEST).exists()

    # ... and the next run's model_weights finds it and rebuilds the cache.
    rebuilt = _metadata(materialize_style(grid_path, "Banksy", instance, **environ), "model_weights")
    assert rebuilt["cache"] == "built"
    assert unet["path"] in rebuilt["rebuilt_because"] and "sha256" in rebuilt["rebuilt_because"]
    assert raw.get_object(Bucket=bucket, Key=object_key)["Body"].read() == good
    # The new node keeps the files it already verified and fetches the rest, the sound unet included.
    copy = local_model_folder(store, ref, tmp_path / "new-node")
    assert unet["bytes"] <= copy.bytes_copied < weights["model_bytes"]
    assert (copy.folder / unet["path"]).read_bytes() == good and (copy.folder / MANIFEST).is_file()


def test_an_s3_store_without_subject_lists_says_where_to_put_them(bucket):
    source = StoreSource(open_store(f"s3://{bucket}/empty"))
    with pytest.raises(GridError, match=rf"no \*\.txt files\); .*aws s3 cp subjects/ s3://{bucket}/empty/subjects/"):
        read_subject_lists(source, 100)


def test_subject_lists_in_s3_are_read_again_only_when_rewritten(bucket):
    store = open_store(f"s3://{bucket}/lists")
    store.write_text("subjects/people.txt", "alan turing\n")
    source = StoreSource(store)
    first = scan_subject_lists(source, {}, max_subjects=100)
    assert [sl.subjects for sl in first.changed] == [("alan turing",)] and first.read == 1
    unchanged = scan_subject_lists(source, first.state, max_subjects=100)
    assert unchanged.read == 0 and unchanged.changed == []
    store.write_text("subjects/people.txt", "grace hopper\n")  # same size, new ETag
    rewritten = scan_subject_lists(source, unchanged.state, max_subjects=100)
    assert rewritten.read == 1 and [sl.subjects for sl in rewritten.changed] == [("grace hopper",)]


def test_a_runs_steps_fetch_each_subject_list_once_until_it_is_rewritten(bucket):
    store = open_store(f"s3://{bucket}/fetches")
    for i in range(5):
        store.write_text(f"subjects/list-{i}.txt", f"subject {i}\n")
    gets: list[str] = []
    store.client.meta.events.register(
        "before-parameter-build.s3.GetObject", lambda params, **_: gets.append(params["Key"])
    )
    # grid_inputs, prompt_grid and gallery_index each read the lists, each with a source of its own.
    for _ in range(3):
        read = read_subject_lists(StoreSource(store), 100)
        assert [sl.subjects for sl in read.lists] == [(f"subject {i}",) for i in range(5)]
    assert sorted(gets) == [f"fetches/subjects/list-{i}.txt" for i in range(5)]
    store.write_text("subjects/list-3.txt", "grace hopper\n")  # a new ETag: fetched again
    read = read_subject_lists(StoreSource(store), 100)
    assert read.lists[3].subjects == ("grace hopper",) and gets[5:] == ["fetches/subjects/list-3.txt"]


def test_a_list_rewritten_between_listing_and_reading_is_not_remembered_under_its_old_tag(bucket):
    store = open_store(f"s3://{bucket}/race")
    store.write_text("subjects/people.txt", "alan turing\n")
    source = StoreSource(store)
    source.listing()  # the tag of "alan turing"
    store.write_text("subjects/people.txt", "ada lovelace\n")  # rewritten before it is read
    assert source.read("people.txt") == b"ada lovelace\n"
    store.write_text("subjects/people.txt", "alan turing\n")  # put back: S3 gives it the first tag again
    assert read_subject_lists(StoreSource(store), 100).lists[0].subjects == ("alan turing",)


class _Outage:
    """The network between a worker and S3 going down, as the S3 client meets it: once the ``after``-th
    image has been written, no request connects, until a step opens the bucket again (``ends``) or ever."""

    def __init__(self, after: int, ends: bool):
        self.after, self.ends = after, ends
        self.down = False
        self.image_writes: dict[str, int] = {}
        self.failed = 0
        self._lock = threading.Lock()

    def before_send(self, request, event_name: str, **kwargs):
        operation = event_name.rsplit(".", 1)[-1]
        with self._lock:
            if self.down and self.ends and operation == "HeadBucket":
                self.down = False
            if self.down:
                self.failed += 1
                raise botocore.exceptions.EndpointConnectionError(endpoint_url=request.url)
            if operation == "PutObject" and "/images/" in request.url:
                self.image_writes[request.url] = self.image_writes.get(request.url, 0) + 1
                self.down = sum(self.image_writes.values()) == self.after


class _DownAsTheRunStarts:
    """S3 out of reach as a run's process starts: its first ``requests`` find no connection (2: the
    first request, and botocore's one try again)."""

    def __init__(self, requests: int):
        self.left, self.failed = requests, 0
        self._lock = threading.Lock()

    def before_send(self, request, event_name: str, **kwargs):
        with self._lock:
            if self.left:
                self.left -= 1
                self.failed += 1
                raise botocore.exceptions.EndpointConnectionError(endpoint_url=request.url)


def _run_through(outage, tmp_path, instance, bucket, s3_endpoint, monkeypatch):
    """generate_images for Banksy (8 images, 2 a batch) on S3 whose client goes through ``outage``."""
    from dagster_aws.s3 import S3Resource

    from sd_assets.definitions import GENERATE_JOB, build_definitions
    from sd_assets.orchestration import assets
    from sd_assets.orchestration.s3_resources import S3ArtifactStoreResource

    class S3ThroughOutage(S3Resource):
        def get_client(self):
            client = super().get_client()
            client.meta.events.register("before-send.s3", outage.before_send)
            return client

    monkeypatch.setattr(assets, "OUTAGE_RETRY_SECONDS", (0.1, 0.1, 0.1))
    grid_path = write_grid(tmp_path, images_per_prompt=4, batch_size=2)
    url = f"s3://{bucket}/grid"
    boto3.client("s3").upload_file(str(tmp_path / "subjects" / "people.txt"), bucket, "grid/subjects/people.txt")
    defs = build_definitions({"SD_ASSETS_GRID": str(grid_path), "SD_ASSETS_DEVICE": "cpu", "SD_ASSETS_STORAGE": url,
                              "SD_ASSETS_MODEL_CACHE": str(tmp_path / "node-cache")})  # fmt: skip
    # botocore's own tries off (max_attempts=1): each request meets the outage once.
    s3 = S3ThroughOutage(region_name="us-east-1", endpoint_url=s3_endpoint, max_attempts=1)
    return defs.resolve_job_def(GENERATE_JOB).execute_in_process(
        partition_key="Banksy", instance=instance, raise_on_error=False,
        resources={"store": S3ArtifactStoreResource(url=url, s3=s3)},
    )  # fmt: skip


def _retries(result) -> list[str]:
    return [event.step_key for event in result.all_events if event.event_type_value == "STEP_UP_FOR_RETRY"]


def test_a_step_whose_store_stops_answering_is_tried_again_and_makes_only_what_is_missing(
    bucket, s3_endpoint, tmp_path, instance, monkeypatch
):
    outage = _Outage(after=3, ends=True)
    result = _run_through(outage, tmp_path, instance, bucket, s3_endpoint, monkeypatch)

    assert result.success
    assert outage.failed >= 1 and _retries(result) == ["style_images"]
    [warning] = [e.message for e in instance.all_logs(result.run_id) if "trying again in" in e.message]
    # Its gpu slot is free meanwhile: another run's style_images may take it and hold the try back.
    assert f"the S3 endpoint {s3_endpoint} stopped answering (no connection); trying again in 0.1 s (retry 1 of " \
        "3), or later if every slot of the pool gpu is taken by then (it gives its slot up meanwhile): what was " \
        "written is kept, and the next try makes only what is still missing" in warning
    assert "run again" not in warning
    images = _metadata(result, "style_images")
    assert (images["images"], images["skipped"], images["generated"]) == (8, 3, 5)
    # Every image written once: the try after the outage made only those the store lacked.
    assert len(outage.image_writes) == 8 and set(outage.image_writes.values()) == {1}
    listed = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="grid/images/")["Contents"]
    assert len([item for item in listed if item["Key"].endswith(".png")]) == 8
    catalog = read_catalog(open_store(f"s3://{bucket}/grid"))
    assert len(catalog) == 8 and set(catalog["run_id"]) == {result.run_id}


class _DownAsTheImagesStepOpens:
    """The network between a worker and S3 lost while style_images opens the bucket (botocore's try
    and its one try again), the first opening after prompt_grid wrote the style's rows: grid_inputs
    and model_weights opened it before."""

    def __init__(self):
        self.rows_written, self.failed = False, 0

    def before_send(self, request, event_name: str, **kwargs):
        operation = event_name.rsplit(".", 1)[-1]
        if operation == "HeadBucket" and self.rows_written and self.failed < 2:
            self.failed += 1
            raise botocore.exceptions.EndpointConnectionError(endpoint_url=request.url)
        self.rows_written |= operation == "PutObject" and "/grids/" in request.url


def test_a_store_gone_between_two_steps_of_a_run_is_an_outage_too(bucket, s3_endpoint, tmp_path, instance,
                                                                   monkeypatch):  # fmt: skip
    # Each step opens its own store: the endpoint its first request finds gone answered the steps before.
    outage = _DownAsTheImagesStepOpens()
    result = _run_through(outage, tmp_path, instance, bucket, s3_endpoint, monkeypatch)

    assert outage.failed == 2 and result.success and _retries(result) == ["style_images"]
    [warning] = [e.message for e in instance.all_logs(result.run_id) if "trying again in" in e.message]
    assert f"cannot open the bucket at s3://{bucket}/grid: the S3 endpoint {s3_endpoint} stopped answering (no " \
        "connection); trying again in 0.1 s (retry 1 of 3)" in warning
    assert _metadata(result, "style_images")["generated"] == 8


class _DownDuringTheModelUpload:
    """The network to S3 lost once model_weights has uploaded two files of the model, until a step
    opens the bucket again."""

    def __init__(self):
        self.uploaded: list[str] = []
        self.down, self.failed = False, 0

    def before_send(self, request, event_name: str, **kwargs):
        operation = event_name.rsplit(".", 1)[-1]
        if self.down and operation == "HeadBucket":
            self.down = False
        if self.down:
            self.failed += 1
            raise botocore.exceptions.EndpointConnectionError(endpoint_url=request.url)
        if operation == "PutObject" and "/models/" in request.url:
            self.uploaded.append(request.url.split("?")[0])
            self.down = len(self.uploaded) == 2 and not self.failed


def test_a_model_upload_cut_short_is_uploaded_whole_by_the_next_try(bucket, s3_endpoint, tmp_path, instance,
                                                                     monkeypatch):  # fmt: skip
    outage = _DownDuringTheModelUpload()
    result = _run_through(outage, tmp_path, instance, bucket, s3_endpoint, monkeypatch)

    assert result.success and outage.failed >= 1 and _retries(result) == ["model_weights"]
    [warning] = [e.message for e in instance.all_logs(result.run_id) if "trying again in" in e.message]
    assert warning.endswith(": the next try keeps the store's copy of the model if it is whole, else uploads the "
                            "model again")  # fmt: skip
    # The try after the outage found no manifest for the two files it had: it uploaded every file again.
    weights = _metadata(result, "model_weights")
    assert weights["cache"] != "cached" and "manifest.json missing" in weights["rebuilt_because"]
    assert len(set(outage.uploaded)) == len(outage.uploaded) - 2
    assert _metadata(result, "style_images")["generated"] == 8


def test_a_store_that_does_not_answer_again_fails_the_step_after_three_more_tries(
    bucket, s3_endpoint, tmp_path, instance, monkeypatch
):
    outage = _Outage(after=3, ends=False)
    result = _run_through(outage, tmp_path, instance, bucket, s3_endpoint, monkeypatch)

    assert not result.success
    assert _retries(result) == ["style_images"] * 3
    [failure] = [event for event in result.all_events if event.is_step_failure]
    assert failure.step_key == "style_images"
    assert "cannot open the bucket at s3://" in str(failure.step_failure_data.error)


def test_a_run_started_during_an_outage_waits_for_a_store_that_served_the_runs_before(
    bucket, s3_endpoint, tmp_path, instance, monkeypatch
):
    # The daemon starts each run in a process of its own, which has not seen the store answer; the
    # instance holds model_weights materialized in that store by an earlier run.
    from sd_assets.domain import s3_store

    assert _run_through(_DownAsTheRunStarts(0), tmp_path, instance, bucket, s3_endpoint, monkeypatch).success
    monkeypatch.setattr(s3_store, "_ANSWERED_ENDPOINTS", set())  # the next run's process
    outage = _DownAsTheRunStarts(2)
    result = _run_through(outage, tmp_path, instance, bucket, s3_endpoint, monkeypatch)

    assert result.success and outage.failed == 2
    [step] = _retries(result)
    [warning] = [e.message for e in instance.all_logs(result.run_id) if "trying again in" in e.message]
    assert warning.startswith(f"cannot open the bucket at s3://{bucket}/grid: Could not connect to the endpoint URL")
    assert "(it served this instance's runs before); trying again in 0.1 s (retry 1 of 3)" in warning
    # The step that met the outage wrote nothing: its warning does not speak of images kept or missing.
    assert step == "grid_inputs"
    assert warning.endswith(": it writes nothing: the next try reads the subject lists again")

    # On an instance with no run in that store, the endpoint may be mistyped: the step fails at once.
    monkeypatch.setattr(s3_store, "_ANSWERED_ENDPOINTS", set())
    with dg.instance_for_test() as new_instance:
        result = _run_through(_DownAsTheRunStarts(2), tmp_path, new_instance, bucket, s3_endpoint, monkeypatch)
        assert not result.success and _retries(result) == []


def test_a_run_on_another_endpoint_than_the_earlier_runs_is_not_waited_for(
    bucket, s3_endpoint, tmp_path, instance, monkeypatch
):
    # The same store URL on an endpoint that never answered (AWS_ENDPOINT_URL mistyped, or left out
    # of the daemon's environment): the setting is what changed, not the service.
    from sd_assets.domain import s3_store

    assert _run_through(_DownAsTheRunStarts(0), tmp_path, instance, bucket, s3_endpoint, monkeypatch).success
    monkeypatch.setattr(s3_store, "_ANSWERED_ENDPOINTS", set())
    mistyped = f"http://127.0.0.1:{free_port()}"
    result = _run_through(_DownAsTheRunStarts(0), tmp_path, instance, bucket, mistyped, monkeypatch)

    assert not result.success and _retries(result) == []
    assert not [e.message for e in instance.all_logs(result.run_id) if "it served this instance's runs" in e.message]
    failures = {e.step_key: str(e.step_failure_data.error) for e in result.all_events if e.is_step_failure}
    assert sorted(failures) == ["grid_inputs", "model_weights"]  # model_weights not run once grid_inputs failed
    assert f"Could not connect to the endpoint URL: \"{mistyped}/" in failures["grid_inputs"]
    assert "not run: grid_inputs failed in this run" in failures["model_weights"]


def _never_answering_run(tmp_path, instance, monkeypatch):
    """generate_images for Banksy on an S3 endpoint that nothing listens on."""
    from sd_assets.definitions import GENERATE_JOB, build_definitions
    from sd_assets.orchestration import assets

    monkeypatch.setattr(assets, "OUTAGE_RETRY_SECONDS", (0.1, 0.1, 0.1))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    for name, value in [("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_REGION", "us-east-1")]:  # fmt: skip
        monkeypatch.setenv(name, value)
    grid_path = write_grid(tmp_path)
    defs = build_definitions({"SD_ASSETS_GRID": str(grid_path), "SD_ASSETS_DEVICE": "cpu",
                              "SD_ASSETS_STORAGE": "s3://nowhere/grid"})  # fmt: skip
    return defs.resolve_job_def(GENERATE_JOB).execute_in_process(
        partition_key="Banksy", instance=instance, raise_on_error=False
    )


def test_a_store_that_never_answered_is_not_waited_for(tmp_path, instance, monkeypatch):
    # The endpoint is likely mistyped: the step fails at once, without three waits for it.
    result = _never_answering_run(tmp_path, instance, monkeypatch)

    assert not result.success and _retries(result) == []
    failures = {e.step_key: str(e.step_failure_data.error) for e in result.all_events if e.is_step_failure}
    assert sorted(failures) == ["grid_inputs", "model_weights"]  # model_weights not run once grid_inputs failed
    assert "cannot open the bucket at s3://nowhere/grid: Could not connect" in failures["grid_inputs"]
    assert "not run: grid_inputs failed in this run" in failures["model_weights"]


def test_a_store_that_never_answered_fails_its_step_with_its_own_error_when_the_instance_cannot_be_asked(
    tmp_path, instance, monkeypatch
):
    # Whether earlier runs used the store is asked of the instance; its database restarting too
    # must not put its error in place of the store's (the endpoint to check, or to wait for).
    def database_restarting(*args, **kwargs):
        raise RuntimeError("could not connect to server: the instance database is restarting")

    monkeypatch.setattr(instance, "get_latest_materialization_event", database_restarting)
    monkeypatch.setattr(instance, "all_logs", database_restarting)  # nor whether grid_inputs failed: each step tells
    result = _never_answering_run(tmp_path, instance, monkeypatch)

    assert not result.success and _retries(result) == []
    failures = {e.step_key: e.step_failure_data.error.cause for e in result.all_events if e.is_step_failure}
    assert sorted(failures) == ["grid_inputs", "model_weights"]
    assert {error.cls_name for error in failures.values()} == {"StoreUnavailable"}
    assert all("cannot open the bucket at s3://nowhere/grid: Could not connect" in error.message
               for error in failures.values())  # fmt: skip
