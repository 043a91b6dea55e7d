"""Object storage (``gs://``, ``s3://``, any fsspec URL) under the readers and writers that take local paths.

Why fsspec: the readers this project feeds (grain's ArrayRecord data source, array_record,
sentencepiece, tokenizers, safetensors) open local files by name, and no filesystem layer can change
that; what is needed is copying whole directories between an object store and the local disk, and
fsspec's one interface does it for gs:// (gcsfs), s3:// (s3fs) and many more, with an in-memory backend
for tests. etils.epath (orbax's layer) reaches gs:// only through TensorFlow or gcsfs and has no
s3://; TensorStore reads arrays, not arbitrary files. Orbax itself is left writing local paths: the
work directory is mirrored (below), so a test backend registered only in fsspec sees the checkpoints.

The services, each the identity on local paths (a local path takes exactly the old code path):

* ``local_input(url, what)``: a read-only input (a data root ``data.source``, ``tokenizer.path``,
  ``vae.checkpoint``) copied into the host's cache, ``$NEXTSTEP_STORAGE_CACHE/inputs/<protocol>/
  <bucket>/<path>`` (default ``<system temp dir>/nextstep-cache``), once per host: each file is
  written aside and renamed, and a marker listing every file and its size is written last. A later
  call lists the remote once and copies nothing when the marker matches; an interrupted copy (no
  marker, or another listing) is completed, keeping the files already there with their size.
* ``RemoteWorkdir(url)``: a remote work directory kept as a local mirror,
  ``$NEXTSTEP_STORAGE_CACHE/workdirs/<protocol>/<bucket>/<path>``, that the run reads and writes as
  before. ``pull()`` (before the architecture check and the restore) copies the run's files the
  mirror lacks and the newest complete remote checkpoint step when it is newer than the mirror's;
  ``publish(step)`` (after orbax committed the step) uploads the step's files, then the marker
  ``<step>/.upload_complete.json`` last, so a half-uploaded step is never taken for a step;
  ``retain(steps)`` deletes the remote steps the local retention dropped (marker first);
  ``sync_files()`` uploads the run's other files that changed (saved config, demo tokenizer,
  metrics.jsonl, TensorBoard events).
* ``local_checkpoint(url, what)``: another run's checkpoint (``checkpoint.init_from``, ``dpo.reference``)
  given as a URL: only its newest complete step (the one step of a step URL), staged as an input.
* ``check_workdir(url, process_count)``: a remote work directory is for one-process runs; a job of
  several processes is refused at start-up, saying what works.

Errors are UserErrors that name the URL: a protocol without its implementation says what to
``pip install`` (gcsfs for gs://, s3fs for s3://), a missing remote path says so.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from typing import Iterable

import fsspec

from nextstep_jax.errors import UserError

CACHE_ENV = "NEXTSTEP_STORAGE_CACHE"
INPUT_MARKER = ".nextstep_staged.json"     # in a staged input's local copy, written last
UPLOAD_MARKER = ".upload_complete.json"    # in a remote checkpoint step, written last
_PULL_SUFFIX = ".pull-partial"             # a step being downloaded into the mirror
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
# The package each protocol's fsspec implementation comes in (what the error asks to install).
PIP_PACKAGES = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs", "s3a": "s3fs", "az": "adlfs", "abfs": "adlfs",
                "hf": "huggingface_hub"}


def protocol(path: str | os.PathLike) -> str:
  """The URL scheme of `path` ("gs" for gs://b/x), "" for a local path."""
  m = _URL.match(os.fspath(path))
  return m.group(1).lower() if m else ""


def is_remote(path: str | os.PathLike) -> bool:
  """True for an object-store URL (gs://, s3://, ...); local paths and file:// URLs are not remote."""
  return protocol(path) not in ("", "file", "local")


def cache_root() -> str:
  """Where remote inputs and work-directory mirrors are kept on this host: ``$NEXTSTEP_STORAGE_CACHE``,
  default ``<system temp dir>/nextstep-cache``."""
  return os.path.abspath(os.environ.get(CACHE_ENV) or os.path.join(tempfile.gettempdir(), "nextstep-cache"))


def filesystem(url: str, what: str = "") -> tuple[fsspec.AbstractFileSystem, str]:
  """(the fsspec filesystem of `url`'s protocol, the path inside it). A protocol whose implementation is
  not installed is a UserError naming `url` (and `what`, the field) and the package to install."""
  proto = protocol(url)
  name = f"{what}={url!r}" if what else repr(url)
  try:
    fs = fsspec.filesystem(proto)
  except ImportError as e:
    pkg = PIP_PACKAGES.get(proto)
    hint = f"pip install {pkg}" if pkg else f"install the fsspec implementation of {proto}:// ({e})"
    raise UserError(f"{name}: {proto}:// needs a filesystem implementation that is not installed: {hint}") from e
  except ValueError as e:
    raise UserError(f"{name}: {proto}:// is not a protocol fsspec knows ({e})") from e
  return fs, fs._strip_protocol(url)  # pylint: disable=protected-access


def _local_for(kind: str, url: str) -> str:
  """``<cache>/<kind>/<protocol>/<bucket>/<path>``: readable, one place per URL."""
  proto = protocol(url)
  rest = url[len(proto) + 3:].strip("/")
  parts = [p for p in rest.split("/") if p not in ("", ".", "..")]
  if not parts:
    raise UserError(f"{url!r}: the URL names no bucket")
  return os.path.join(cache_root(), kind, proto, *parts)


def _listing(fs, root: str) -> dict[str, int]:
  """{path relative to `root` (with '/'): size} of every file under `root` (a directory or one file)."""
  found = fs.find(root, detail=True, withdirs=False)
  out = {}
  for path, info in found.items():
    if info.get("type", "file") != "file":
      continue
    rel = path[len(root):].lstrip("/") if path.startswith(root) else path.rsplit("/", 1)[-1]
    out[rel or posix_name(root)] = int(info.get("size") or 0)
  return out


def posix_name(path: str) -> str:
  return path.rstrip("/").rsplit("/", 1)[-1]


def _download(fs, remote: str, local: str) -> None:
  """One remote file to `local`, written aside and renamed (a reader never sees half a file)."""
  os.makedirs(os.path.dirname(local), exist_ok=True)
  tmp = f"{local}.partial-{socket.gethostname()}-{os.getpid()}"
  try:
    fs.get_file(remote, tmp)
    os.replace(tmp, local)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


# ------------------------------------------------------------------------------------------------
# Read-only inputs
# ------------------------------------------------------------------------------------------------

def _existing(path: str, what: str):
  """(url, its name for messages, filesystem, its path there) of a remote `path` that exists; UserError
  naming `what` otherwise."""
  url = str(path).rstrip("/")
  name = f"{what}={path!r}" if what else repr(path)
  fs, root = filesystem(url, what)
  try:
    exists = fs.exists(root)
  except OSError as e:
    raise UserError(f"{name}: cannot be listed ({type(e).__name__}: {e})") from e
  if not exists:
    raise UserError(f"{name} does not exist")
  return url, name, fs, root


def local_input(path: str, what: str = "", siblings: Iterable[str] = ()) -> str:
  """The local path the readers take for `path`: `path` itself when it is local; for a URL, its copy
  in this host's cache (see the module docstring), made or completed now. `what` names the config
  field in errors. `siblings`: for a URL of one file, names of files beside it to copy too when they
  exist (a tokenizer.json's tokenizer_config.json)."""
  if not is_remote(path):
    return path
  url, name, fs, root = _existing(path, what)
  try:
    single = not fs.isdir(root)
    listing = _listing(fs, root)
    if single:
      parent = root.rsplit("/", 1)[0]
      listing = {posix_name(root): listing[next(iter(listing))]} if listing else {posix_name(root): 0}
      for sib in siblings:
        if sib != posix_name(root) and fs.isfile(f"{parent}/{sib}"):
          listing[sib] = int(fs.size(f"{parent}/{sib}"))
      base = parent
    else:
      base = root
  except OSError as e:
    raise UserError(f"{name}: cannot be listed ({type(e).__name__}: {e})") from e
  if not listing:
    raise UserError(f"{name} holds no files")
  dest = _local_for("inputs", url)
  local_dir = os.path.dirname(dest) if single else dest
  marker = os.path.join(local_dir, INPUT_MARKER if not single else f".{posix_name(root)}{INPUT_MARKER}")
  want = {"source": url, "files": listing}
  try:
    with open(marker, encoding="utf-8") as f:
      if json.load(f) == want:
        return dest
  except (OSError, ValueError):
    pass
  copied = 0
  try:
    for rel, size in sorted(listing.items()):
      local = os.path.join(local_dir, *rel.split("/"))
      if os.path.isfile(local) and os.path.getsize(local) == size:
        continue  # written aside and renamed by an earlier (interrupted) copy: complete
      _download(fs, f"{base}/{rel}", local)
      copied += 1
  except OSError as e:
    raise UserError(f"{name}: copying it to {local_dir} failed ({type(e).__name__}: {e})") from e
  if not single:  # the copy is exact: files gone from the remote are removed
    for dirpath, _, names in os.walk(local_dir):
      for n in names:
        rel = os.path.relpath(os.path.join(dirpath, n), local_dir).replace(os.sep, "/")
        if rel not in listing and rel != INPUT_MARKER and ".partial-" not in n:
          os.remove(os.path.join(dirpath, n))
  os.makedirs(local_dir, exist_ok=True)
  tmp = f"{marker}.partial-{socket.gethostname()}-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(want, f, indent=1, sort_keys=True)
  os.replace(tmp, marker)
  logging.info("storage: %s staged to %s (%d of %d files copied)", url, dest, copied, len(listing))
  return dest


def local_checkpoint(path: str, what: str = "checkpoint.init_from", steps_dir: str = "checkpoints") -> str:
  """The local path a checkpoint reader takes for `path`: `path` itself when it is local. A URL names a
  checkpoint directory (its ``<step>/`` folders), a run's work directory (its ``<steps_dir>/``) or one
  step (``.../checkpoints/3``), as written by ``RemoteWorkdir.publish``; only a complete step counts,
  one whose upload marker (``<step>/.upload_complete.json``, written last) is there and lists the
  step's files: for a directory the newest such step, for a step URL that step (refused when its
  marker is missing). That one step is staged as ``local_input`` stages an input (once per host, in
  ``<cache>/inputs/<protocol>/<bucket>/<path>/<step>``), and its local directory is returned. `what`
  names the config field in errors."""
  if not is_remote(path):
    return path
  url, name, fs, root = _existing(path, what)
  try:
    listing = _listing(fs, root)
  except OSError as e:
    raise UserError(f"{name}: cannot be listed ({type(e).__name__}: {e})") from e

  def steps_under(prefix: str) -> tuple[set[int], set[int]]:
    """(every step folder under `prefix`, those with their upload marker)."""
    found, complete = set(), set()
    for rel in listing:
      parts = rel[len(prefix):].split("/") if rel.startswith(prefix) else []
      if len(parts) >= 2 and parts[0].isdigit():
        found.add(int(parts[0]))
        if parts[1:] == [UPLOAD_MARKER]:
          complete.add(int(parts[0]))
    return found, complete

  prefix = ""
  found, complete = steps_under(prefix)
  if not found:  # a run's work directory: its checkpoint directory
    prefix = f"{steps_dir}/"
    found, complete = steps_under(prefix)
  if not found and posix_name(root).isdigit():  # one step's directory
    step, prefix, step_url = int(posix_name(root)), "", url
    if UPLOAD_MARKER not in listing:
      raise UserError(f"{name}: step {step} has no upload marker {UPLOAD_MARKER} (its upload did not finish, "
                      "or it was not uploaded by a run with a remote work directory)")
  elif not found:
    raise UserError(f"{name} holds no checkpoint steps (<step>/ folders)")
  elif not complete:
    raise UserError(f"{name}: no step has its upload marker {UPLOAD_MARKER} (steps {sorted(found)}: their "
                    "uploads did not finish, or they were not uploaded by a run with a remote work directory)")
  else:
    step = max(complete)
    prefix += f"{step}/"
    step_url = f"{url}/{prefix.rstrip('/')}"
    if step < max(found):
      logging.warning("storage: %s: reading step %d, the newest complete one (newer steps %s have no upload "
                      "marker)", name, step, sorted(s for s in found if s > step))
  files = {rel[len(prefix):]: size for rel, size in listing.items()
           if rel.startswith(prefix) and rel != prefix + UPLOAD_MARKER}
  try:
    marker = json.loads(fs.cat_file(f"{root}/{prefix}{UPLOAD_MARKER}"))
  except (OSError, ValueError) as e:
    raise UserError(f"{name}: the upload marker of step {step} is unreadable ({type(e).__name__}: {e})") from e
  if not isinstance(marker, dict) or marker.get("files") != files:
    raise UserError(f"{name}: step {step} does not match its upload marker {UPLOAD_MARKER} (files changed "
                    "or removed after its upload)")
  return local_input(step_url, what)


def check_workdir(workdir: str, process_count: int, what: str = "workdir") -> None:
  """Refuses a remote work directory for a job of several processes, saying what works. The mirror
  (``RemoteWorkdir``) is one host's copy uploaded by one process, while a multi-process save has every
  process write its shards into one directory they all reach; the other writers of a work directory
  (the lock, the metrics, the data cache) take local paths too."""
  if process_count > 1 and is_remote(workdir):
    raise UserError(f"{what}={workdir!r}: a remote work directory works for a one-process run only (mirrored "
                    f"locally, each committed step uploaded), and this job has {process_count} processes: run "
                    "one process per host with a work directory all hosts reach as a local path (NFS or "
                    "another shared filesystem), or one process with this URL")


# ------------------------------------------------------------------------------------------------
# A remote work directory, mirrored
# ------------------------------------------------------------------------------------------------

class RemoteWorkdir:
  """A work directory at `url` (gs://, s3://, ...) kept as the local mirror ``self.local``.

  `steps_dir`: the checkpoint directory inside the work directory, whose `<digits>` subdirectories are
  steps; `private`: fnmatch patterns of names (at any depth) that stay local (the lock file, orbax's
  unfinished saves, steps moved aside). `local`: the mirror (default in the host's cache)."""

  def __init__(self, url: str, *, steps_dir: str = "checkpoints", private: Iterable[str] = (),
               local: str | None = None):
    self.url = str(url).rstrip("/")
    self.fs, self.root = filesystem(self.url, "workdir")
    self.local = local or _local_for("workdirs", self.url)
    self.steps_dir = steps_dir
    self.private = tuple(private) + (f"*{_PULL_SUFFIX}*", "*.partial-*")
    self._synced: dict[str, tuple[int, int]] = {}   # run file -> (size, mtime_ns) last uploaded or pulled

  def __repr__(self) -> str:
    return f"RemoteWorkdir({self.url!r}, local={self.local!r})"

  # The layout ---------------------------------------------------------------------------------

  def _is_private(self, rel: str) -> bool:
    return any(fnmatch.fnmatch(part, pat) for part in rel.split("/") for pat in self.private)

  def _step_of(self, rel: str) -> int | None:
    """The step a path (relative to the work directory) lies in, or None for a run file."""
    parts = rel.split("/")
    if len(parts) >= 3 and parts[0] == self.steps_dir and parts[1].isdigit():
      return int(parts[1])
    return None

  def _remote(self, rel: str) -> str:
    return f"{self.root}/{rel}"

  def _error(self, doing: str, e: BaseException) -> UserError:
    return UserError(f"workdir={self.url!r}: {doing} failed ({type(e).__name__}: {e})")

  def remote_listing(self) -> dict[str, int]:
    try:
      if not self.fs.exists(self.root):
        return {}
      return _listing(self.fs, self.root)
    except OSError as e:
      raise self._error("listing it", e) from e

  def complete_steps(self, listing: dict[str, int] | None = None) -> list[int]:
    """The remote steps whose upload finished (their marker is there), oldest first."""
    listing = self.remote_listing() if listing is None else listing
    return sorted({s for rel in listing if rel.endswith("/" + UPLOAD_MARKER)
                   and (s := self._step_of(rel)) is not None})

  def local_steps(self) -> list[int]:
    d = os.path.join(self.local, self.steps_dir)
    if not os.path.isdir(d):
      return []
    return sorted(int(n) for n in os.listdir(d) if n.isdigit() and os.path.isdir(os.path.join(d, n)))

  # Pull ---------------------------------------------------------------------------------------

  def pull(self) -> int | None:
    """Before the run reads its work directory: the run files the mirror lacks, and the newest
    complete remote step when it is newer than every step of the mirror (and was not moved aside
    there as unreadable). Steps without their marker (a half-finished upload) are ignored. Returns
    the step pulled, or None."""
    os.makedirs(self.local, exist_ok=True)
    listing = self.remote_listing()
    try:
      for rel, size in sorted(listing.items()):
        if self._step_of(rel) is not None or self._is_private(rel):
          continue
        local = os.path.join(self.local, *rel.split("/"))
        if not os.path.exists(local):
          _download(self.fs, self._remote(rel), local)
          self._note_synced(rel, local)
    except OSError as e:
      raise self._error("copying its run files", e) from e
    complete = self.complete_steps(listing)
    have = self.local_steps()
    steps_local = os.path.join(self.local, self.steps_dir)
    aside = set(os.listdir(steps_local)) if os.path.isdir(steps_local) else set()
    for name in aside:
      if name.endswith(_PULL_SUFFIX):  # an interrupted pull: redone
        shutil.rmtree(os.path.join(steps_local, name), ignore_errors=True)
    if not complete or (have and complete[-1] <= have[-1]):
      return None
    step = complete[-1]
    if any(n.startswith(f"{step}.corrupt") for n in aside):
      logging.warning("storage: step %d of %s was moved aside here as unreadable; not pulled again", step,
                      self.url)
      return None
    prefix = f"{self.steps_dir}/{step}/"
    files = {rel[len(prefix):]: size for rel, size in listing.items()
             if rel.startswith(prefix) and rel != prefix + UPLOAD_MARKER}
    try:
      marker = json.loads(self.fs.cat_file(self._remote(prefix + UPLOAD_MARKER)))
    except (OSError, ValueError) as e:
      raise self._error(f"reading the marker of step {step}", e) from e
    if marker.get("files") != files:
      logging.warning("storage: step %d of %s does not match its upload marker; not pulled", step, self.url)
      return None
    tmp = os.path.join(steps_local, f"{step}{_PULL_SUFFIX}")
    try:
      for rel in sorted(files):
        _download(self.fs, self._remote(prefix + rel), os.path.join(tmp, *rel.split("/")))
    except OSError as e:
      raise self._error(f"copying step {step}", e) from e
    os.replace(tmp, os.path.join(steps_local, str(step)))
    logging.info("storage: pulled step %d of %s into %s", step, self.url, self.local)
    return step

  # Publish ------------------------------------------------------------------------------------

  def publish(self, step: int) -> None:
    """Uploads the committed step `step` of the mirror: its files, then its marker (the file list and
    sizes) last; then the run files that changed (``sync_files``)."""
    rel_dir = f"{self.steps_dir}/{int(step)}"
    local_dir = os.path.join(self.local, self.steps_dir, str(int(step)))
    if not os.path.isdir(local_dir):
      raise FileNotFoundError(f"{local_dir}: no committed step {step} to upload to {self.url}")
    files = {}
    for dirpath, _, names in os.walk(local_dir):
      for n in names:
        path = os.path.join(dirpath, n)
        files[os.path.relpath(path, local_dir).replace(os.sep, "/")] = path
    try:
      marker = self._remote(f"{rel_dir}/{UPLOAD_MARKER}")
      if self.fs.exists(self._remote(rel_dir)):  # written again (after a quarantine): replaced whole
        if self.fs.exists(marker):
          self.fs.rm_file(marker)
        self.fs.rm(self._remote(rel_dir), recursive=True)
      for rel, path in sorted(files.items()):
        self.fs.put_file(path, self._remote(f"{rel_dir}/{rel}"))
      body = {"step": int(step), "files": {rel: os.path.getsize(p) for rel, p in sorted(files.items())}}
      self.fs.pipe_file(marker, json.dumps(body, indent=1, sort_keys=True).encode())
    except OSError as e:
      raise self._error(f"uploading step {step}", e) from e
    logging.info("storage: step %d uploaded to %s", step, self.url)
    self.sync_files()

  def retain(self, steps: Iterable[int]) -> None:
    """Deletes the remote complete steps not in `steps` that are older than the newest of `steps`
    (the local retention dropped them): the marker first, so a half-deleted step reads as
    incomplete."""
    keep = set(int(s) for s in steps)
    if not keep:
      return
    try:
      for step in self.complete_steps():
        if step not in keep and step < max(keep):
          self.fs.rm_file(self._remote(f"{self.steps_dir}/{step}/{UPLOAD_MARKER}"))
          self.fs.rm(self._remote(f"{self.steps_dir}/{step}"), recursive=True)
    except OSError as e:
      raise self._error("deleting old steps", e) from e

  def upload(self, rel: str) -> None:
    """Uploads one file of the mirror (`rel`, relative to the work directory, with '/'), e.g. the
    evaluation's eval.json written into a run read from the bucket."""
    local = os.path.join(self.local, *rel.split("/"))
    try:
      self.fs.put_file(local, self._remote(rel))
    except OSError as e:
      raise self._error(f"uploading {rel}", e) from e
    self._note_synced(rel, local)

  def _note_synced(self, rel: str, local: str) -> None:
    st = os.stat(local)
    self._synced[rel] = (st.st_size, st.st_mtime_ns)

  def sync_files(self) -> int:
    """Uploads the mirror's run files (everything but checkpoint steps and private names) that
    changed since they were last uploaded or pulled. Returns how many were uploaded."""
    if not os.path.isdir(self.local):
      return 0
    n = 0
    steps_local = os.path.join(self.local, self.steps_dir)
    try:
      for dirpath, dirnames, names in os.walk(self.local):
        if os.path.abspath(dirpath) == os.path.abspath(steps_local):
          dirnames[:] = [d for d in dirnames if not d.isdigit()]
        dirnames[:] = [d for d in dirnames if not self._is_private(d)]
        for name in names:
          path = os.path.join(dirpath, name)
          rel = os.path.relpath(path, self.local).replace(os.sep, "/")
          if self._is_private(rel):
            continue
          st = os.stat(path)
          if self._synced.get(rel) == (st.st_size, st.st_mtime_ns):
            continue
          self.fs.put_file(path, self._remote(rel))
          self._synced[rel] = (st.st_size, st.st_mtime_ns)
          n += 1
    except OSError as e:
      raise self._error("uploading its files", e) from e
    return n

