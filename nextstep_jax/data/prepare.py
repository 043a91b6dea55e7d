"""The data command's work: an input (``data/formats.py``) -> the ArrayRecord dataset of one kind
and split under a data root, in shards, resumable, split over processes and hosts.

  python -m nextstep_jax.data prepare --input=PATH --out=ROOT [--kind=pair] ...   (data/__main__.py)

What it leaves (training reads it with ``data.source=ROOT``):
  ROOT/nextstep_records/{kind}/1.0.0/
    nextstep_records-{split}.array_record-{u:05d}-of-{U:05d}   the shard of work unit u
    dataset_info.json, features.json       written once every unit of the split is done
    prepare/{split}/plan.json              the input and options the shards come from
    prepare/{split}/unit-{u:05d}.json      a finished unit: records, bytes, counters, first skips
  ROOT/prepare-{kind}-{split}.json         the summary: records read and kept, per skip reason
                                           its count and first offending items, conversions
  ROOT/latent_stats.json                   with latents (ConvertOptions.latents): the encoder and
                                           the per-dimension and per-channel mean and std of the
                                           stored tokens, over the train splits of every kind
                                           (and each kind's and split's own under "splits")

Work units are the input's (``formats.Input``): fixed runs of ``shard_size`` items, a whole tar for
WebDataset. A unit's records depend on its items alone and are serialised deterministically
(``sources.ShardWriter``), so every shard's bytes are a function of the input and the options.

With latents, a unit's images are encoded in batches within the unit (``formats.LatentBatcher``),
so its latents too depend on its items alone (on one kind of device), and its marker holds the
sums of its stored tokens (``formats.LatentSums``), which add up, unit by unit, to the statistics.
Every kind with latents in a root must come from the same encoder (its identity in the plan).

Resume: a unit is done when its marker exists and its shard has the recorded size. A shard is
written aside (``.partial``) and moved into place before its marker is written, so an interrupted
run leaves at most one unfinished shard per process, which the same command run again redoes
while every done unit is kept as it is: the output is then byte for byte that of an uninterrupted
run. Another input or other options (plan.json) are refused, unless ``overwrite``.

Processes (and hosts, on a shared file system): process i of n converts the units u with
u % n == i, writing their shards and markers; the process that finds every unit done writes
dataset_info.json, features.json and the summary (so does any later run of the same command, with
any process index: it converts nothing). What "equal" means: n processes together leave the same
files, byte for byte, as one process does, hence the same records in the same order.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import sys
import time
from typing import Callable, Iterator, Mapping

from nextstep_jax.data import formats
from nextstep_jax.data.sources import (BUILDER_NAME, KINDS, ShardWriter, record_dir, shard_name,
                                       write_dataset_info)
from nextstep_jax.errors import UserError

PLAN_VERSION = 1
LATENT_STATS_FILE = "latent_stats.json"


@dataclasses.dataclass(frozen=True)
class Job:
  """Where and how: the data root, the split, this process's share, progress and overwrite."""
  root: str
  split: str = "train"
  process_index: int = 0
  process_count: int = 1
  progress_every: float = 10.0   # seconds between progress lines (0: after every record)
  overwrite: bool = False

  def __post_init__(self):
    if self.process_count < 1 or not 0 <= self.process_index < self.process_count:
      raise UserError(f"process index {self.process_index} of {self.process_count} processes: "
                      "the index must be in [0, count)")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", self.split):
      raise UserError(f"split {self.split!r}: a plain name such as train or heldout")
    if self.overwrite and self.process_count > 1:
      raise UserError("overwrite with several processes would delete each other's shards: "
                      "start again with one process, or delete the old records first")


def process_from_env(env: Mapping[str, str] | None = None) -> tuple[int, int]:
  """(process index, count) from the launcher's environment: JAX_PROCESS_ID / JAX_NUM_PROCESSES
  (launch/local.sh, and the variables jax.distributed reads), else SLURM_PROCID / SLURM_NTASKS,
  else (0, 1)."""
  env = os.environ if env is None else env
  for index, count in (("JAX_PROCESS_ID", "JAX_NUM_PROCESSES"), ("SLURM_PROCID", "SLURM_NTASKS")):
    if index in env and count in env:
      return int(env[index]), int(env[count])
  return 0, 1


def summary_path(root: str, kind: str, split: str) -> str:
  return os.path.join(root, f"prepare-{kind}-{split}.json")


def latent_stats_path(root: str) -> str:
  return os.path.join(root, LATENT_STATS_FILE)


def _state_dir(root: str, kind: str, split: str) -> str:
  return os.path.join(record_dir(root, kind), "prepare", split)


def _marker_path(state: str, unit: int) -> str:
  return os.path.join(state, f"unit-{unit:05d}.json")


def _write_json(path: str, obj) -> None:
  """Written aside and moved into place: readers (other processes) see all of it or nothing."""
  aside = f"{path}.{socket.gethostname()}-{os.getpid()}.partial"
  with open(aside, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(aside, path)


def _read_json(path: str):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _plan(source: formats.Input, options: formats.ConvertOptions, split: str) -> dict:
  opts = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
          if f.name != "latents"}
  opts["latents"] = options.latents.plan() if options.latents is not None else False
  return json.loads(json.dumps(dict(version=PLAN_VERSION, kind=source.kind, split=split,
                                    units=source.num_units, input=source.describe(),
                                    options=opts)))


def _first_difference(a, b, path: str = "") -> str:
  if isinstance(a, dict) and isinstance(b, dict):
    for k in sorted(set(a) | set(b)):
      if a.get(k) != b.get(k):
        return _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else k)
  return f"{path}: {a!r} then, {b!r} now"


def _split_files(out: str, split: str) -> list[str]:
  prefix = f"{BUILDER_NAME}-{split}.array_record-"
  return [os.path.join(out, n) for n in sorted(os.listdir(out)) if n.startswith(prefix)]


def _start(source: formats.Input, job: Job, plan: dict) -> str:
  """Checks (or, with overwrite, clears) what the root holds; writes the plan. Returns the
  split's state directory."""
  kind, out = source.kind, record_dir(job.root, source.kind)
  state = _state_dir(job.root, kind, job.split)
  info = _read_json(os.path.join(out, "dataset_info.json")) or {}
  foreign = sorted(s["name"] for s in info.get("splits", [])
                   if not os.path.exists(os.path.join(_state_dir(job.root, kind, s["name"]),
                                                      "plan.json")))
  old = _read_json(os.path.join(state, "plan.json"))
  if not job.overwrite:
    if foreign:
      raise UserError(f"{out} holds {kind} records ({', '.join(foreign)}) not written by prepare; "
                      "pass --overwrite to replace them")
    if old is not None and old != plan:
      raise UserError(f"{out} holds a prepare of {kind}/{job.split} from another input or other "
                      f"options ({_first_difference(old, plan)}); run the same command to resume, "
                      "or pass --overwrite to start again")
  elif os.path.isdir(out):
    for split in set(foreign) | {job.split}:
      for path in _split_files(out, split):
        os.remove(path)
    shutil.rmtree(state, ignore_errors=True)
    for name in ("dataset_info.json", "features.json"):
      if os.path.exists(os.path.join(out, name)):
        os.remove(os.path.join(out, name))
  _check_same_encoder(job.root, kind, job.split, plan)
  os.makedirs(state, exist_ok=True)
  if _read_json(os.path.join(state, "plan.json")) != plan:
    _write_json(os.path.join(state, "plan.json"), plan)
  return state


def _plans(root: str) -> Iterator[tuple[str, str, dict]]:
  """(kind, split, plan) of every prepare under `root`."""
  for kind in KINDS:
    base = os.path.join(record_dir(root, kind), "prepare")
    for split in sorted(os.listdir(base)) if os.path.isdir(base) else ():
      plan = _read_json(os.path.join(base, split, "plan.json"))
      if plan is not None:
        yield kind, split, plan


def _check_same_encoder(root: str, kind: str, split: str, plan: dict) -> None:
  """Refuses latents from another encoder than those already in `root` (training reads every
  kind's tokens as one space)."""
  mine = plan["options"]["latents"]
  if not isinstance(mine, dict):
    return
  for k, s, other in _plans(root):
    theirs = other["options"].get("latents")
    if (k, s) != (kind, split) and isinstance(theirs, dict) and \
        theirs["identity"] != mine["identity"]:
      raise UserError(f"{root} holds {k}/{s} latents of another encoder "
                      f"({_first_difference(theirs['identity'], mine['identity'])}): prepare "
                      "every kind of a data root with the same VAE, or use another --out")


def _done(out: str, state: str, unit: int) -> dict | None:
  """The marker of a finished unit whose shard is in place, else None."""
  marker = _read_json(_marker_path(state, unit))
  if marker is None:
    return None
  path = os.path.join(out, marker.get("shard", ""))
  if not os.path.isfile(path) or os.path.getsize(path) != marker.get("shard_bytes"):
    return None
  return marker


class _Progress:
  """Progress lines on stderr: units, records read / kept / skipped, records per second."""

  def __init__(self, label: str, every: float, log: Callable[[str], None]):
    self.label, self.every, self.log = label, every, log
    self.start = self.last = time.monotonic()
    self.read = self.kept = 0

  def record(self, kept: bool, unit_text: str) -> None:
    self.read += 1
    self.kept += int(kept)
    now = time.monotonic()
    if now - self.last >= self.every:
      self.last = now
      self.log(f"{self.label}: {unit_text}, {self.line()}")

  def line(self) -> str:
    rate = self.read / max(time.monotonic() - self.start, 1e-9)
    return (f"{self.read:,} read, {self.kept:,} kept, {self.read - self.kept:,} skipped, "
            f"{rate:,.0f} records/s")


def _convert_unit(source: formats.Input, options: formats.ConvertOptions, out: str, state: str,
                  split: str, unit: int, progress: _Progress) -> dict:
  name = shard_name(split, unit, source.num_units)
  path = os.path.join(out, name)
  conv = formats.Converter(options)
  where = f"unit {unit + 1}/{source.num_units}"
  batcher = (formats.LatentBatcher(options.latents, options.unit)
             if options.latents is not None else None)
  with ShardWriter(path + ".partial") as writer:
    for record in formats.build_records(source.items(unit, conv), conv,
                                        lambda kept: progress.record(kept, where), batcher):
      writer.write(record)
  os.replace(path + ".partial", path)
  marker = dict(unit=unit, shard=name, shard_bytes=os.path.getsize(path), records=writer.count,
                num_bytes=writer.num_bytes, read=writer.count + sum(
                    v for k, v in conv.counters.items() if k.startswith("skipped/")),
                counters=dict(sorted(conv.counters.items())), first=conv.first)
  if batcher is not None:
    marker["latent_sums"] = batcher.sums.to_dict()
  _write_json(_marker_path(state, unit), marker)
  return marker


def prepare(source: formats.Input, job: Job, options: formats.ConvertOptions | None = None,
            log: Callable[[str], None] | None = None) -> dict | None:
  """Converts this process's units of `source` (module doc). Returns the summary once every unit
  of the split is done (after writing dataset_info.json and the summary file), None while units
  of other processes are still missing. Raises UserError for a root holding something else, and
  formats.NoRecords (naming the counts) when the whole split kept no record."""
  options = options or formats.ConvertOptions()
  log = log or (lambda line: print(line, file=sys.stderr, flush=True))
  kind, out = source.kind, record_dir(job.root, source.kind)
  plan = _plan(source, options, job.split)
  state = _start(source, job, plan)
  label = f"prepare {kind}/{job.split}"
  if job.process_count > 1:
    label += f" [process {job.process_index} of {job.process_count}]"
  progress = _Progress(label, job.progress_every, log)
  mine = range(job.process_index, source.num_units, job.process_count)
  todo = [u for u in mine if _done(out, state, u) is None]
  if len(todo) < len(mine):
    log(f"{label}: resuming, {len(mine) - len(todo)} of {len(mine)} units already done")
  for unit in todo:
    _convert_unit(source, options, out, state, job.split, unit, progress)
  if todo:
    log(f"{label}: converted {len(todo)} of this process's {len(mine)} units, {progress.line()}")
  markers = [_done(out, state, u) for u in range(source.num_units)]
  missing = [u for u, m in enumerate(markers) if m is None]
  if missing:
    log(f"{label}: {len(missing)} of {source.num_units} units are other processes' (first: "
        f"{missing[0]}); the process finishing last writes dataset_info.json")
    return None
  return _finish(source, job, plan, markers)


def _finish(source: formats.Input, job: Job, plan: dict, markers: list[dict]) -> dict:
  kind = source.kind
  counters: dict[str, int] = {}
  first: dict[str, list[str]] = {}
  for m in markers:
    for key, n in m["counters"].items():
      counters[key] = counters.get(key, 0) + n
    for reason, names in m["first"].items():
      have = first.setdefault(reason, [])
      have += names[:formats.FIRST_NAMES - len(have)]
  kept = sum(m["records"] for m in markers)
  summary = dict(
      kind=kind, split=job.split, input=plan["input"],
      read=sum(m["read"] for m in markers), records=kept, shards=len(markers),
      bytes=sum(m["shard_bytes"] for m in markers),
      skipped={k[len("skipped/"):]: dict(count=n, first=first.get(k[len("skipped/"):], []))
               for k, n in sorted(counters.items()) if k.startswith("skipped/")},
      converted={k[len("converted/"):]: n for k, n in sorted(counters.items())
                 if k.startswith("converted/")})
  if isinstance(plan["options"]["latents"], dict):
    sums = _latent_sums(markers)
    summary["latents"] = dict(images=sums.images, tokens=sums.tokens,
                              token_dim=0 if sums.total is None else len(sums.total),
                              dtype=plan["options"]["latents"]["dtype"],
                              stats=LATENT_STATS_FILE)   # in the root
  _write_json(summary_path(job.root, kind, job.split), summary)
  if not kept:
    raise formats.NoRecords(
        f"no {kind} records kept of {summary['read']} read; skipped: "
        f"{formats.describe_skips(counters, first)}\n"
        f"(details in {summary_path(job.root, kind, job.split)})")
  write_dataset_info(job.root, kind, _complete_splits(job.root, kind))
  if "latents" in summary:
    _write_json(latent_stats_path(job.root), _latent_stats(job.root))
  return summary


def _latent_sums(markers: list[dict]) -> formats.LatentSums:
  sums = formats.LatentSums()
  for m in markers:   # in unit order: the same floats however many processes wrote the units
    sums.add(formats.LatentSums.from_dict(m["latent_sums"]))
  return sums


def _latent_stats(root: str) -> dict:
  """ROOT/latent_stats.json (module doc): from the markers of every complete split with latents."""
  total, splits, encoder = formats.LatentSums(), {}, None
  for kind, split, plan in _plans(root):
    latents = plan["options"].get("latents")
    state = _state_dir(root, kind, split)
    markers = [_done(record_dir(root, kind), state, u) for u in range(plan["units"])]
    if not isinstance(latents, dict) or any(m is None for m in markers):
      continue
    sums = _latent_sums(markers)
    if not sums.tokens:
      continue
    encoder = latents
    splits[f"{kind}/{split}"] = sums.stats(latents["patch_size"])
    if split == "train":
      total.add(sums)
  out = dict(encoder=encoder, splits=splits)
  if total.tokens:
    out.update(total.stats(encoder["patch_size"]))
  return out


def _complete_splits(root: str, kind: str) -> dict[str, tuple[list[int], int]]:
  """split -> (records per shard, serialised bytes) of every split whose units are all done."""
  out, splits = record_dir(root, kind), {}
  base = os.path.join(out, "prepare")
  for split in sorted(os.listdir(base)):
    plan = _read_json(os.path.join(base, split, "plan.json"))
    if plan is None:
      continue
    markers = [_done(out, os.path.join(base, split), u) for u in range(plan["units"])]
    if all(m is not None for m in markers) and sum(m["records"] for m in markers):
      splits[split] = ([m["records"] for m in markers], sum(m["num_bytes"] for m in markers))
  return splits


def describe(summary: dict, root: str) -> list[str]:
  """The summary of a prepare into `root` as lines for the console."""
  lines = [f"prepared {summary['records']:,} {summary['kind']} records ({summary['split']}) of "
           f"{summary['read']:,} read, in {summary['shards']} shard(s), {summary['bytes']:,} "
           f"bytes: {record_dir(root, summary['kind'])}"]
  skipped = summary["skipped"]
  if skipped:
    lines.append(f"skipped {sum(s['count'] for s in skipped.values()):,}:")
    for reason, s in sorted(skipped.items(), key=lambda kv: (-kv[1]["count"], kv[0])):
      more = ", ..." if s["count"] > len(s["first"]) else ""
      lines.append(f"  {reason} {s['count']:,}: {', '.join(s['first'])}{more}")
  if summary["converted"]:
    lines.append("converted: " + ", ".join(f"{k} {n:,}" for k, n in summary["converted"].items()))
  if "latents" in summary:
    lat = summary["latents"]
    lines.append(f"latents: {lat['images']:,} images, {lat['tokens']:,} tokens of "
                 f"{lat['token_dim']} values ({lat['dtype']}); per-channel mean and std: "
                 f"{os.path.join(root, lat['stats'])}")
  lines.append(f"summary: {summary_path(root, summary['kind'], summary['split'])}")
  return lines
