"""The trainer contract: one unit of samples in, ``result.json`` out.

A *trainer* is any command (a container on Argo, a subprocess locally) that trains and/or evaluates a
model on one *unit* of samples: one InstructionGPT-4 subset (``unit_by: cluster.cluster``), or the whole
dataset (``unit_by: all``, Self-Filter stage 1). The ``train`` stage (:mod:`libcurate.train.stage`)
prepares each unit's working directory, runs the command, checks what it wrote and turns it into
per-sample fields.

Working directory of a unit (``<stage prefix>/_units/<unit>/`` in the store; a local temporary directory
mirrored to the store when the store is S3)::

    data/llava/data.json + images/     the unit's samples as a LLaVA conversation list (formats: llava)
    data/cc_sbu_align/filter_cap.json  MiniGPT-4's layout + image/ (formats: cc_sbu_align)
    data/webdataset/shard-000000.tar   curate's WebDataset layout (formats: webdataset)
    data/keys.txt                      the unit's sample keys, one a line, in the order of every file here
    data/features.npy                  float32 [n, d], row i = keys.txt line i (only with ``features:``)
    data/features.json                 {"names": [...], "dims": [...], "columns": [...]}: the ONE fixed,
                                       named feature order (recipe order), column ranges per name
    unit.json                          {"unit", "signature", "samples", "trainer"}: what was prepared
    result.json                        written by the trainer: REQUIRED
    outputs.jsonl                      written by the trainer: optional per-sample outputs,
                                       one {"key": <key>, "<field>": <number>, ...} a line
    trainer.log                        the command's stdout+stderr (last 1 MB)
    checkpoints/ ...                   anything else the trainer writes (kept; uploaded on S3)

The command (``trainer.command`` + ``trainer.args``) is a list of strings with placeholders:
``{data}`` (the ``data/`` directory), ``{workdir}``, ``{eval}`` (the held-out evaluation set, a LLaVA
JSON file; empty when none is configured), ``{world_size}`` (GPUs of the pod: ``trainer.gpus``, at
least 1; pass it to ``torchrun --nproc_per_node``), ``{unit}``, ``{seed}`` and ``{features}``
(``data/features.npy``); a leading ``python`` means the interpreter running curate. The environment also carries ``CURATE_UNIT``, ``CURATE_WORKDIR``,
``CURATE_WORLD_SIZE``.

``result.json`` must be a JSON object holding the label key the stage names (``label: eval_loss``) as a
finite number; anything else in it is kept. A trainer that exits 0 without a valid ``result.json`` is a
contract violation (:class:`ResultMissing`): the stage fails, it never invents a label. When the stage
lists per-sample ``outputs`` (``[difficulty]``), ``outputs.jsonl`` must give each of them, finite, for
every key of the unit and no other key.

Exit codes of the trainer, and what the stage makes of them:

    0            success; result.json is read (and must be valid)
    3            permanent: bad input or config a retry cannot fix -> :class:`TrainerPermanentError`
                 (a PermanentInputError: the job exits 3 and Argo does not retry)
    other != 0   retryable (a crash, an OOM kill, a lost GPU, a signal) -> :class:`TrainerRetryableError`
                 (the job exits 1; Argo retries the unit's pod, locally re-run ``curate run``)
    timeout      ``trainer.timeout_s`` passed: the process group is killed -> retryable

Caching. Each unit has a signature: the hash of its sorted keys, the prefixes (config-hash chains) of
every upstream stage it reads, the trainer's config and the evaluation set's bytes. The unit is done
when ``_units/<unit>/_done`` holds that signature (written last, after result.json and outputs.jsonl
were checked), so a re-run trains nothing it already trained, and a unit whose samples changed trains
again while the others stay.

Per-sample fields written by the ``train`` stage under its stage id (read by ``select``, the
InstructionGPT-4 selector and any later stage as ``<train_id>.<field>``, e.g. ``train.label``):

    unit        str    the unit id (``"all"``, or the ``unit_by`` value: ``"3"`` for cluster 3)
    label       float  the unit's ``result.json[<label>]`` (e.g. eval_loss), as reported
    quality     float  label oriented so that higher is better (``-label`` when ``higher_is_better``
                       is false): one direction for every selector
    <output>    float  each per-sample output the trainer gave (Self-Filter: ``difficulty``)
    excluded    str    only for a sample in no unit, instead of the fields above: why (``quarantined:
                       <stage>: <reason>``, ``no_unit: <field>``, ``missing_feature: <field>``,
                       ``unit_too_small: ...``); counted in the fit's stats. ``select`` drops such a sample
                       as ``missing_score``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from ..quantity import gib, quantity_bytes
from ..stage import PermanentInputError, StageConfig

RESULT_FILE = "result.json"
OUTPUTS_FILE = "outputs.jsonl"
UNIT_FILE = "unit.json"
LOG_FILE = "trainer.log"
DATA_DIR = "data"
KEYS_FILE = "keys.txt"
FEATURES_FILE = "features.npy"
FEATURES_META = "features.json"
UNIT_CONTRACT_VERSION = "1"
EXIT_PERMANENT = 3
LOG_TAIL_BYTES = 1 << 20
PLACEHOLDERS = ("data", "workdir", "eval", "world_size", "unit", "seed", "features")
_UNIT_ID = re.compile(r"[^A-Za-z0-9._-]+")
_SECRET_NAME = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|(^|_)API_?KEY|ACCESS_KEY)", re.I)


class TrainerError(RuntimeError):
    """A trainer run failed in a way a retry may fix (retryable: the job exits 1)."""


class TrainerRetryableError(TrainerError):
    """The trainer exited non-zero (not 3), was killed, or ran past its timeout."""


class TrainerPermanentError(PermanentInputError):
    """The trainer exited 3: bad data or config that a retry cannot fix (the job exits 3)."""


class ResultMissing(PermanentInputError):
    """The trainer exited 0 but wrote no valid result.json / outputs.jsonl: a contract violation. The
    same command on the same data would do it again, so it is permanent; never replaced by a label."""


# trainer.scratch's default: the /tmp of a unit pod holding Self-Filter stage 1's one unit, the whole seed
# dataset (llava_instruct_158k, 157,712 samples). The pod stages (libcurate.train.workdir) one image file
# per sample, at the 150 KB average of workflows/README.md (23.7 GB), and gathers every row's features
# ([img_emb; txt_emb], 2 x 512 dims) as fp16 S3 downloads + their fp16 memmap + the fp32 feature matrix
# (train.units) + the unit's fp32 data/features.npy: 157,712 x 1024 x (2 + 2 + 4 + 4) B = 1.9 GB.
# What the trainer itself writes (checkpoints: ~14 GB per fp16 7B VLM) is on top: raise trainer.scratch.
SELF_FILTER_SAMPLES = 157_712
IMAGE_BYTES = 150_000
SCRATCH_DEFAULT = gib(SELF_FILTER_SAMPLES * (IMAGE_BYTES + 1024 * (2 + 2 + 4 + 4)))


@dataclass
class TrainerSpec(StageConfig):
    """The command that trains one unit, and where it runs.

    Attributes:
        command: argv head, e.g. ``[python, -m, libcurate.train.reference_vlm]`` or ``[torchrun,
            --nproc_per_node, "{world_size}", llava/train/train_mem.py]``.
        args: more argv, with placeholders (see the module docstring).
        image: the container image of the unit pods on Argo (None: curate's GPU image). It must contain
            curate (``python -m jobs.train_unit`` stages the data and runs the command in the pod):
            build it ``FROM`` the curate GPU image, or ``pip install`` curate into the trainer's image.
        gpus: GPUs per unit pod (``nvidia.com/gpu``); also ``{world_size}`` (at least 1).
        memory: memory request/limit of a unit pod (e.g. ``48Gi``); None: the profile's.
        cpu: CPU request of a unit pod; None: the profile's.
        scratch: size limit of a unit pod's ``/tmp`` (an emptyDir holding the staged data, features and
            the trainer's workdir; the kubelet evicts a pod that writes more), a Kubernetes quantity;
            default :data:`SCRATCH_DEFAULT` (Self-Filter's full-data unit at the seed's size).
        timeout_s: wall-clock limit of one unit's command (locally: the subprocess is killed; on Argo
            the pod's activeDeadlineSeconds, plus :data:`POD_SLACK_S` for staging the data).
        env: extra environment variables (names and values, no secrets: the recipe becomes a ConfigMap).
        seed: ``{seed}``.
    """

    command: tuple = ()
    args: tuple = ()
    image: str | None = None
    gpus: int = 1
    memory: str | None = None
    cpu: str | None = None
    scratch: str = SCRATCH_DEFAULT
    timeout_s: int = 6 * 3600
    env: dict = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.command, str):
            self.command = tuple(shlex.split(self.command))
        if isinstance(self.args, str):
            self.args = tuple(shlex.split(self.args))
        self.command, self.args = tuple(self.command), tuple(self.args)
        if not self.command or not all(isinstance(x, (str, int, float)) for x in self.command + self.args):
            raise ValueError("trainer.command: want a non-empty list of strings")
        for part in self.command + self.args:
            for name in re.findall(r"{(\w*)}", str(part)):
                if name not in PLACEHOLDERS:
                    raise ValueError(f"trainer: unknown placeholder {{{name}}} in {part!r}; known: "
                                     f"{list(PLACEHOLDERS)}")
        if not isinstance(self.gpus, int) or isinstance(self.gpus, bool) or self.gpus < 0:
            raise ValueError("trainer.gpus must be an integer >= 0")
        quantity_bytes(self.scratch, "trainer.scratch")
        if self.memory is not None:
            quantity_bytes(self.memory, "trainer.memory")
        if not isinstance(self.timeout_s, int) or self.timeout_s < 1:
            raise ValueError("trainer.timeout_s must be an integer >= 1")
        if not isinstance(self.env, dict) or not all(isinstance(k, str) for k in self.env):
            raise ValueError("trainer.env: want a mapping of variable names to values")
        secret = sorted(k for k in self.env if _SECRET_NAME.search(k))
        if secret:
            # The recipe becomes a ConfigMap on Argo and sits in the run's store: no credential values.
            raise ValueError(f"trainer.env {secret} look like credentials; give the pods a Secret (envFrom, "
                             "k8s/README.md) or workload identity instead of a value in the recipe")

    @property
    def world_size(self) -> int:
        return max(1, self.gpus)


POD_SLACK_S = 1800   # a unit pod stages data and uploads results around the command's own timeout


def unit_dir_name(unit: str) -> str:
    """A unit id as a path component (``3`` -> ``3``; ``a/b c`` -> ``a_b_c-<hash>``)."""
    clean = _UNIT_ID.sub("_", unit)
    if clean == unit and clean not in (".", ".."):
        return clean
    return f"{clean[:40]}-{hashlib.sha256(unit.encode()).hexdigest()[:8]}"


def unit_signature(unit: str, keys: list[str], upstream: dict, trainer: dict, extra: dict | None = None) -> str:
    """What a unit's result depends on: its keys (sorted), upstream prefixes, the trainer, the eval set."""
    h = hashlib.sha256()
    for k in sorted(keys):
        h.update(k.encode() + b"\n")
    blob = json.dumps({"contract": UNIT_CONTRACT_VERSION, "unit": unit, "keys": h.hexdigest(), "n": len(keys),
                       "upstream": upstream, "trainer": trainer, "extra": extra or {}},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def expand(spec: TrainerSpec, values: dict[str, str]) -> list[str]:
    """The command's argv with placeholders filled in; a leading ``python`` is the interpreter running
    curate (its virtual environment locally, the image's Python in a pod), not whatever ``python`` is first
    on PATH."""
    out = []
    for part in spec.command + spec.args:
        s = str(part)
        for name in PLACEHOLDERS:
            s = s.replace("{" + name + "}", str(values.get(name, "")))
        out.append(s)
    if out and out[0] in ("python", "python3"):
        out[0] = sys.executable
    return out


def run_command(argv: list[str], workdir: str, timeout_s: int, env: dict | None = None) -> int:
    """Run the trainer in its own process group, log to ``workdir/trainer.log``; map the exit code.

    Raises:
        TrainerPermanentError: exit 3.
        TrainerRetryableError: any other non-zero exit, a signal, the timeout, or a command not found.
    """
    log = os.path.join(workdir, LOG_FILE)
    full_env = {**os.environ, **{k: str(v) for k, v in (env or {}).items()}}
    t0 = time.monotonic()
    with open(log, "wb") as out:
        try:
            proc = subprocess.Popen(argv, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, env=full_env,
                                    start_new_session=True)
        except OSError as e:
            # A missing executable in the image: retrying the same image fails the same way.
            raise TrainerPermanentError(f"trainer command {argv[0]!r} cannot start: {e}") from e
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise TrainerRetryableError(f"trainer ran past timeout_s={timeout_s} and was killed; "
                                        f"log: {log}") from None
        except BaseException:
            _kill_group(proc)   # Ctrl-C / SIGTERM of the runner: leave no trainer behind
            raise
    tail = _tail(log)
    if rc == 0:
        return rc
    how = f"signal {-rc}" if rc < 0 else f"exit {rc}"
    msg = f"trainer failed ({how}) after {time.monotonic() - t0:.1f}s: {' '.join(argv)}\n--- {log} (tail) ---\n{tail}"
    if rc == EXIT_PERMANENT:
        raise TrainerPermanentError(msg)
    raise TrainerRetryableError(msg)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _tail(path: str, n: int = 4000) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - n))
        return f.read().decode("utf-8", "replace")


def trim_log(path: str, limit: int = LOG_TAIL_BYTES) -> None:
    """Keep the last ``limit`` bytes of a trainer log (a chatty trainer must not fill the store)."""
    if os.path.exists(path) and os.path.getsize(path) > limit:
        with open(path, "rb") as f:
            f.seek(-limit, os.SEEK_END)
            data = f.read()
        with open(path, "wb") as f:
            f.write(data)


@dataclass
class UnitResult:
    """What a finished unit reported: ``result`` (the whole result.json), its ``label`` value and the
    per-sample ``outputs`` (field -> float64 [n], in ``keys`` order)."""

    unit: str
    keys: list[str]
    result: dict
    label: float
    outputs: dict[str, np.ndarray]


def read_result(workdir: str, unit: str, keys: list[str], label_key: str, outputs: tuple = ()) -> UnitResult:
    """Validate and read ``result.json`` (and ``outputs.jsonl`` when ``outputs`` are required).

    Raises:
        ResultMissing: no result.json, not a JSON object, the label missing or not a finite number, or
            outputs.jsonl missing a required field / key, holding an unknown key or a non-finite value.
    """
    path = os.path.join(workdir, RESULT_FILE)
    if not os.path.exists(path):
        raise ResultMissing(f"unit {unit!r}: the trainer exited 0 but wrote no {RESULT_FILE} in {workdir}")
    try:
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ResultMissing(f"unit {unit!r}: {path} is not valid JSON: {e}") from e
    if not isinstance(result, dict):
        raise ResultMissing(f"unit {unit!r}: {path} must hold a JSON object")
    label = result.get(label_key)
    if isinstance(label, bool) or not isinstance(label, (int, float)) or not math.isfinite(label):
        raise ResultMissing(f"unit {unit!r}: {path} has no finite number under {label_key!r} "
                            f"(got {label!r}; keys: {sorted(result)})")
    out: dict[str, np.ndarray] = {}
    if outputs:
        out = read_outputs(os.path.join(workdir, OUTPUTS_FILE), unit, keys, outputs)
    return UnitResult(unit, list(keys), result, float(label), out)


def read_outputs(path: str, unit: str, keys: list[str], fields: tuple) -> dict[str, np.ndarray]:
    """Per-sample outputs in ``keys`` order; every key exactly once, every field finite."""
    if not os.path.exists(path):
        raise ResultMissing(f"unit {unit!r}: outputs {list(fields)} required but the trainer wrote no {path}")
    index = {k: i for i, k in enumerate(keys)}
    vals = {f: np.full(len(keys), np.nan) for f in fields}
    seen = np.zeros(len(keys), bool)
    with open(path, encoding="utf-8") as fh:
        for ln, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ResultMissing(f"unit {unit!r}: {path}:{ln}: not JSON: {e}") from e
            i = index.get(obj.get("key")) if isinstance(obj, dict) else None
            if i is None:
                raise ResultMissing(f"unit {unit!r}: {path}:{ln}: key {obj.get('key') if isinstance(obj, dict) else obj!r}"
                                    " is not a sample of this unit")
            if seen[i]:
                raise ResultMissing(f"unit {unit!r}: {path}:{ln}: key {keys[i]} given twice")
            seen[i] = True
            for f in fields:
                v = obj.get(f)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ResultMissing(f"unit {unit!r}: {path}:{ln}: {f!r} = {v!r} is not a finite number")
                vals[f][i] = float(v)
    if not seen.all():
        missing = [keys[i] for i in np.flatnonzero(~seen)[:5]]
        raise ResultMissing(f"unit {unit!r}: {path} lacks {int((~seen).sum())} of {len(keys)} keys "
                            f"(e.g. {missing})")
    return vals


# -- the trainer's side: reading what the stage prepared --------------------------------------------
def load_keys(data_dir: str) -> list[str]:
    with open(os.path.join(data_dir, KEYS_FILE), encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def load_features(data_dir: str) -> tuple[np.ndarray, dict]:
    """``features.npy`` [n, d] float32 and its meta ``{"names", "dims", "columns"}``."""
    with open(os.path.join(data_dir, FEATURES_META), encoding="utf-8") as f:
        meta = json.load(f)
    x = np.load(os.path.join(data_dir, FEATURES_FILE), allow_pickle=False)
    if x.ndim != 2 or x.shape[1] != sum(meta["dims"]):
        raise ValueError(f"features.npy shape {x.shape} does not match features.json dims {meta['dims']}")
    return x, meta


def write_features(data_dir: str, matrix: np.ndarray, names: list[str], dims: list[int]) -> None:
    """The stage's side: the unit's feature matrix and its one named order."""
    cols, start = [], 0
    for d in dims:
        cols.append([start, start + d])
        start += d
    np.save(os.path.join(data_dir, FEATURES_FILE), np.ascontiguousarray(matrix, np.float32), allow_pickle=False)
    with open(os.path.join(data_dir, FEATURES_META), "w", encoding="utf-8") as f:
        json.dump({"names": list(names), "dims": list(dims), "columns": cols, "keys": KEYS_FILE}, f, indent=1)


def write_result(workdir: str, result: dict, outputs: dict[str, dict[str, float]] | None = None) -> None:
    """The trainer's side: ``outputs.jsonl`` first, then ``result.json`` (strict JSON, atomic)."""
    if outputs is not None:
        tmp = os.path.join(workdir, OUTPUTS_FILE + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for key, fields in outputs.items():
                f.write(json.dumps({"key": key, **fields}, allow_nan=False, sort_keys=True) + "\n")
        os.replace(tmp, os.path.join(workdir, OUTPUTS_FILE))
    tmp = os.path.join(workdir, RESULT_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, allow_nan=False, sort_keys=True, indent=1)
    os.replace(tmp, os.path.join(workdir, RESULT_FILE))
