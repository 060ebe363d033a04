"""Where a build reads and writes: a local folder, or any fsspec URL (``s3://``, ``gs://``,
``memory://``) through a local working folder.

Stages read and write a local folder, as on a local disk. When ``out`` is a URL, that folder
is a cache (``storage.cache_dir``, one sub-folder per URL) and the store is the truth:

* **Resume from the store.** A build first fetches what the store holds and the cache lacks
  (``_work`` files, versions), so a fresh machine resumes where a killed one stopped. A file
  fetched damaged reads as absent and is computed again (:func:`pedsynth.tasks.shards`).
* **One commit protocol.** An object store has no rename, but an object appears whole or not
  at all. Each committed work file is uploaded right after its local commit, its rejects
  before it (so an output object is there only with its rejects). A version's files go up
  first and its ``manifest.json`` last (the commit record); :func:`pedsynth.verify.verify`
  then reads the version back from the store (every checksum), and only then is the
  ``latest`` object written: one small text object naming the version, so a reader of
  ``latest`` sees the old version or the new one, never a half-uploaded one.
* **Credentials** come from the environment (the standard ``AWS_*`` variables, including
  ``AWS_ENDPOINT_URL``, which s3fs and botocore read themselves) or from a Prefect block
  (``storage.credentials_block``); never from the config file, and they are never logged.

A source given as a URL is mirrored into the cache the same way (only files whose size or
ETag changed are fetched again), and the stages read the mirror.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from pedsynth.atomic import atomic_write_bytes, temp_name
from pedsynth.errors import PreflightError

log = logging.getLogger(__name__)

MIRROR_FILE = ".pedsynth-store.json"  # in a working folder: the URL it mirrors (no secrets)
SOURCE_INDEX = ".pedsynth-source-index.json"  # in a source mirror: what each file was fetched as
LOCAL_PROTOCOLS = frozenset({"file", "local"})


def is_url(path: str | Path) -> bool:
    """Whether ``path`` names a store other than the local file system."""
    text = str(path)
    protocol, sep, _ = text.partition("://")
    return bool(sep) and protocol.lower() not in LOCAL_PROTOCOLS


def default_cache_dir() -> Path:
    return Path(os.environ.get("PEDSYNTH_CACHE_DIR", "~/.cache/pedsynth/stores")).expanduser()


def credentials_from_block(name: str) -> dict[str, Any]:
    """fsspec options from a Prefect block (``block-type-slug/name``): an ``AwsCredentials``
    block of prefect-aws, or any block with the same field names."""
    from prefect.blocks.core import Block

    try:
        block = Block.load(name)
    except Exception as exc:  # Prefect raises ValueError or httpx errors, with its own text
        raise PreflightError(
            f"storage.credentials_block {name!r} cannot be loaded: {exc}"
        ) from None
    return block_options(block)


def block_options(block: Any) -> dict[str, Any]:
    """The s3fs options a credentials block holds (secrets unwrapped here and nowhere else)."""

    def plain(value: Any) -> Any:
        return value.get_secret_value() if hasattr(value, "get_secret_value") else value

    options: dict[str, Any] = {}
    for field_name, option in (
        ("aws_access_key_id", "key"),
        ("aws_secret_access_key", "secret"),
        ("aws_session_token", "token"),
    ):
        value = plain(getattr(block, field_name, None))
        if value:
            options[option] = value
    client: dict[str, Any] = {}
    if region := getattr(block, "region_name", None):
        client["region_name"] = region
    parameters = getattr(block, "aws_client_parameters", None)
    endpoint = getattr(parameters, "endpoint_url", None) or getattr(block, "endpoint_url", None)
    if endpoint:
        client["endpoint_url"] = str(endpoint)
    if client:
        options["client_kwargs"] = client
    if not options:
        raise PreflightError(
            f"block {type(block).__name__} holds no aws_access_key_id, aws_secret_access_key "
            "or endpoint; use an AwsCredentials block"
        )
    return options


def url_fs(url: str, credentials_block: str | None = None) -> tuple[Any, str]:
    """The fsspec file system and root path of ``url`` (a local path: the local file system)."""
    import fsspec

    options = credentials_from_block(credentials_block) if credentials_block else {}
    try:
        return fsspec.core.url_to_fs(str(url), **options)
    except ImportError as exc:  # e.g. s3fs not installed
        raise PreflightError(
            f"{url}: {exc}. Install the file system's package (for s3://: pip install s3fs)"
        ) from None
    except ValueError as exc:
        raise PreflightError(f"{url}: {exc}") from None


def _slug(url: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", url.partition("://")[2])[-60:].strip("_")
    return f"{readable}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


def working_folder(out: str, cache_dir: str | Path | None = None) -> Path:
    """The local folder a build of ``out`` writes: ``out`` itself when it is a local path,
    else its folder in the cache."""
    if not is_url(out):
        return Path(out)
    base = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return base / _slug(out)


@dataclass(frozen=True)
class Mirror:
    """A store (``url``) and the local working folder that mirrors it."""

    url: str
    local: Path
    credentials_block: str | None = None

    @cached_property
    def _fs_root(self) -> tuple[Any, str]:
        return url_fs(self.url, self.credentials_block)

    @property
    def fs(self) -> Any:
        return self._fs_root[0]

    @property
    def root(self) -> str:
        return self._fs_root[1].rstrip("/")

    def remote(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def rel(self, local_path: str | Path) -> str:
        return Path(local_path).resolve().relative_to(self.local.resolve()).as_posix()

    def save_marker(self) -> None:
        self.local.mkdir(parents=True, exist_ok=True)
        record = {"url": self.url, "credentials_block": self.credentials_block}
        atomic_write_bytes(json.dumps(record).encode(), self.local / MIRROR_FILE)

    def remote_files(self, prefix: str = "") -> dict[str, int]:
        """Relative path -> size of every object under ``prefix`` in the store."""
        base = self.remote(prefix).rstrip("/") if prefix else self.root
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        root = self.root + "/"
        return {
            name[len(root) :] if name.startswith(root) else name: int(info.get("size") or 0)
            for name, info in found.items()
            if info.get("type") != "directory"
        }

    def push(self, *local_paths: str | Path) -> None:
        """Upload committed files, in the order given (each object appears whole or not)."""
        for path in local_paths:
            rel = self.rel(path)
            try:
                self.fs.put_file(str(path), self.remote(rel))
            except OSError as exc:
                raise OSError(f"{self.remote(rel)}: upload failed: {exc}") from exc

    def sync_up(self, prefix: str) -> int:
        """Upload the working folder's committed files under ``prefix`` that the store lacks
        (a run killed between a local commit and its upload); rejects files go before the
        outputs they belong to. Returns the number uploaded."""
        folder = self.local / prefix
        if not folder.is_dir():
            return 0
        have = self.remote_files(prefix)
        files = [
            p
            for p in folder.rglob("*")
            if p.is_file()
            and not p.name.startswith(".")
            and have.get(self.rel(p)) != p.stat().st_size
        ]
        files.sort(key=lambda p: (not p.name.endswith(".rejects.parquet"), str(p)))
        self.push(*files)
        return len(files)

    def pull(self, prefixes: Iterable[str] = ("_work", "versions", "latest")) -> int:
        """Fetch what the store holds and the working folder lacks (or holds at another size);
        returns the number of files fetched."""
        fetched = 0
        for prefix in prefixes:
            for rel, size in sorted(self.remote_files(prefix).items()):
                target = self.local / rel
                if rel == "latest":
                    continue  # a pointer object, read by latest_remote_version()
                if target.is_file() and target.stat().st_size == size:
                    continue
                _fetch(self.fs, self.remote(rel), target)
                fetched += 1
        if fetched:
            log.info("fetched %d file(s) from %s into %s", fetched, self.url, self.local)
        return fetched

    def latest(self) -> str | None:
        """The version the store's ``latest`` object names (None when there is none)."""
        from pedsynth.schemas.manifest import LATEST

        try:
            return self.fs.cat_file(self.remote(LATEST)).decode().strip().rpartition("/")[2]
        except FileNotFoundError:
            return None

    def publish(self, version: str) -> None:
        """Upload a finished local version, manifest last; verify it in the store; then point
        the store's ``latest`` at it and remove the store's versions the working folder
        pruned."""
        from pedsynth.schemas.manifest import LATEST, MANIFEST_FILE, VERSIONS_DIR
        from pedsynth.verify import verify

        if self.latest() == version:
            return  # published by an earlier run (a rerun with nothing to do)
        folder = self.local / VERSIONS_DIR / version
        have = self.remote_files(f"{VERSIONS_DIR}/{version}")
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        manifest = folder / MANIFEST_FILE
        body = [p for p in files if p != manifest]
        for path in [*body, manifest]:
            if have.get(self.rel(path)) != path.stat().st_size:
                self.push(path)
        report = verify(f"{self.url.rstrip('/')}/{VERSIONS_DIR}/{version}", decode_images=False)
        if not report.sound:
            lines = "; ".join(f"{p.file}: {p.problem}" for p in report.problems[:3])
            raise RuntimeError(
                f"{self.url}: version {version} does not verify in the store: {lines}"
            )
        self.fs.pipe_file(self.remote(LATEST), f"{VERSIONS_DIR}/{version}\n".encode())
        versions_here = self.local / VERSIONS_DIR
        local_versions = {p.name for p in versions_here.iterdir() if p.is_dir()}
        stored = {rel.split("/")[1] for rel in self.remote_files(VERSIONS_DIR) if "/" in rel}
        for old in sorted(stored - local_versions - {version}):
            self.fs.rm(self.remote(f"{VERSIONS_DIR}/{old}"), recursive=True)
            log.info("removed version %s from %s", old, self.url)


def _fetch(fs: Any, remote: str, target: Path) -> None:
    """Download one object to ``target`` through a temporary name (a killed fetch leaves no
    half file under the real name)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(target)
    try:
        fs.get_file(remote, str(tmp))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def open_output(
    out: str, cache_dir: str | Path | None = None, credentials_block: str | None = None
) -> Mirror | None:
    """Set up the working folder of ``out``; for a URL, fetch what the store holds and return
    its :class:`Mirror` (None for a local output)."""
    if not is_url(out):
        return None
    from pedsynth.schemas.manifest import MANIFEST_FILE, VERSIONS_DIR
    from pedsynth.versions import point_latest

    mirror = Mirror(out, working_folder(out, cache_dir), credentials_block)
    mirror.save_marker()
    mirror.pull()
    latest = mirror.latest()
    if latest and (mirror.local / VERSIONS_DIR / latest / MANIFEST_FILE).is_file():
        point_latest(mirror.local, latest)  # what the new version is compared with
    _mirrors[mirror.local.resolve()] = mirror
    return mirror


_mirrors: dict[Path, Mirror | None] = {}


def mirror_of(local_out: str | Path) -> Mirror | None:
    """The store a working folder mirrors (from its marker file), or None for a local output;
    how a worker that was handed the working folder finds where to upload."""
    key = Path(local_out).resolve()
    if key not in _mirrors:
        marker = key / MIRROR_FILE
        if marker.is_file():
            record = json.loads(marker.read_text())
            _mirrors[key] = Mirror(record["url"], key, record.get("credentials_block"))
        else:
            _mirrors[key] = None
    return _mirrors[key]


def push_committed(local_out: str | Path, *paths: str | Path) -> None:
    """Upload committed files of a working folder to its store (nothing for a local output)."""
    mirror = mirror_of(local_out)
    if mirror is not None:
        mirror.push(*paths)


def sync_source(
    url: str, cache_dir: str | Path | None = None, credentials_block: str | None = None
) -> Path:
    """Mirror a source URL into the cache; fetch only files whose size or ETag changed since
    the last mirror (so unchanged images keep their local fingerprint) and remove local files
    the store no longer has."""
    fs, root = url_fs(url, credentials_block)
    local = working_folder(url, cache_dir or default_cache_dir() / "sources")
    local.mkdir(parents=True, exist_ok=True)
    index_path = local / SOURCE_INDEX
    index: dict[str, str] = json.loads(index_path.read_text()) if index_path.is_file() else {}
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        found = {}
    if not found:
        raise PreflightError(f"{url}: no files there")
    prefix = root.rstrip("/") + "/"
    current: dict[str, str] = {}
    fetched = 0
    for name, info in sorted(found.items()):
        if info.get("type") == "directory" or not name.startswith(prefix):
            continue
        rel = name[len(prefix) :]
        stamp = f"{info.get('size')}:{info.get('ETag') or info.get('etag') or info.get('mtime')}"
        current[rel] = stamp
        target = local / rel
        if index.get(rel) != stamp or not target.is_file():
            _fetch(fs, name, target)
            fetched += 1
    for rel in set(index) - set(current):
        (local / rel).unlink(missing_ok=True)
    atomic_write_bytes(json.dumps(current, sort_keys=True).encode(), index_path)
    log.info("source %s: %d files, %d fetched into %s", url, len(current), fetched, local)
    return local


def check_store(url: str, *, cfg_block: str | None, write: bool) -> None:
    """One line now, before Prefect starts, when the store cannot be reached, holds nothing
    (a source) or refuses a write (an output)."""
    fs, root = url_fs(url, cfg_block)
    try:
        if not write:
            if not fs.exists(root):
                raise PreflightError(f"source {url}: nothing there")
            return
        probe = f"{root.rstrip('/')}/.pedsynth-write-check"
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except PreflightError:
        raise
    except (OSError, ValueError) as exc:  # botocore and s3fs errors derive from OSError
        what = "cannot be read" if not write else "cannot be written"
        raise PreflightError(f"{url} {what}: {type(exc).__name__}: {exc}") from None
