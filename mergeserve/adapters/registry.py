"""A content-addressed store of expert LoRA adapters that can change while the server runs.

Layout under the root dir::

    manifest.json             {"format": 1, "version": N, "experts": {name: {...}}}
    objects/<sha256 hex>/     one copy of a PEFT LoRA dir, named by its content hash
    .lock                     flock'ed while a process has the registry open
    .write.lock, leases/      shared mode only: the writers' lock, and one file per leased
                              digest (flock'ed shared by every process that leases it)

Names are labels on content hashes, so the same weights added twice are stored once and
an engine can key its adapter cache on the digest. The manifest is the single commit
point: objects are renamed into place before the manifest that references them is
atomically replaced, so a crash at any step leaves the previous manifest valid, and the
next `open` deletes whatever no manifest references. Readers take the current immutable
`RegistrySnapshot` with a plain attribute read; a request that uses an expert's files
holds a `lease` (by name, or by the digest it resolved earlier), and `remove` deletes files
only once no lease holds them (the idea of SGLang's lora_registry).

Objects are collected by reference, never by the clock: a digest's files are deleted only
when, at that moment and under the writers' lock, no manifest entry and no lease (of any
process) refers to it. So a re-add of the same content while its removal waits simply
revives the object. An `open` that finds a manifest entry whose object is missing or
incomplete (files deleted by hand, a disk fault) drops that entry with a logged reason
and commits the repaired manifest, rather than refusing to open or leaving the name
stuck. Imports no server code and no vLLM.

Shared mode (`open(..., shared=True)`) lets several processes (server replicas) open one
root: writers take `.write.lock` and re-read the manifest before changing it, so no change
is lost and versions stay a sequence; `refresh()` adopts what another process committed;
leases are also flock'ed per digest, so no process deletes files another one is using,
and a lease taken from a stale snapshot after another process deleted the files fails
cleanly (the lessee re-checks the object under its flock); crash leftovers are collected
by an `open` that finds no other process there.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from mergeserve.adapters.peft_io import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DEFAULT_MAX_ADAPTER_BYTES,
    is_int,
    load_lora_factors,
    read_lora_dir,
    validate_adapter_name,
)
from mergeserve.errors import AdapterError, ConfigurationError
from mergeserve.failpoints import failpoint

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
OBJECTS = "objects"
MANIFEST_FORMAT = 1
DEFAULT_MAX_EXTRA_BYTES = 16 << 20
"""Cap on the files copied along with the adapter (README.md, examples.jsonl, card.json…)."""

_TMP = ".tmp-"
_LOCK = ".lock"
_WRITE_LOCK = ".write.lock"
_LEASES = "leases"
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_DIGEST_TAG = b"mergeserve-expert/1\n"
# Pickles are never loaded (see peft_io), so they are not worth storing either; this also
# drops the training_args.bin that Trainer output dirs carry.
_SKIPPED_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})

Validator = Callable[[Path], None]


class ExpertExistsError(AdapterError):
    """`add` was asked for a name that is taken, without replace=True."""

    status_code = 409
    error_type = "conflict_error"


class ExpertNotFoundError(AdapterError):
    """No expert of that name in the registry."""

    status_code = 404
    error_type = "not_found_error"

    def __init__(self, name: str):
        super().__init__(f"no expert named {name!r} in the registry", code="expert_not_found")
        self.name = name


class ExpertGoneError(ExpertNotFoundError):
    """A lease asked for content (a digest) that no manifest entry and no lease holds
    any more: its files are deleted, or about to be."""

    def __init__(self, digest: str, name: str | None = None):
        AdapterError.__init__(
            self,
            f"the expert content {digest[:12]}"
            + (f" (of {name!r})" if name else "")
            + " was removed from the registry",
            code="expert_not_found",
        )
        self.name = name or ""
        self.digest = digest


class ExpertBusyError(AdapterError, TimeoutError):
    """`remove` timed out waiting for in-flight requests; the removal itself took effect.

    The name is already gone from the manifest and from new snapshots; only the files
    outlive the call, and are deleted when the last lease on them ends (or by the next
    `open`). A TimeoutError too, so callers that only care about the wait can catch that.
    """

    status_code = 409
    error_type = "conflict_error"

    def __init__(self, message: str, snapshot: RegistrySnapshot, digest: str):
        super().__init__(message, code="expert_busy")
        self.snapshot = snapshot
        self.digest = digest


@dataclass(frozen=True)
class ExpertRef:
    """One name → content binding, as published in a snapshot; never mutated."""

    name: str
    digest: str
    """sha256 of the adapter's files: the identity an engine can cache on."""
    path: Path
    """objects/<digest>: a PEFT LoRA dir that stays in place while a lease holds it."""
    rank: int
    target_modules: tuple[str, ...]
    added_at: float
    """Seconds since the epoch when this name was bound to this digest."""
    size_bytes: int = 0
    base_model_name_or_path: str | None = None


@dataclass(frozen=True)
class RegistrySnapshot:
    """The registry at one version; readers keep using it while writers publish new ones."""

    version: int
    experts: Mapping[str, ExpertRef]
    names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    digests: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # A private sorted copy: the caller's dict can change later, this one never does.
        experts = {name: self.experts[name] for name in sorted(self.experts)}
        for name, ref in experts.items():
            if ref.name != name:
                raise ValueError(f"snapshot key {name!r} holds the expert named {ref.name!r}")
        object.__setattr__(self, "experts", MappingProxyType(experts))
        object.__setattr__(self, "names", tuple(experts))
        object.__setattr__(self, "digests", frozenset(r.digest for r in experts.values()))

    def __contains__(self, name: object) -> bool:
        return name in self.experts

    def __getitem__(self, name: str) -> ExpertRef:
        try:
            return self.experts[name]
        except KeyError:
            raise ExpertNotFoundError(name) from None

    def __len__(self) -> int:
        return len(self.experts)

    def get(self, name: str) -> ExpertRef | None:
        return self.experts.get(name)

    def _with(self, ref: ExpertRef) -> RegistrySnapshot:
        return RegistrySnapshot(self.version + 1, {**self.experts, ref.name: ref})

    def _without(self, name: str) -> RegistrySnapshot:
        return RegistrySnapshot(
            self.version + 1, {n: r for n, r in self.experts.items() if n != name}
        )


def _default_validator(path: Path, max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES) -> None:
    load_lora_factors(path, max_bytes=max_bytes)


class ExpertRegistry:
    """The on-disk expert store of one process, with leases for in-flight requests.

    Thread-safe. `add` and `remove` block (copying, fsync, waiting for leases): call them
    from a worker thread, never on an event loop. `snapshot()` and `lease()` are cheap.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        validator: Validator | None = None,
        *,
        max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
        max_extra_bytes: int = DEFAULT_MAX_EXTRA_BYTES,
        shared: bool = False,
    ):
        self._root = Path(root).resolve()
        self._shared = shared
        self._lease_fds: dict[str, int] = {}
        """Shared mode: the flock'ed lease file of each digest this process leases."""
        self._objects = self._root / OBJECTS
        self._manifest = self._root / MANIFEST
        self._max_adapter_bytes = max_adapter_bytes
        self._max_extra_bytes = max_extra_bytes
        self._validator: Validator = validator or (
            lambda p: _default_validator(p, max_adapter_bytes)
        )
        # Lock order: _write_lock, then _cond. _cond guards _snapshot's replacement,
        # _counts and _orphans; _write_lock serialises changes to the files.
        self._write_lock = threading.Lock()
        self._cond = threading.Condition(threading.Lock())
        self._counts: dict[str, int] = {}
        self._orphans: set[str] = set()
        """Unreferenced digests still leased: deleted when their last lease ends."""
        self._closed = False

        self._objects.mkdir(parents=True, exist_ok=True)
        self._lock_fd, alone = self._lock_root()
        self._write_fd = -1
        try:
            if shared:
                (self._root / _LEASES).mkdir(exist_ok=True)
                self._write_fd = os.open(self._root / _WRITE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            self._manifest_data: bytes | None = None
            self._snapshot = RegistrySnapshot(0, {})
            with self._file_lock():
                if self._manifest.exists():
                    self._snapshot = self._adopt_locked(self._manifest.read_bytes())
            if alone:
                self._collect_garbage()
            if shared:  # let the other replicas in
                fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
        except BaseException:
            os.close(self._lock_fd)
            if self._write_fd >= 0:
                os.close(self._write_fd)
            raise

    @classmethod
    def open(
        cls,
        root: str | os.PathLike[str],
        validator: Validator | None = None,
        *,
        max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
        max_extra_bytes: int = DEFAULT_MAX_EXTRA_BYTES,
        shared: bool = False,
    ) -> ExpertRegistry:
        """Open (creating if needed) the registry at `root`, removing crash leftovers.

        `validator` is called on each candidate adapter dir before it is committed and
        raises to refuse it; the default loads its factors (config, NaN/Inf, stray
        tensors, size). Only one process may have a root open at a time, unless every
        process opens it `shared` (module doc). Entries whose object is missing or
        incomplete are dropped, logged, and the repaired manifest committed.
        """
        return cls(
            root,
            validator,
            max_adapter_bytes=max_adapter_bytes,
            max_extra_bytes=max_extra_bytes,
            shared=shared,
        )

    @property
    def root(self) -> Path:
        return self._root

    def snapshot(self) -> RegistrySnapshot:
        """The current snapshot. Its object dirs may be deleted once it is superseded:
        hold a `lease` while using them."""
        return self._snapshot

    def usage(self) -> Mapping[str, int]:
        """Leases held per digest, a copy (for metrics and tests)."""
        with self._cond:
            return dict(self._counts)

    @contextlib.contextmanager
    def lease(
        self, names: Iterable[str] | None = None, *, digests: Iterable[str] | None = None
    ) -> Iterator[RegistrySnapshot]:
        """Keep the files of `names` (every expert when both are None), or of the
        content `digests`, on disk until exit.

        Yields the snapshot taken at entry; use only its refs inside the block. An
        unknown name raises ExpertNotFoundError before anything is held. A digest is
        leased as it is, never what its name points to now: a caller that resolved
        `name -> digest` earlier keeps exactly that content, or gets ExpertGoneError if
        no manifest entry and no lease holds that digest any more (its files may be gone).
        """
        if isinstance(names, str):
            names = (names,)
        with self._cond:
            # Taken under _cond so that unpublish(), which publishes under _cond, either
            # sees this lease's count or this lease sees the snapshot without the name.
            snap = self._snapshot
            if digests is not None:
                wanted = frozenset(digests)
                for d in wanted:
                    if d not in snap.digests and not self._counts.get(d):
                        raise ExpertGoneError(d)
            elif names is None:
                wanted = snap.digests
            else:
                wanted = frozenset(snap[n].digest for n in names)
            taken: list[str] = []
            try:
                for d in sorted(wanted):
                    if self._shared and d not in self._lease_fds:
                        self._lease_fds[d] = self._lease_shared(d)
                    self._counts[d] = self._counts.get(d, 0) + 1
                    taken.append(d)
            except BaseException:
                self._release_locked(frozenset(taken))
                raise
        try:
            yield snap
        finally:
            self._release(wanted)

    def _lease_shared(self, digest: str) -> int:
        """Shared mode: the flock'ed (shared) lease file of `digest`, taken only while its
        object is on disk (caller holds _cond).

        Another process deletes an object only while it holds the lease file's exclusive
        flock, and unlinks the lease file before releasing it. So once this process holds
        the shared flock of the file that is *still* at the lease path, and the object is
        there, no other process can delete it until this lease ends."""
        path = self._root / _LEASES / digest
        for _ in range(100):
            fd = self._lease_file(digest, fcntl.LOCK_SH)
            try:
                st = os.fstat(fd)
                try:
                    now = os.stat(path)
                except FileNotFoundError:
                    now = None
                if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                    os.close(fd)  # the deleter unlinked this file: take the new one
                    continue
                if not (self._objects / digest / ADAPTER_CONFIG).is_file():
                    os.close(fd)
                    raise ExpertGoneError(digest)
                return fd
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise
        raise AdapterError(f"could not lease {digest[:12]} in {self._root}: lease file churn")

    def _release(self, digests: frozenset[str]) -> None:
        with self._cond:
            freed = self._release_locked(digests)
        if freed:
            # Deleting files is slow and this may run on an event loop: leave it to a thread.
            threading.Thread(
                target=self._collect, args=(freed,), name="expert-registry-gc", daemon=True
            ).start()

    def _release_locked(self, digests: frozenset[str]) -> list[str]:
        """Drop one lease of each digest (caller holds _cond); the orphans it freed."""
        freed = []
        notify = False
        for d in digests:
            n = self._counts[d] - 1
            if n:
                self._counts[d] = n
                continue
            del self._counts[d]
            if d in self._lease_fds:
                os.close(self._lease_fds.pop(d))  # the flock goes with the fd
            notify = True
            if d in self._orphans:
                self._orphans.discard(d)
                freed.append(d)
        if notify:
            self._cond.notify_all()
        return freed

    # ------------------------------------------------------------------------ writers

    def add(
        self,
        name: str,
        src_dir: str | os.PathLike[str],
        *,
        replace: bool = False,
        follow_symlinks: bool = True,
    ) -> RegistrySnapshot:
        """Copy the PEFT LoRA dir `src_dir` into the store under `name`; the new snapshot.

        The files are copied into a staging dir, hashed while copied, and the validator
        runs on that copy, so what is stored is exactly what was checked even if `src_dir`
        changes meanwhile. Top-level regular files are taken, except hidden ones and
        pickles; symlinks are followed, or refused with follow_symlinks=False (a dir a
        remote client names: a link could reach any file). Sizes are counted while
        copying, so a file that grows meanwhile cannot pass the limits. Any failure
        leaves the manifest, objects/ and the snapshot as they were. Re-adding a name's
        current content with replace=True is a no-op returning the current snapshot.
        """
        validate_adapter_name(name)
        src = Path(src_dir)
        self._check_open()
        if not replace:
            self._check_free(self._snapshot, name)  # fail fast; checked again at commit
        read_lora_dir(src, name)  # config-level checks before copying anything
        files = self._adapter_files(src, follow_symlinks=follow_symlinks)
        # Inside a hidden dir (what open() deletes after a crash), under the expert's own
        # name: load_lora_factors refuses dir names that are not valid adapter names.
        scratch = self._objects / f"{_TMP}{secrets.token_hex(8)}"
        staging = scratch / name
        staging.mkdir(parents=True)
        try:
            digest, size = _hash_files(
                files,
                copy_to=staging,
                limits=(self._max_adapter_bytes, self._max_extra_bytes),
                follow_symlinks=follow_symlinks,
            )
            try:
                info = read_lora_dir(staging, name)
                self._validator(staging)
            except AdapterError as e:  # name the dir the caller gave, not the staging copy
                msg = e.message.replace(str(staging), str(src))
                raise AdapterError(msg, param=e.param, code=e.code) from e
            failpoint("hot_add.validated")
            trash = []
            with self._write_lock, self._file_lock():
                self._check_open()
                self._reload_locked()  # another process may have committed meanwhile
                snap = self._snapshot
                old = snap.get(name)
                if old is not None and not replace:
                    self._check_free(snap, name)
                if old is not None and old.digest == digest:
                    return snap
                target = self._objects / digest
                created = not target.exists()
                if created:
                    os.rename(staging, target)
                    _fsync_dir(self._objects)
                failpoint("hot_add.staged")
                ref = ExpertRef(
                    name=name,
                    digest=digest,
                    path=target,
                    rank=info.rank,
                    target_modules=info.target_modules,
                    added_at=time.time(),
                    size_bytes=size,
                    base_model_name_or_path=info.base_model_name_or_path,
                )
                new = snap._with(ref)
                try:
                    self._commit(new)
                except BaseException:
                    if created:  # nothing on disk references it
                        shutil.rmtree(target, ignore_errors=True)
                    raise
                failpoint("hot_add.committed")
                with self._cond:
                    self._snapshot = new
                    self._orphans.discard(digest)  # revived, if a removal was collecting it
                    self._cond.notify_all()  # a collect() waiting on it need wait no more
                    if old is not None and old.digest not in new.digests:
                        if self._counts.get(old.digest):
                            self._orphans.add(old.digest)
                        else:
                            trash.append(old.digest)
                moved = [t for d in trash if (t := self._trash_locked(d)) is not None]
            for t in moved:
                shutil.rmtree(t, ignore_errors=True)
            return new
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def remove(self, name: str, *, timeout: float | None = 30.0) -> RegistrySnapshot:
        """Unpublish `name`, then delete its files once no lease holds them; the new snapshot.

        `unpublish` followed by `collect`: the manifest without the name is committed
        first, so the removal is durable before the wait. Waits at most `timeout` seconds
        (None: forever) for in-flight leases, then raises ExpertBusyError; the files then
        go with the last lease.
        """
        new, ref = self.unpublish(name)
        self.collect(ref.digest, timeout=timeout, name=name, snapshot=new)
        return new

    def unpublish(self, name: str) -> tuple[RegistrySnapshot, ExpertRef]:
        """Commit the manifest without `name`; the new snapshot and the entry removed.

        Its files stay until `collect` (or the last lease on them, or the next open)
        deletes them; unless the same content is added again meanwhile."""
        with self._write_lock, self._file_lock():
            self._check_open()
            self._reload_locked()
            snap = self._snapshot
            ref = snap[name]
            new = snap._without(name)
            self._commit(new)
            with self._cond:
                self._snapshot = new
                if self._counts.get(ref.digest) and ref.digest not in new.digests:
                    self._orphans.add(ref.digest)  # the last lease collects it
                self._cond.notify_all()
        return new, ref

    def collect(
        self,
        digest: str,
        *,
        timeout: float | None = 30.0,
        name: str | None = None,
        snapshot: RegistrySnapshot | None = None,
    ) -> None:
        """Delete `digest`'s files once no manifest entry and no lease refers to it.

        Waits at most `timeout` seconds for this process's leases (requests still
        generating with the files), then raises ExpertBusyError; the files then go with
        the last lease. Nothing is deleted while a manifest entry refers to the digest
        (a re-add of the same content revives it) or another process leases it; those
        checks are made under the writers' lock at the moment of deletion."""
        with self._cond:
            idle = self._cond.wait_for(
                lambda: not self._counts.get(digest) or digest in self._snapshot.digests,
                timeout,
            )
            held = self._counts.get(digest, 0)
            if not idle:  # under the same lock hold, so no release slips in between
                self._orphans.add(digest)
            snap = snapshot or self._snapshot
        if not idle:
            raise ExpertBusyError(
                f"expert {name or digest[:12]!r} was removed, but {held} in-flight request(s) "
                f"still use its files after {timeout}s; they are deleted when the last one ends",
                snapshot=snap,
                digest=digest,
            )
        self._collect([digest])

    def refresh(self) -> RegistrySnapshot:
        """Adopt what another process committed (shared mode); the current snapshot.

        Cheap when nothing changed (one read of the manifest). Files of experts that are
        gone are deleted once no process leases them."""
        self._check_open()
        try:
            data = self._manifest.read_bytes()
        except FileNotFoundError:
            data = None
        if data == self._manifest_data:
            return self._snapshot
        with self._write_lock, self._file_lock():
            self._check_open()
            before = self._snapshot.digests
            self._reload_locked()
            gone = before - self._snapshot.digests
            moved = [t for d in gone if (t := self._trash_locked(d)) is not None]
        for t in moved:
            shutil.rmtree(t, ignore_errors=True)
        return self._snapshot

    def verify(self) -> tuple[str, ...]:
        """Names whose object files no longer hash to their digest (edited or truncated)."""
        bad = []
        with self.lease() as snap:  # no removal may delete the files mid-check
            for digest in sorted(snap.digests):
                path = self._objects / digest
                try:
                    ok = _hash_files(self._adapter_files(path))[0] == digest
                except (OSError, AdapterError):
                    ok = False
                if not ok:
                    bad += [r.name for r in snap.experts.values() if r.digest == digest]
        return tuple(sorted(bad))

    def close(self) -> None:
        """Release the root for another process; the last snapshot stays readable."""
        with self._write_lock:
            if not self._closed:
                self._closed = True
                os.close(self._lock_fd)
                if self._write_fd >= 0:
                    os.close(self._write_fd)

    def __enter__(self) -> ExpertRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------- internals

    def _check_open(self) -> None:
        if self._closed:
            raise AdapterError(f"the expert registry at {self._root} is closed")

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        """Shared mode: exclude the other processes' writers (held with _write_lock)."""
        if not self._shared:
            yield
            return
        fcntl.flock(self._write_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._write_fd, fcntl.LOCK_UN)

    def _lease_file(self, digest: str, op: int) -> int:
        """An fd of `digest`'s lease file, flock'ed with `op` (raises BlockingIOError
        for a LOCK_NB that cannot be had)."""
        fd = os.open(self._root / _LEASES / digest, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, op)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _reload_locked(self) -> bool:
        """Re-read the manifest if another process replaced it (caller holds both write
        locks); whether it changed. Leased digests it dropped become orphans."""
        if not self._shared:
            return False
        try:
            data: bytes | None = self._manifest.read_bytes()
        except FileNotFoundError:
            data = None
        if data == self._manifest_data:
            return False
        if data is None:
            new, self._manifest_data = RegistrySnapshot(0, {}), None
        else:
            new = self._adopt_locked(data)
        with self._cond:
            for d in self._snapshot.digests - new.digests:
                if self._counts.get(d):
                    self._orphans.add(d)
            self._snapshot = new
            self._cond.notify_all()
        return True

    def _adopt_locked(self, data: bytes) -> RegistrySnapshot:
        """The snapshot of manifest bytes read under the file lock (caller holds it).

        An entry whose object is missing or incomplete cannot be served, removed or
        re-added as it stands: it is dropped with a logged reason and the repaired
        manifest committed (a writer never commits an entry before its object is in
        place, and objects are deleted only when unreferenced, so under the lock such
        an entry is never a change in progress)."""
        snap, dropped = self._parse_manifest(data)
        self._manifest_data = data
        if not dropped:
            return snap
        for name, why in dropped.items():
            log.warning(
                "expert registry %s: dropping expert %r from the manifest: %s",
                self._root,
                name,
                why,
            )
        repaired = RegistrySnapshot(snap.version + 1, snap.experts)
        self._commit(repaired)
        return repaired

    @staticmethod
    def _check_free(snap: RegistrySnapshot, name: str) -> None:
        old = snap.get(name)
        if old is not None:
            raise ExpertExistsError(
                f"an expert named {name!r} already exists (digest {old.digest[:12]}); "
                "remove it first or add with replace=True",
                param="name",
                code="expert_exists",
            )

    def _adapter_files(self, src: Path, *, follow_symlinks: bool = True) -> list[Path]:
        files, extra = [], 0
        for p in sorted(src.iterdir(), key=lambda p: p.name):
            if p.name.startswith(".") or p.suffix in _SKIPPED_SUFFIXES:
                continue
            if not follow_symlinks and p.is_symlink():
                raise AdapterError(
                    f"{p.name} in {src} is a symbolic link; only regular files are taken "
                    "from a dir added by path"
                )
            if not p.is_file():
                continue
            size = p.stat().st_size
            if p.name == ADAPTER_WEIGHTS and size > self._max_adapter_bytes:
                raise AdapterError(
                    f"{p}: {size} bytes is over the limit of {self._max_adapter_bytes}"
                )
            if p.name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                extra += size
            files.append(p)
        if extra > self._max_extra_bytes:
            raise AdapterError(
                f"{src}: the files besides {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} total "
                f"{extra} bytes, over the limit of {self._max_extra_bytes}; only small "
                "files (README.md, examples, cards) are copied along"
            )
        return files

    def _commit(self, snap: RegistrySnapshot) -> None:
        """Atomically replace manifest.json with `snap`; on failure the old bytes stay."""
        data = _manifest_bytes(snap)
        try:  # what every later open and refresh will read: never commit what they refuse
            self._parse_manifest(data)
        except ConfigurationError as e:
            raise AdapterError(f"not committed: the new manifest would not open again ({e})") from e
        self._write_manifest(data)
        try:
            _fsync_dir(self._root)
        except BaseException:
            # The rename is visible but its durability unknown: put the old bytes back so
            # that disk and memory agree that nothing happened.
            try:
                if self._manifest_data is None:
                    self._manifest.unlink(missing_ok=True)
                else:
                    self._write_manifest(self._manifest_data)
            except OSError:
                log.exception("could not restore %s after a failed commit", self._manifest)
            raise
        self._manifest_data = data

    def _write_manifest(self, data: bytes) -> None:
        tmp = self._root / f"{MANIFEST}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._manifest)
        finally:
            tmp.unlink(missing_ok=True)

    def _parse_manifest(self, data: bytes) -> tuple[RegistrySnapshot, dict[str, str]]:
        """The snapshot of a manifest, and the entries left out of it because their
        object is missing or incomplete (name -> why); raises ConfigurationError for a
        manifest that is not one (hand edits, corruption)."""
        where = str(self._manifest)

        def bad(why: str) -> ConfigurationError:
            return ConfigurationError(
                f"{where}: {why}; restore it from a backup, or move it away to start empty"
            )

        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"not valid JSON ({e})") from e
        if not isinstance(doc, dict):
            raise bad("expected a JSON object")
        if doc.get("format") != MANIFEST_FORMAT:
            raise bad(f"unsupported format {doc.get('format')!r} (expected {MANIFEST_FORMAT})")
        version, experts = doc.get("version"), doc.get("experts")
        if not is_int(version) or version < 0:
            raise bad(f"'version' must be a non-negative integer, not {version!r}")
        if not isinstance(experts, dict):
            raise bad("'experts' must be an object")
        refs, dropped = {}, {}
        for name, entry in experts.items():
            try:
                validate_adapter_name(name)
                ref = self._ref_from_json(name, entry)
            except (AdapterError, KeyError, TypeError, ValueError) as e:
                raise bad(f"expert {name!r}: {e}") from e
            why = _object_problem(ref.path)
            if why is None:
                refs[name] = ref
            else:
                dropped[name] = why
        return RegistrySnapshot(version, refs), dropped

    def _ref_from_json(self, name: str, entry: Any) -> ExpertRef:
        if not isinstance(entry, dict):
            raise TypeError("expected an object")
        digest, rank, targets = entry["digest"], entry["rank"], entry["target_modules"]
        added_at, size = entry["added_at"], entry.get("size_bytes", 0)
        base = entry.get("base_model_name_or_path")
        if not isinstance(digest, str) or not _DIGEST.match(digest):
            raise ValueError(f"digest {digest!r} is not a sha256 hex string")
        if not is_int(rank) or rank < 1:
            raise ValueError(f"rank {rank!r} is not a positive integer")
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise TypeError("target_modules must be a list of strings")
        if not isinstance(added_at, int | float) or isinstance(added_at, bool):
            raise TypeError(f"added_at {added_at!r} is not a number")
        if not is_int(size) or size < 0:
            raise ValueError(f"size_bytes {size!r} is not a non-negative integer")
        if base is not None and not isinstance(base, str):
            raise TypeError("base_model_name_or_path must be a string or null")
        path = self._objects / digest
        return ExpertRef(name, digest, path, rank, tuple(targets), float(added_at), size, base)

    def _lock_root(self) -> tuple[int, bool]:
        """The flock'ed fd of .lock, and whether no other process has the root open
        (then this one holds it exclusively, to collect crash leftovers)."""
        fd = os.open(self._root / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd, True
        except BlockingIOError:
            pass
        deadline = time.monotonic() + 10  # a shared opener collecting leftovers
        while self._shared:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return fd, False
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        os.close(fd)
        raise ConfigurationError(
            f"the expert registry at {self._root} is open in another process "
            "(or another ExpertRegistry in this one)"
            + ("" if self._shared else "; replicas that share it must all open it shared")
        )

    def _collect_garbage(self) -> None:
        """Delete what a crash left: temp manifests, staging dirs, unreferenced objects."""
        for p in self._root.glob(f"{MANIFEST}.tmp*"):
            log.info("removing leftover %s", p)
            p.unlink(missing_ok=True)
        live = self._snapshot.digests
        for p in self._objects.iterdir():
            if p.name.startswith(_TMP) or (_DIGEST.match(p.name) and p.name not in live):
                log.info("removing unreferenced %s", p)
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
            elif p.name not in live:
                log.warning("leaving unknown entry %s alone", p)
        leases = self._root / _LEASES
        if leases.is_dir():  # no other process is here: nobody holds these
            for p in leases.iterdir():
                if _DIGEST.match(p.name) and p.name not in live:
                    p.unlink(missing_ok=True)

    def _collect(self, digests: Iterable[str]) -> None:
        with self._write_lock, self._file_lock():
            if self._closed:  # another process may own the root now; open() cleans up
                return
            self._reload_locked()  # another process may have re-added the same content
            moved = [t for d in digests if (t := self._trash_locked(d)) is not None]
        for t in moved:
            shutil.rmtree(t, ignore_errors=True)

    def _trash_locked(self, digest: str) -> Path | None:
        """Rename an unused object out of the way (caller holds _write_lock); the new path.

        The rename is instant, so the slow delete can happen outside the lock."""
        with self._cond:
            if self._counts.get(digest) or digest in self._snapshot.digests:
                return None
        lease_fd = -1
        if self._shared:
            try:  # held by every process that still uses the files
                lease_fd = self._lease_file(digest, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None  # the last of them deletes them when its lease ends
        src = self._objects / digest
        dst = self._objects / f"{_TMP}trash-{secrets.token_hex(8)}"
        try:
            os.rename(src, dst)
        except FileNotFoundError:
            return None
        except OSError:
            log.warning("could not delete %s; the next open will", src, exc_info=True)
            return None
        finally:
            if lease_fd >= 0:
                (self._root / _LEASES / digest).unlink(missing_ok=True)
                os.close(lease_fd)
        return dst


def _object_problem(path: Path) -> str | None:
    """Why the object dir `path` cannot be served, or None."""
    if not path.is_dir():
        return f"its object {path} is missing"
    missing = [f for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (path / f).is_file()]
    if missing:
        return f"its object {path} is incomplete (no {', '.join(missing)})"
    return None


def _manifest_bytes(snap: RegistrySnapshot) -> bytes:
    experts = {
        r.name: {
            "digest": r.digest,
            "rank": r.rank,
            "target_modules": list(r.target_modules),
            "added_at": r.added_at,
            "size_bytes": r.size_bytes,
            "base_model_name_or_path": r.base_model_name_or_path,
        }
        for r in snap.experts.values()
    }
    doc = {"format": MANIFEST_FORMAT, "version": snap.version, "experts": experts}
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def _hash_files(
    files: Iterable[Path],
    copy_to: Path | None = None,
    limits: tuple[int, int] | None = None,
    follow_symlinks: bool = True,
) -> tuple[str, int]:
    """The content digest of `files` and their total size, copying them if asked.

    Each file is hashed on its own and the digest covers the sorted list of
    (name, length, file hash): files stream through once, and no two different dirs
    encode the same. Copies are fsync'ed, so that a committed manifest never points at
    files still in the page cache only. `limits` = (bytes of the weights file, bytes of
    the other files together), counted as read: AdapterError past either. Without
    `follow_symlinks` a file that became a link since it was listed is refused too.
    """
    listing = hashlib.sha256(_DIGEST_TAG)
    total = extra = 0
    flags = os.O_RDONLY | (0 if follow_symlinks else os.O_NOFOLLOW)
    for src in sorted(files, key=lambda p: p.name):
        h, n = hashlib.sha256(), 0
        cap = None
        if limits is not None:
            cap = {ADAPTER_WEIGHTS: limits[0], ADAPTER_CONFIG: limits[1]}.get(
                src.name, limits[1] - extra
            )
        with contextlib.ExitStack() as stack:
            try:
                fd = os.open(src, flags)
            except OSError as e:
                raise AdapterError(
                    f"{src.name}: cannot be read as a regular file ({e.strerror})"
                ) from e
            fin = stack.enter_context(open(fd, "rb"))
            fout = stack.enter_context(open(copy_to / src.name, "xb")) if copy_to else None
            while chunk := fin.read(1 << 20):
                h.update(chunk)
                n += len(chunk)
                if cap is not None and n > cap:
                    raise AdapterError(
                        f"{src.name}: more than {cap} bytes (it grew while being copied, or "
                        "the files are over the limits)"
                    )
                if fout is not None:
                    fout.write(chunk)
            if fout is not None:
                fout.flush()
                os.fsync(fout.fileno())
        listing.update(f"{src.name}\0{n}\0{h.hexdigest()}\n".encode())
        total += n
        if src.name not in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            extra += n
    if copy_to is not None:
        _fsync_dir(copy_to)
    return listing.hexdigest(), total


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
