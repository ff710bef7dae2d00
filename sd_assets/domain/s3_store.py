"""The S3 backend of the artifact store: ``s3://bucket/prefix``, through a boto3 S3 client.

Owns mapping store keys to object keys under the prefix, content types (so the bucket serves
the gallery as a static site), and turning boto3's errors into ``StoreError`` messages that say
what to fix. A single PUT (and a completed multipart upload) replaces an object as a whole, so
every write is all-or-nothing without a temporary object; downloads land in a temporary file
that is renamed into place.

Credentials, region and endpoint come from boto3's own resolution (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``, profiles, instance roles)
or from the client the caller makes (``sd_assets.environment``'s adds ``AWS_REGION``), never from the grid file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from sd_assets.domain.errors import StoreError, StoreUnavailable
from sd_assets.domain.store import ArtifactStore, ObjectVersion, _check_key, replacing

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".png": "image/png",
    ".json": "application/json",
    ".jsonl": "application/jsonl",
    ".parquet": "application/vnd.apache.parquet",
    ".txt": "text/plain; charset=utf-8",
}
_CHUNK = 8 * 1024 * 1024
# Below botocore's default connection pool of 10, so no thread waits for a connection.
LISTING_THREADS = 8
_MISSING = {"404", "NoSuchKey", "NotFound"}
# How an endpoint that answered when the bucket was opened stops answering (the service restarted,
# its network lost), as a message says it.
_STOPPED_ANSWERING = {
    EndpointConnectionError: "no connection",
    ConnectTimeoutError: "no connection in time",
    ReadTimeoutError: "no reply in time",
    ConnectionClosedError: "the connection was closed",
    # The connection lost while a reply's body was read (botocore reads it only as the caller does).
    ResponseStreamingError: "the reply was cut short",
    IncompleteReadError: "the reply was cut short",
}
# Answers of a service that is overloaded or failing, not refusing: botocore has already tried each
# request again a few times when one of them reaches the store. Those statuses are the ones it tries
# again; another 5xx (501 NotImplemented: a feature the service lacks) answers the same every time.
_FAILING = {"SlowDown", "RequestTimeout", "Throttling", "ThrottlingException"}
_FAILING_STATUSES = {500, 502, 503, 504}
_RUN_AGAIN = "what was written is kept, and a run makes only the images still missing"
# The endpoints that have answered this process. Each step of a run opens a store of its own: one
# that finds the endpoint gone since an earlier step opened it meets an outage, not a wrong setting.
_ANSWERED_ENDPOINTS: set[str] = set()
# Seconds a client waits to connect. A connection to S3 takes milliseconds; botocore's default of
# 60 s on each of its tries held every request for minutes on a network that drops packets.
CONNECT_TIMEOUT_SECONDS = 5


def client_config(**settings: Any):
    """botocore's ``Config`` for the store's S3 clients: ``settings``, by default a ``connect_timeout``
    of ``CONNECT_TIMEOUT_SECONDS``."""
    from botocore.config import Config

    return Config(**{"connect_timeout": CONNECT_TIMEOUT_SECONDS, **settings})


def content_type(key: str) -> str:
    """The Content-Type a browser needs for ``key`` (by extension; binary when unknown)."""
    return CONTENT_TYPES.get(os.path.splitext(key)[1].lower(), "application/octet-stream")


def parse_s3_url(url: str) -> tuple[str, str]:
    """'s3://bucket/some/prefix' -> ('bucket', 'some/prefix/'); the prefix may be ''.

    Raises:
        StoreError: no bucket, or a bucket name S3 would refuse.
    """
    rest = url.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise StoreError(f"storage {url!r}: no bucket; write s3://bucket or s3://bucket/prefix")
    if not (3 <= len(bucket) <= 63) or not all(c.islower() or c.isdigit() or c in ".-" for c in bucket):
        raise StoreError(
            f"storage {url!r}: {bucket!r} is not a valid S3 bucket name "
            "(3-63 characters: lower-case letters, digits, '.' and '-')"
        )
    prefix = prefix.strip("/")
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise StoreError(
            f"storage {url!r}: the prefix {prefix!r} has an empty, '.' or '..' part; write s3://bucket/some/prefix"
        )
    return bucket, f"{prefix}/" if prefix else ""


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class S3Store(ArtifactStore):
    """A prefix in an S3 bucket (or any S3-compatible service, via ``AWS_ENDPOINT_URL``)."""

    def __init__(self, url: str, make_client: Callable[[], Any]):
        """``make_client`` makes the boto3 S3 client, here, so that what boto3 refuses as it
        makes one (an endpoint that is not a URL) is a StoreError like any other."""
        self.bucket, self.prefix = parse_s3_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        with self._errors("open the bucket"):
            self.client = make_client()
            self.client.head_bucket(Bucket=self.bucket)
        _ANSWERED_ENDPOINTS.add(self.client.meta.endpoint_url)

    @contextlib.contextmanager
    def _errors(self, action: str, key: str = "") -> Iterator[None]:
        """Turn boto3's exceptions into one StoreError that names the object and the fix."""
        where = self.location(key)
        try:
            yield
        except (NoCredentialsError, PartialCredentialsError):
            raise StoreError(
                f"cannot {action} at {where}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or run with an instance role)"
            ) from None
        except ClientError as exc:
            code = _error_code(exc)
            if code in ("NoSuchBucket",) or (code in _MISSING and not key):
                raise StoreError(
                    f"cannot {action}: bucket {self.bucket!r} does not exist at {self.client.meta.endpoint_url}; "
                    "create it there, or fix the storage URL, or AWS_ENDPOINT_URL if that is not your S3 service"
                ) from None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise StoreError(
                    f"cannot {action} at {where}: access denied ({code}); check AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY and the bucket policy"
                ) from None
            if code in _FAILING or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in _FAILING_STATUSES:
                problem = (
                    f"cannot {action} at {where}: the S3 service at {self.client.meta.endpoint_url} answered "
                    f"{code} (overloaded or failing) to every try"
                )
                raise self._unavailable(problem, f"once it recovers, run again: {_RUN_AGAIN}") from None
            raise StoreError(f"cannot {action} at {where}: {code or exc}") from None
        except BotoCoreError as exc:
            stopped = [text for kind, text in _STOPPED_ANSWERING.items() if isinstance(exc, kind)]
            if stopped and self._has_answered():  # it answered before: not the setting, the service
                problem = (
                    f"cannot {action} at {where}: the S3 endpoint {self.client.meta.endpoint_url} stopped "
                    f"answering ({stopped[0]})"
                )
                raise self._unavailable(problem, f"once it answers again, run again: {_RUN_AGAIN}") from None
            problem = f"cannot {action} at {where}: {exc}"
            if not stopped:
                raise StoreError(f"{problem} (check AWS_ENDPOINT_URL and AWS_REGION)") from None
            # Never seen answering by this process: a wrong setting, or a run started during an outage.
            raise StoreUnavailable(
                f"{problem} (check AWS_ENDPOINT_URL and AWS_REGION; if they are right, the S3 service is down or "
                "out of reach: run again once it answers)", problem=problem, store=self.url, endpoint=self.endpoint(),
            ) from None
        except ValueError as exc:
            # botocore's plain ValueError for an endpoint without a scheme or host: "Invalid endpoint: <url>"
            endpoint = str(exc).removeprefix("Invalid endpoint: ")
            if endpoint == str(exc):
                raise
            # botocore also reads AWS_ENDPOINT_URL_S3 and the AWS config's endpoint_url; name the one used.
            named = [name for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL") if os.environ.get(name) == endpoint]
            setting = f"{named[0]}={endpoint!r}" if named else f"the S3 endpoint {endpoint!r} (the AWS config's)"
            raise StoreError(
                f"cannot {action} at {where}: {setting} is not a URL; write it as http://host[:port] or https://host[:port]"
            ) from None

    def _unavailable(self, problem: str, advice: str) -> StoreUnavailable:
        """The outage ``problem`` of this store, whose endpoint has answered before, told with ``advice``."""
        return StoreUnavailable(
            f"{problem}; {advice}", answered=True, problem=problem, store=self.url, endpoint=self.endpoint()
        )

    def endpoint(self) -> str:
        client = getattr(self, "client", None)  # none yet when boto3 refused to make one
        return client.meta.endpoint_url if client is not None else ""

    def _has_answered(self) -> bool:
        """Whether this store's endpoint has answered this process, through this store or another."""
        return self.endpoint() in _ANSWERED_ENDPOINTS

    def _object_key(self, key: str) -> str:
        return self.prefix + _check_key(key)

    def _head(self, key: str) -> dict | None:
        with self._errors("read", key):
            try:
                return self.client.head_object(Bucket=self.bucket, Key=self._object_key(key))
            except ClientError as exc:
                if _error_code(exc) in _MISSING:
                    return None
                raise

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def read_bytes(self, key: str) -> bytes:
        return self.read_version(key)[0]

    def read_version(self, key: str) -> tuple[bytes, str | None]:
        with self._errors("read", key):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self._object_key(key))
                return response["Body"].read(), response["ETag"]
            except ClientError as exc:
                if _error_code(exc) in _MISSING:
                    raise StoreError(f"{self.location(key)} does not exist") from None
                raise

    def write_bytes(self, key: str, data: bytes) -> None:
        with self._errors("write", key):
            self.client.put_object(
                Bucket=self.bucket, Key=self._object_key(key), Body=data, ContentType=content_type(key)
            )

    def _listing(self, prefix: str) -> Iterator[tuple[str, dict]]:
        """(store key, S3's entry) for every object under ``prefix``, page by page."""
        if prefix:
            _check_key(prefix)
        paginator = self.client.get_paginator("list_objects_v2")
        with self._errors("list", prefix):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for item in page.get("Contents", ()):
                    yield item["Key"][len(self.prefix):], item

    def list_keys(self, prefix: str) -> Iterator[str]:
        for key, _ in self._listing(prefix):
            yield key

    def versions(self, prefix: str) -> dict[str, ObjectVersion]:
        """Sizes and ETags from one listing: S3 gives each write of an object a new ETag."""
        _check_key(prefix)
        return {key: ObjectVersion(item["Size"], item["ETag"]) for key, item in self._listing(prefix)}

    def existing(self, keys: list[str]) -> set[str]:
        """One listing per folder-like prefix the keys share (images fan out over 256 of them),
        ``LISTING_THREADS`` at a time: one after another, an unchanged style's 256 round trips
        were most of its run."""
        wanted = set(keys)
        folders = sorted({key.rpartition("/")[0] for key in wanted})

        def listed(folder: str) -> list[str]:
            return [k for k in self.list_keys(f"{folder}/" if folder else "") if k in wanted]

        with ThreadPoolExecutor(max_workers=LISTING_THREADS) as pool:
            return {key for found in pool.map(listed, folders) for key in found}

    def sha256(self, key: str) -> str:
        digest = hashlib.sha256()
        with self._errors("read", key):
            body = self.client.get_object(Bucket=self.bucket, Key=self._object_key(key))["Body"]
            for chunk in body.iter_chunks(_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def delete(self, key: str) -> None:
        with self._errors("delete", key):
            self.client.delete_object(Bucket=self.bucket, Key=self._object_key(key))

    def download_file(self, key: str, destination: Path) -> None:
        # The node's disk may refuse the copy (full, read-only, a file where a folder should be).
        with replacing(Path(destination), of=self.location(key)) as tmp, open(tmp, "wb") as handle:
            with self._errors("download", key):
                self.client.download_fileobj(self.bucket, self._object_key(key), handle)

    def upload_file(self, source: Path, key: str) -> None:
        # upload_file switches to multipart for large weights; S3 shows the object only once complete.
        with self._errors("upload", key):
            self.client.upload_file(
                str(source), self.bucket, self._object_key(key), ExtraArgs={"ContentType": content_type(key)}
            )

    def location(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}" if key else self.url
