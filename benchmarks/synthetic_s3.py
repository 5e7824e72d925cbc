"""A read-only S3 stand-in for benchmarks whose buckets hold up to millions of objects.

moto's S3 server stores every object and rebuilds the key list for every ListObjectsV2 page,
so a bucket of 1M objects takes hours to fill and to list. Here a bucket is a name and a
count: object ``i`` is ``img/{i:07d}.jpg``, made on the fly from its index and never stored,
so listing 1M objects costs what 1,000 pages of XML cost and nothing is held per object.

Served (path-style addressing, what botocore uses with an ``http://127.0.0.1`` endpoint):

- ``GET /{bucket}?list-type=2`` with ``prefix``, ``start-after``, ``continuation-token``,
  ``max-keys`` (at most 1000), ``delimiter`` and ``encoding-type=url``; with
  ``--page-latency-ms LOW-HIGH`` each page is answered after a uniform delay in that range
  (S3 takes about 0.3 s for a page of 1,000 keys), while other requests wait in parallel;
- ``GET /{bucket}?location``; ``HEAD /{bucket}``;
- ``GET /{bucket}/{key}`` (``Range: bytes=a-b`` too) and ``HEAD /{bucket}/{key}``.

Each object's bytes start like a JPEG (``\\xff\\xd8\\xff``) and differ per key, so each
object has its own ETag (the MD5 of its bytes, as S3 gives for a single-part upload):
rekbatch calls once per distinct ETag and size, equal ETags would skip the calls.

Run it with ``python -m benchmarks.synthetic_s3 --port 0 --bucket NAME=COUNT``; it prints
its URL on the first line of stdout and serves until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import random
import re
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from urllib.parse import quote
from xml.sax.saxutils import escape

from aiohttp import web

KEY_PREFIX = "img/"
KEY_DIGITS = 7
MAX_KEYS = 1000
LAST_MODIFIED = "2024-01-02T03:04:05.000Z"
HTTP_DATE = "Tue, 02 Jan 2024 03:04:05 GMT"
S3_NS = "http://s3.amazonaws.com/doc/2006-03-01/"
_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)$")


def object_key(index: int) -> str:
    return f"{KEY_PREFIX}{index:0{KEY_DIGITS}d}.jpg"


def object_body(key: str) -> bytes:
    """Deterministic JPEG-looking bytes, distinct per key, all of one size (518 bytes)."""
    digest = hashlib.md5(key.encode()).digest()
    return b"\xff\xd8\xff\xe0" + digest * 32 + b"\xff\xd9"


def object_etag(key: str) -> str:
    return hashlib.md5(object_body(key)).hexdigest()


OBJECT_SIZE = len(object_body(object_key(0)))


def _first_at_or_after(count: int, bound: str, *, strictly_after: bool) -> int:
    """The index of the first key >= ``bound`` (> with ``strictly_after``): keys are in S3's
    order (UTF-8 binary, here plain ASCII) because their numbers have a fixed width."""
    lo, hi = 0, count
    while lo < hi:
        mid = (lo + hi) // 2
        key = object_key(mid)
        if key < bound or (strictly_after and key == bound):
            lo = mid + 1
        else:
            hi = mid
    return lo


def _token(index: int) -> str:
    return base64.urlsafe_b64encode(f"i:{index}".encode()).decode()


def _untoken(token: str) -> int | None:
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    if not text.startswith("i:") or not text[2:].isdigit():
        return None
    return int(text[2:])


def _error(status: int, code: str, message: str, resource: str) -> web.Response:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{escape(message)}</Message>"
        f"<Resource>{escape(resource)}</Resource><RequestId>synthetic</RequestId></Error>"
    )
    return web.Response(status=status, text=body, content_type="application/xml")


def _xml(body: str) -> web.Response:
    return web.Response(
        text='<?xml version="1.0" encoding="UTF-8"?>\n' + body, content_type="application/xml"
    )


class SyntheticS3:
    def __init__(
        self,
        buckets: dict[str, int],
        region: str,
        page_latency: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        self.buckets = dict(buckets)
        self.region = region
        self.requests: dict[str, int] = {}
        self.page_latency = page_latency
        self._rng = random.Random(20261202)

    def _count(self, what: str) -> None:
        self.requests[what] = self.requests.get(what, 0) + 1

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/_synthetic/stats", self._stats)
        # aiohttp routes HEAD to GET handlers: the handlers leave the body out for HEAD.
        app.router.add_get("/{bucket}", self._bucket)
        app.router.add_get("/{bucket}/", self._bucket)
        app.router.add_get("/{bucket}/{key:.+}", self._object)
        return app

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response({"buckets": self.buckets, "requests": self.requests})

    async def _bucket(self, request: web.Request) -> web.Response:
        bucket = request.match_info["bucket"]
        count = self.buckets.get(bucket)
        if count is None:
            self._count("NoSuchBucket")
            if request.method == "HEAD":
                return web.Response(status=404)
            return _error(404, "NoSuchBucket", "The specified bucket does not exist", bucket)
        query = request.query
        if request.method == "HEAD":
            self._count("HeadBucket")
            return web.Response(headers={"x-amz-bucket-region": self.region})
        if "location" in query:
            self._count("GetBucketLocation")
            return _xml(
                f'<LocationConstraint xmlns="{S3_NS}">{escape(self.region)}</LocationConstraint>'
            )
        if query.get("list-type") == "2":
            self._count("ListObjectsV2")
            low, high = self.page_latency
            if high > 0:
                await asyncio.sleep(self._rng.uniform(low, high))
            return self._list(bucket, count, query)
        self._count("Unsupported")
        return _error(501, "NotImplemented", "only ListObjectsV2 is served", bucket)

    def _list(self, bucket: str, count: int, query: Mapping[str, str]) -> web.Response:
        prefix = query.get("prefix", "")
        delimiter = query.get("delimiter", "")
        if delimiter and delimiter in KEY_PREFIX[len(prefix) :] and KEY_PREFIX.startswith(prefix):
            # Every key sits in the one folder: it is the whole answer.
            common = KEY_PREFIX[: KEY_PREFIX.index(delimiter, len(prefix)) + 1]
            return _xml(
                f'<ListBucketResult xmlns="{S3_NS}"><Name>{escape(bucket)}</Name>'
                f"<Prefix>{escape(prefix)}</Prefix><KeyCount>1</KeyCount>"
                f"<MaxKeys>{MAX_KEYS}</MaxKeys><IsTruncated>false</IsTruncated>"
                f"<Delimiter>{escape(delimiter)}</Delimiter>"
                f"<CommonPrefixes><Prefix>{escape(common)}</Prefix></CommonPrefixes>"
                "</ListBucketResult>"
            )
        start_after = query.get("start-after", "")
        token = query.get("continuation-token")
        url_encoded = query.get("encoding-type") == "url"
        try:
            max_keys = min(int(query.get("max-keys", MAX_KEYS)), MAX_KEYS)
        except ValueError:
            return _error(400, "InvalidArgument", "max-keys must be an integer", bucket)
        if max_keys < 0:
            return _error(400, "InvalidArgument", "max-keys must not be negative", bucket)
        if token is not None:
            start = _untoken(token)
            if start is None:
                return _error(
                    400, "InvalidArgument", "The continuation token provided is incorrect", bucket
                )
        else:
            start = _first_at_or_after(count, prefix, strictly_after=False)
            if start_after:
                start = max(start, _first_at_or_after(count, start_after, strictly_after=True))
        enc: Callable[[str], str] = (lambda s: quote(s, safe="/")) if url_encoded else escape
        items: list[str] = []
        index = start
        while index < count and len(items) < max_keys:
            key = object_key(index)
            if not key.startswith(prefix):
                index = count  # keys with one prefix are contiguous: past them, none follow
                break
            items.append(
                f"<Contents><Key>{enc(key)}</Key><LastModified>{LAST_MODIFIED}</LastModified>"
                f"<ETag>&quot;{object_etag(key)}&quot;</ETag><Size>{OBJECT_SIZE}</Size>"
                "<StorageClass>STANDARD</StorageClass></Contents>"
            )
            index += 1
        truncated = index < count and object_key(index).startswith(prefix)
        parts = [
            f'<ListBucketResult xmlns="{S3_NS}">',
            f"<Name>{escape(bucket)}</Name>",
            f"<Prefix>{enc(prefix)}</Prefix>",
            f"<KeyCount>{len(items)}</KeyCount>",
            f"<MaxKeys>{max_keys}</MaxKeys>",
            f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>",
        ]
        if url_encoded:
            parts.append("<EncodingType>url</EncodingType>")
        if token is not None:
            parts.append(f"<ContinuationToken>{escape(token)}</ContinuationToken>")
        if start_after:
            parts.append(f"<StartAfter>{enc(start_after)}</StartAfter>")
        if truncated:
            parts.append(f"<NextContinuationToken>{_token(index)}</NextContinuationToken>")
        parts.extend(items)
        parts.append("</ListBucketResult>")
        return _xml("".join(parts))

    def _index_of(self, bucket: str, key: str) -> int | None:
        count = self.buckets.get(bucket, 0)
        digits = key[len(KEY_PREFIX) : -len(".jpg")]
        if (
            key.startswith(KEY_PREFIX)
            and key.endswith(".jpg")
            and len(digits) == KEY_DIGITS
            and digits.isdigit()
            and int(digits) < count
        ):
            return int(digits)
        return None

    async def _object(self, request: web.Request) -> web.Response:
        bucket, key = request.match_info["bucket"], request.match_info["key"]
        head = request.method == "HEAD"
        self._count("HeadObject" if head else "GetObject")
        if bucket not in self.buckets:
            if head:
                return web.Response(status=404)
            return _error(404, "NoSuchBucket", "The specified bucket does not exist", bucket)
        if self._index_of(bucket, key) is None:
            if head:
                return web.Response(status=404)
            return _error(404, "NoSuchKey", "The specified key does not exist.", key)
        body = object_body(key)
        headers = {
            "ETag": f'"{hashlib.md5(body).hexdigest()}"',
            "Last-Modified": HTTP_DATE,
            "Accept-Ranges": "bytes",
            "Content-Type": "image/jpeg",
        }
        status = 200
        wanted = request.headers.get("Range")
        if wanted:
            match = _RANGE_RE.match(wanted.strip())
            if match is None or match.group(1) == match.group(2) == "":
                return _error(416, "InvalidRange", "The requested range is not satisfiable", key)
            first_text, last_text = match.groups()
            size = len(body)
            if first_text:
                first = int(first_text)
                last = min(int(last_text), size - 1) if last_text else size - 1
            else:  # a suffix: the last N bytes
                first, last = max(size - int(last_text), 0), size - 1
            if first >= size or first > last:
                return _error(416, "InvalidRange", "The requested range is not satisfiable", key)
            headers["Content-Range"] = f"bytes {first}-{last}/{size}"
            body = body[first : last + 1]
            status = 206
        if head:
            headers["Content-Length"] = str(len(body))
            return web.Response(status=status, headers=headers)
        return web.Response(status=status, body=body, headers=headers)


def _parse_bucket(text: str) -> tuple[str, int]:
    name, sep, count = text.partition("=")
    if not sep or not name or not count.isdigit() or int(count) >= 10**KEY_DIGITS:
        raise argparse.ArgumentTypeError(f"expected NAME=COUNT (COUNT < 10^7), got {text!r}")
    return name, int(count)


async def _serve(server: SyntheticS3, host: str, port: int) -> None:
    runner = web.AppRunner(server.app(), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        bound = runner.addresses[0][1]
        print(f"http://{host}:{bound}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.synthetic_s3", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--region", default="eu-west-1")
    parser.add_argument(
        "--bucket", action="append", type=_parse_bucket, default=[], metavar="NAME=COUNT"
    )
    parser.add_argument("--page-latency-ms", default="0-0", metavar="LOW-HIGH")
    args = parser.parse_args(argv)
    if not args.bucket:
        parser.error("give at least one --bucket NAME=COUNT")
    low, _, high = args.page_latency_ms.partition("-")
    latency = (float(low) / 1000, float(high or low) / 1000)
    server = SyntheticS3(dict(args.bucket), args.region, latency)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(server, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
