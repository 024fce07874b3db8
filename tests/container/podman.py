"""Podman as the tests drive it, and the base images bootstrapped from Debian's package mirror.

No image registry is reachable from these machines and Docker's engine is absent, so (as
``shared/reference/containers.md`` found): Debian's podman with runc and cgroupfs, ulimits at or below the
current hard limits (``containers.conf`` beside this file, handed to every podman call and to podman-compose
through ``CONTAINERS_CONF``), images in Docker format so ``HEALTHCHECK`` is kept (``BUILDAH_FORMAT``), and a
``debootstrap``-ed bookworm minbase under two stand-ins: one for ``python:3.11-slim-bookworm`` (the Dockerfile's
``PYTHON_IMAGE``) and one for ``postgres`` (docker-compose.yml's database).

The stand-ins are cached outside the repository, keyed by their recipe: in podman's own image store, and as
``podman save`` archives under ``$POINTGATE_CI_CACHE`` (default ``/var/cache/pointgate-ci``) so a wiped image
store costs a ``podman load``, not a bootstrap. Concurrent test sessions serialise on a lock file there.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
IMAGES = HERE / "images"
CONTAINERS_CONF = HERE / "containers.conf"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

# the debootstrap recipe; part of every cache key
SUITE, VARIANT, MIRROR = "bookworm", "minbase", "http://deb.debian.org/debian"
# what the bootstrap leaves behind that no image needs (the .debs it installed, apt's lists and caches)
ROOTFS_TRIM = (
    "var/cache/apt/archives",
    "var/cache/apt/pkgcache.bin",
    "var/cache/apt/srcpkgcache.bin",
    "var/lib/apt/lists",
)
RECIPE_VERSION = "1"


def environment() -> dict[str, str]:
    """The environment for every podman (and podman-compose) call."""
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF), "BUILDAH_FORMAT": "docker"}


def podman(
    *args: str, timeout: float = 120, check: bool = True, stdin: IO[bytes] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``podman ARGS``; on ``check``, a failure raises with podman's stderr in the message."""
    result = subprocess.run(
        ["podman", *args],  # noqa: S607 (podman from PATH is what the stage tests)
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=environment(),
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}")
    return result


def unusable_reason() -> str | None:
    """Why podman cannot run here (the container tests are skipped with this reason), or None."""
    if shutil.which("podman") is None:
        return "podman is not installed (.ci/run installs it with apt-get as root)"
    if os.geteuid() != 0:
        return "the container stage needs root: rootful podman, and debootstrap for the base image"
    if shutil.which("debootstrap") is None:
        return "debootstrap is not installed (.ci/run installs it with apt-get as root)"
    try:
        info = podman("info", "--format", "{{.Host.OCIRuntime.Name}}", timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"podman info failed: {exc}"
    if info.returncode != 0:
        return f"podman cannot run here: {info.stderr.strip().splitlines()[-1:]}"
    return None


def image_exists(tag: str) -> bool:
    return podman("image", "exists", tag, check=False).returncode == 0


def image_size(tag: str) -> int:
    """The image's size in bytes, as podman reports it (uncompressed, all layers)."""
    return int(podman("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())


def cache_dir() -> Path:
    """Where the bootstrapped base images are kept between runs (outside the repository)."""
    path = Path(os.environ.get("POINTGATE_CI_CACHE", "/var/cache/pointgate-ci"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path``: one test session bootstraps at a time, the others then find the cache."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


@dataclass
class BaseImages:
    """The three bootstrapped images, their tags (recipe-keyed) and how each was obtained this session."""

    minbase: str
    python: str
    postgres: str
    how: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def for_recipe(cls) -> BaseImages:
        minbase_key = _digest(f"{RECIPE_VERSION} {SUITE} {VARIANT} {MIRROR} {ROOTFS_TRIM}".encode())
        python_key = _digest(
            minbase_key.encode(), (IMAGES / "python.Containerfile").read_bytes(), CA_BUNDLE.read_bytes()
        )
        postgres_key = _digest(
            minbase_key.encode(),
            (IMAGES / "postgres.Containerfile").read_bytes(),
            (IMAGES / "postgres-entrypoint.sh").read_bytes(),
        )
        return cls(
            minbase=f"localhost/pointgate-ci/debian-minbase:{minbase_key}",
            python=f"localhost/pointgate-ci/python:{python_key}",
            postgres=f"localhost/pointgate-ci/postgres:{postgres_key}",
        )

    def ensure(self) -> BaseImages:
        """Make all three exist in podman's store: already there, loaded from the cache, or built (and cached)."""
        cache = cache_dir()
        with locked(cache / ".lock"):
            self._ensure(self.python, cache, lambda: self._build_standin("python.Containerfile", self.python, cache))
            self._ensure(
                self.postgres, cache, lambda: self._build_standin("postgres.Containerfile", self.postgres, cache)
            )
        return self

    def _ensure(self, tag: str, cache: Path, build: Callable[[], None]) -> None:
        if tag in self.how:
            return  # the minbase, already ensured for the other stand-in
        began = time.monotonic()
        archive = cache / (tag.rsplit("/", 1)[1].replace(":", "-") + ".tar")
        if image_exists(tag):
            self.how[tag] = "in podman's image store"
            if not archive.exists():  # a cache dir of its own (POINTGATE_CI_CACHE) starts filled
                self._save(tag, archive)
        elif archive.exists() and podman("load", "-i", str(archive), timeout=600, check=False).returncode == 0:
            self.how[tag] = f"loaded from {archive}"
        else:
            build()
            self._save(tag, archive)
            self.how[tag] = f"built and saved to {archive}"
        if not image_exists(tag):
            raise AssertionError(f"{tag} missing after {self.how[tag]}")
        self.seconds[tag] = round(time.monotonic() - began, 1)

    @staticmethod
    def _save(tag: str, archive: Path) -> None:
        partial = archive.with_suffix(".tar.partial")
        partial.unlink(missing_ok=True)
        podman("save", "--format", "docker-archive", "-o", str(partial), tag, timeout=600)
        partial.replace(archive)

    def _build_standin(self, containerfile: str, tag: str, cache: Path) -> None:
        self._ensure(self.minbase, cache, self._bootstrap)
        with tempfile.TemporaryDirectory(prefix="pointgate-ci-") as tmp:
            context = Path(tmp)
            for name in ("python.Containerfile", "postgres.Containerfile", "postgres-entrypoint.sh"):
                shutil.copy2(IMAGES / name, context / name)
            # pip inside the project's build reaches PyPI through this machine's TLS setup: its CA bundle
            shutil.copy2(CA_BUNDLE, context / "ca-bundle.crt")
            podman(
                "build", "--network", "host", "--build-arg", f"BASE={self.minbase}",
                "-f", str(context / containerfile), "-t", tag, str(context),
                timeout=1200,
            )  # fmt: skip

    def _bootstrap(self) -> None:
        with tempfile.TemporaryDirectory(prefix="pointgate-ci-rootfs-", dir=cache_dir()) as tmp:
            rootfs = Path(tmp) / "rootfs"
            result = subprocess.run(
                ["debootstrap", f"--variant={VARIANT}", SUITE, str(rootfs), MIRROR],  # noqa: S607
                capture_output=True,
                text=True,
                timeout=1800,
                check=False,
            )
            if result.returncode != 0:
                raise AssertionError(f"debootstrap failed ({result.returncode}):\n{result.stdout[-3000:]}")
            for relative in ROOTFS_TRIM:
                path = rootfs / relative
                if path.is_dir():
                    for child in path.iterdir():
                        if child.is_file():
                            child.unlink()
                else:
                    path.unlink(missing_ok=True)
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)  # noqa: S607
            try:
                podman("import", "-", self.minbase, stdin=tar.stdout, timeout=600)
            finally:
                assert tar.stdout is not None
                tar.stdout.close()
                tar.wait(60)


def build_project_image(base: BaseImages, tag: str) -> float:
    """Build the repository's Dockerfile, as shipped, with the stand-in as PYTHON_IMAGE; return seconds taken."""
    began = time.monotonic()
    podman(
        "build", "--network", "host", "--build-arg", f"PYTHON_IMAGE={base.python}", "-t", tag, str(ROOT),
        timeout=1800,
    )  # fmt: skip
    return round(time.monotonic() - began, 1)


def inspect(name: str, template: str) -> str:
    """``podman inspect --format TEMPLATE NAME``, stripped."""
    return podman("inspect", "--format", template, name).stdout.strip()


def inspect_json(name: str) -> dict[str, object]:
    data: list[dict[str, object]] = json.loads(podman("inspect", name).stdout)
    return data[0]
