"""Execute rendered Argo documents the way the workflow controller would, for the features curate uses.

    docs = load_documents(render(recipe, out_dir, prefix="s3://bucket/run"))
    ex = ArgoExecutor(docs, secrets={"curate-s3": {"AWS_ENDPOINT_URL": ...}}, device_rewrite="cpu")
    run = ex.run("Workflow")            # or "CronWorkflow": one scheduled run of its workflowSpec
    assert run.phase == "Succeeded", run.message
    run.shards("score-clip")            # the --shards of every score-clip pod that ran

What is implemented (the controller's semantics, reduced to what curate renders):

* documents: a Workflow or a CronWorkflow (its ``workflowSpec``) referencing a WorkflowTemplate by
  ``workflowTemplateRef``, the recipe ConfigMap, and the ConfigMaps the semaphores name (by default
  ``k8s/*.yaml``);
* parameters: ``spec.arguments`` of the template (defaults, ``enum`` checked), overridden by the
  Workflow's arguments, then by ``run(parameters=...)`` (``argo submit -p``); ``{{workflow.parameters.X}}``,
  ``{{inputs.parameters.X}}`` (declared inputs, optional ``value`` default), ``{{tasks.X.outputs.result}}``
  (X must be a dependency; the container's stdout, at most 256 KiB: more is :class:`Unsupported`),
  ``{{item}}`` / ``{{item.key}}``. Any other ``{{...}}`` form (expressions ``{{=...}}``, steps, outputs.parameters) is
  :class:`Unsupported`;
* DAG templates: ``depends`` as ``a && b`` of task names in the same DAG (a bare name is satisfied by
  Succeeded or Skipped, as Argo's ``depends``); a failed or omitted dependency omits the task; after a
  failure no new task starts (Argo's DAG fail-fast) and the DAG fails; ``when`` as ``A == B`` after
  substitution (false: the task is Skipped); ``withParam`` (a JSON list, else the task fails) and
  ``withItems``, one child node per item, an empty list skips the task; ``parallelism`` caps running
  children of one DAG node (the peak is recorded);
* container templates: ``command``/``args`` after substitution, run as a local subprocess (see below);
  ``retryStrategy`` {limit, retryPolicy Always, expression ``asInt(lastRetry.exitCode) != 3`` and
  nothing else, backoff duration/factor/maxDuration}; ``activeDeadlineSeconds`` kills the pod's process
  group (exit code 137, retryable like any non-3 code), the workflow's ``activeDeadlineSeconds`` bounds
  the whole run; ``envFrom`` secretRef from ``secrets=`` (optional ones may be absent; a missing
  required one fails the pod, as CreateContainerConfigError would); ``synchronization.semaphores`` with
  the limit read from the named ConfigMap key (held while the pod runs);
* volumes: the recipe ConfigMap (``configMap.name`` after substitution must be a given ConfigMap)
  materialised as files; an ``emptyDir`` at ``/tmp`` (required: the image's root filesystem is
  read-only) is a fresh short-named directory per attempt, deleted after it (``TMPDIR``; each retry is a
  new pod); the memory ``emptyDir`` at ``/dev/shm`` is the host's ``/dev/shm``. Any other volume or
  mount path is :class:`Unsupported`. When a pod's main process exits, whatever it started is killed.

Every key of every document is checked against the whitelists below before anything runs: a key the
harness does not know raises :class:`Unsupported`, so a feature added to ``workflows/dag.py`` fails the
tests until the harness implements it. Keys that only matter on a real cluster are whitelisted as
*scheduling-only* (:class:`Sched`, each with the reason); the ones the documents use are listed in
``Execution.scheduling_only``.

Execution path: pods run as local subprocesses (``cwd`` = the repository, like the image's ``/app``),
because this harness does not drive podman (``Execution.executor`` says so, with the probe's result).
Rewrites, each recorded in ``Execution.rewrites``:

* ``python`` (the image's ``/opt/venv/bin/python``) -> this interpreter (``sys.executable``);
* arguments under a ConfigMap's ``mountPath`` (``/etc/curate/recipe.yaml``) -> the materialised file;
* ``--device cuda...`` -> ``device_rewrite`` (only when given, e.g. ``"cpu"`` on a machine without
  a GPU, where the stage would otherwise fail on purpose: ``model_device`` refuses a silent fallback).

Emulations: a pod of the ``curate-cpu`` image cannot import torch, torchvision, open_clip,
transformers, timm or sentence_transformers (a ``sitecustomize`` blocker, the same set as
tests/test_container_deps.py); a pod that requests no ``nvidia.com/gpu`` sees no GPU
(``CUDA_VISIBLE_DEVICES=""``); pods get no AWS_*/OPENAI_* variables except through ``envFrom``.

Test hooks, never used unless passed: ``wrap`` replaces one attempt's argv (fault injection: a crash,
a hang), ``deadline_scale`` / ``backoff_scale`` shrink deadlines and back-off waits.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

ROOT = Path(__file__).resolve().parents[1]

RETRY_EXPRESSION = "asInt(lastRetry.exitCode) != 3"
RESULT_LIMIT = 256 * 1024               # outputs.result bound (Argo keeps stdout results in the node status)
EXIT_DEADLINE = 128 + signal.SIGKILL    # what the runtime reports for a pod killed at its deadline
CPU_IMAGE_BLOCKED = ("torch", "torchvision", "open_clip", "transformers", "timm", "sentence_transformers")


class Unsupported(Exception):
    """The documents use a field, value or form the harness does not implement (or that Argo rejects)."""


# -- whitelists ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Obj:
    """A mapping with exactly these keys allowed (``required`` must be present)."""

    fields: dict
    required: tuple = ()


@dataclass(frozen=True)
class Map:
    """Free-form keys (labels, nodeSelector) with values of ``value``; ``keys`` restricts the keys."""

    value: Any
    keys: tuple | None = None


@dataclass(frozen=True)
class List:
    item: Any


@dataclass(frozen=True)
class OneOf:
    """A scalar that must be one of ``values`` (other values mean other semantics: unsupported)."""

    values: tuple


@dataclass(frozen=True)
class Sched:
    """Scheduling-only: validated against ``spec``, without effect in a local run, for ``why``."""

    spec: Any
    why: str


INT_OR_STR = (int, str)
LABELS = Map(str)
POD_SC = Obj({"fsGroup": int, "runAsGroup": int, "runAsNonRoot": bool, "runAsUser": int,
              "seccompProfile": Obj({"type": str}, ("type",))})
CTR_SC = Obj({"allowPrivilegeEscalation": bool, "privileged": bool, "readOnlyRootFilesystem": bool,
              "runAsNonRoot": bool, "runAsUser": int, "runAsGroup": int,
              "capabilities": Obj({"drop": List(str), "add": List(str)}),
              "seccompProfile": Obj({"type": str}, ("type",))})
RESOURCE_KEYS = ("cpu", "memory", "nvidia.com/gpu", "ephemeral-storage")
RESOURCES = Obj({"requests": Map(str, RESOURCE_KEYS), "limits": Map(str, RESOURCE_KEYS)})
PARAM_DECL = Obj({"name": str, "value": str, "description": str, "enum": List(str)}, ("name",))
ARG_PARAM = Obj({"name": str, "value": str}, ("name", "value"))
ARGUMENTS = Obj({"parameters": List(ARG_PARAM)})
LABELS_ONLY = "labels and annotations select and describe pods; nothing runs differently"

CONTAINER = Obj({
    "name": str,
    "image": str,        # used: the cpu image's import emulation
    "imagePullPolicy": Sched(OneOf(("IfNotPresent", "Always", "Never")), "image pulls: nothing is pulled"),
    "command": List(str),
    "args": List(str),
    "envFrom": List(Obj({"secretRef": Obj({"name": str, "optional": bool}, ("name",))}, ("secretRef",))),
    # nvidia.com/gpu is read (a pod without it sees no GPU); cpu/memory sizes have no local effect
    "resources": Sched(RESOURCES, "node sizing (nvidia.com/gpu is read: without it the pod sees no GPU)"),
    "securityContext": Sched(CTR_SC, "pods run as the test's user on the host filesystem"),
    "volumeMounts": List(Obj({"name": str, "mountPath": str,
                              "readOnly": Sched(bool, "not enforced on the host filesystem")},
                             ("name", "mountPath"))),
}, ("image", "command"))

TASK = Obj({"name": str, "template": str, "depends": str, "when": str, "arguments": ARGUMENTS,
            "withParam": str, "withItems": List((str, int, bool, dict))}, ("name", "template"))

TEMPLATE = Obj({
    "name": str,
    "container": CONTAINER,
    "dag": Obj({"tasks": List(TASK)}, ("tasks",)),
    "inputs": Obj({"parameters": List(Obj({"name": str, "value": str, "description": str}, ("name",)))}),
    "metadata": Obj({"labels": Sched(LABELS, LABELS_ONLY), "annotations": Sched(LABELS, LABELS_ONLY)}),
    "retryStrategy": Obj({"limit": INT_OR_STR, "retryPolicy": OneOf(("Always",)),
                          "expression": OneOf((RETRY_EXPRESSION,)),
                          "backoff": Obj({"duration": INT_OR_STR, "factor": INT_OR_STR,
                                          "maxDuration": INT_OR_STR}, ("duration",))}),
    "activeDeadlineSeconds": INT_OR_STR,
    "parallelism": int,
    "synchronization": Obj({"semaphores": List(Obj({"configMapKeyRef": Obj({"name": str, "key": str},
                                                                           ("name", "key"))},
                                                   ("configMapKeyRef",)))}, ("semaphores",)),
    "securityContext": Sched(POD_SC, "pods run as the test's user"),
    "tolerations": Sched(List(Obj({"key": str, "operator": OneOf(("Exists", "Equal")), "value": str,
                                   "effect": str}, ("key",))), "node pools: one local machine"),
    "nodeSelector": Sched(Map(str), "node pools: one local machine"),
    "priorityClassName": Sched(str, "pre-emption order on a busy cluster"),
}, ("name",))

WT_SPEC = Obj({
    "activeDeadlineSeconds": INT_OR_STR,
    "arguments": Obj({"parameters": List(PARAM_DECL)}),
    "entrypoint": str,
    "templates": List(TEMPLATE),
    "volumes": List(Obj({"name": str, "configMap": Obj({"name": str}, ("name",)),
                         "emptyDir": Obj({"medium": OneOf(("", "Memory")),
                                          "sizeLimit": Sched(str, "local disk/memory is not capped")})},
                        ("name",))),
    "serviceAccountName": Sched(str, "RBAC / workload identity: credentials come from envFrom here"),
    "securityContext": Sched(POD_SC, "pods run as the test's user"),
    "podGC": Sched(Obj({"strategy": OneOf(("OnPodSuccess", "OnPodCompletion", "OnWorkflowSuccess",
                                           "OnWorkflowCompletion"))}), "pod clean-up: logs stay in the work dir"),
    "ttlStrategy": Sched(Obj({"secondsAfterSuccess": int, "secondsAfterFailure": int,
                              "secondsAfterCompletion": int}), "workflow clean-up"),
}, ("entrypoint", "templates"))

METADATA = Obj({"name": str, "generateName": str, "labels": Sched(LABELS, LABELS_ONLY),
                "annotations": Sched(LABELS, LABELS_ONLY)})
WF_SPEC = Obj({"workflowTemplateRef": Obj({"name": str}, ("name",)), "arguments": ARGUMENTS},
              ("workflowTemplateRef",))
API = OneOf(("argoproj.io/v1alpha1",))
SCHEMAS = {
    "WorkflowTemplate": Obj({"apiVersion": API, "kind": str,
                             "metadata": Obj({"name": str, "labels": Sched(LABELS, LABELS_ONLY),
                                              # curate/recipe-configmap is checked against the ConfigMap
                                              "annotations": Map(str)}, ("name",)),
                             "spec": WT_SPEC}, ("apiVersion", "kind", "metadata", "spec")),
    "Workflow": Obj({"apiVersion": API, "kind": str, "metadata": METADATA, "spec": WF_SPEC},
                    ("apiVersion", "kind", "metadata", "spec")),
    "CronWorkflow": Obj({"apiVersion": API, "kind": str, "metadata": METADATA, "spec": Obj({
        "schedules": Sched(List(str), "when the controller starts a run: run() is one scheduled run"),
        "schedule": Sched(str, "when the controller starts a run: run() is one scheduled run"),
        "timezone": Sched(str, "when the controller starts a run"),
        # Forbid: a run while another is in progress is refused (enforced by run())
        "concurrencyPolicy": OneOf(("Forbid",)),
        "startingDeadlineSeconds": Sched(int, "missed schedules: runs start on demand here"),
        "successfulJobsHistoryLimit": Sched(int, "history of finished workflows"),
        "failedJobsHistoryLimit": Sched(int, "history of finished workflows"),
        "workflowSpec": WF_SPEC}, ("workflowSpec",))}, ("apiVersion", "kind", "metadata", "spec")),
    "ConfigMap": Obj({"apiVersion": OneOf(("v1",)), "kind": str,
                      "metadata": Obj({"name": str, "namespace": Sched(str, "one namespace here"),
                                       "labels": Sched(LABELS, LABELS_ONLY),
                                       # curate/recipe-sha256 is checked against the data
                                       "annotations": Map(str)}, ("name",)),
                      "data": Map(str)}, ("apiVersion", "kind", "metadata", "data")),
}


def _gen(path: str) -> str:
    return re.sub(r"\[[^\]]*\]", "[]", path)


def validate(value: Any, spec: Any, path: str, sched: set[str]) -> None:
    """Check ``value`` against a whitelist ``spec``; unknown keys and values raise :class:`Unsupported`."""
    if isinstance(spec, Sched):
        sched.add(f"{_gen(path)}: {spec.why}")
        validate(value, spec.spec, path, sched)
    elif isinstance(spec, Obj):
        if not isinstance(value, dict):
            raise Unsupported(f"{path}: expected a mapping, got {type(value).__name__}")
        for k in value:
            if k not in spec.fields:
                raise Unsupported(f"{path}.{k}: field not understood by the harness (known: "
                                  f"{', '.join(sorted(spec.fields))})")
        for k in spec.required:
            if k not in value:
                raise Unsupported(f"{path}: required field {k!r} missing")
        for k, v in value.items():
            validate(v, spec.fields[k], f"{path}.{k}", sched)
    elif isinstance(spec, Map):
        if not isinstance(value, dict):
            raise Unsupported(f"{path}: expected a mapping")
        for k, v in value.items():
            if spec.keys is not None and k not in spec.keys:
                raise Unsupported(f"{path}.{k}: key not understood by the harness (known: {spec.keys})")
            validate(v, spec.value, f"{path}.{k}", sched)
    elif isinstance(spec, List):
        if not isinstance(value, list):
            raise Unsupported(f"{path}: expected a list")
        for i, v in enumerate(value):
            key = v.get("name", i) if isinstance(v, dict) else i
            validate(v, spec.item, f"{path}[{key}]", sched)
    elif isinstance(spec, OneOf):
        if value not in spec.values:
            raise Unsupported(f"{path}: value {value!r} not implemented by the harness (only {spec.values})")
    else:
        types = spec if isinstance(spec, tuple) else (spec,)
        if isinstance(value, bool) and bool not in types:
            raise Unsupported(f"{path}: expected {types}, got bool")
        if not isinstance(value, types):
            raise Unsupported(f"{path}: expected {types}, got {type(value).__name__}")


# -- small parsers ---------------------------------------------------------------------------------
_TPL = re.compile(r"\{\{(.*?)\}\}")
_NAME = r"[A-Za-z0-9_-]+"
_REF_FORMS = [re.compile(p) for p in (rf"workflow\.parameters\.{_NAME}", rf"inputs\.parameters\.{_NAME}",
                                      rf"tasks\.{_NAME}\.outputs\.result", r"item", rf"item\.{_NAME}")]


def check_refs(text: str, where: str) -> list[str]:
    """The ``{{...}}`` references in ``text``; a form the harness does not implement raises."""
    refs = []
    for m in _TPL.finditer(text):
        ref = m.group(1).strip()
        if not any(f.fullmatch(ref) for f in _REF_FORMS):
            raise Unsupported(f"{where}: template reference {{{{{m.group(1)}}}}} not implemented")
        refs.append(ref)
    if "{{" in _TPL.sub("", text) or "}}" in _TPL.sub("", text):
        raise Unsupported(f"{where}: unbalanced template braces in {text!r}")
    return refs


def substitute(text: str, scope: dict[str, str], where: str) -> str:
    def one(m):
        ref = m.group(1).strip()
        if ref not in scope:
            raise Unsupported(f"{where}: {{{{{ref}}}}} cannot be resolved here (known: {sorted(scope)})")
        return scope[ref]
    check_refs(text, where)
    return _TPL.sub(one, text)


def parse_depends(expr: str, names: set[str], where: str) -> list[str]:
    """``a && b``: the only ``depends`` form curate renders; ``||``, ``!``, ``.Failed`` etc. raise."""
    parts = [p.strip() for p in expr.split("&&")]
    for p in parts:
        if not re.fullmatch(_NAME, p):
            raise Unsupported(f"{where}: depends {expr!r}: only '&&' of task names is implemented")
        if p not in names:
            raise Unsupported(f"{where}: depends on unknown task {p!r}")
    return parts


def eval_when(expr: str, where: str) -> bool:
    """``A == B`` after substitution (a string comparison of the two sides); other forms raise."""
    m = re.fullmatch(r"\s*([^\s=!<>&|()]+)\s*==\s*([^\s=!<>&|()]+)\s*", expr)
    if not m:
        raise Unsupported(f"{where}: when {expr!r}: only 'A == B' is implemented")
    return m.group(1) == m.group(2)


def retry_wanted(expression: str, exit_code: int) -> bool:
    if expression != RETRY_EXPRESSION:
        raise Unsupported(f"retry expression {expression!r} not implemented")
    return exit_code != 3


def duration_s(v: Any) -> float:
    """Argo durations: an int (seconds) or a Go duration string (``90s``, ``1m``, ``1h30m``)."""
    if isinstance(v, int) or (isinstance(v, str) and v.isdigit()):
        return float(v)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", v)
    if not parts or "".join(a + b for a, b in parts) != v:
        raise Unsupported(f"duration {v!r} not understood")
    unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(a) * unit[b] for a, b in parts)


def load_documents(paths) -> list[dict]:
    """Parse rendered YAML files (paths, or a directory of them) into documents."""
    if isinstance(paths, (str, Path)) and Path(paths).is_dir():
        paths = sorted(Path(paths).glob("*.yaml"))
    docs = []
    for p in paths:
        docs.extend(d for d in yaml.safe_load_all(Path(p).read_text()) if d)
    return docs


def cluster_configmaps() -> list[dict]:
    """The ConfigMaps of ``k8s/`` (the GPU semaphore's budget)."""
    out = []
    for p in sorted((ROOT / "k8s").glob("*.yaml")):
        out.extend(d for d in yaml.safe_load_all(p.read_text()) if d and d.get("kind") == "ConfigMap")
    return out


def podman_probe() -> str:
    if not shutil.which("podman"):
        return "podman not installed"
    return "podman installed, but this harness does not drive it"


# -- results ----------------------------------------------------------------------------------------
@dataclass
class Attempt:
    exit_code: int
    seconds: float
    killed: bool            # at its activeDeadlineSeconds (or the workflow's)
    wrapped: bool           # argv replaced by the test's ``wrap`` hook
    log: str                # path of stdout+stderr


@dataclass
class Pod:
    node: str
    template: str
    argv: list[str]                       # what ran (after substitution and rewrites)
    rendered: list[str]                   # after substitution, before rewrites
    attempts: list[Attempt] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)      # back-off before each retry (scaled)
    phase: str = "Pending"
    result: str | None = None

    def arg(self, flag: str) -> str | None:
        return self.argv[self.argv.index(flag) + 1] if flag in self.argv else None


@dataclass
class Execution:
    """What one workflow run did.

    Attributes:
        phase: ``Succeeded`` or ``Failed``; message: why it failed.
        nodes: node path -> phase (Succeeded, Failed, Skipped, Omitted).
        pods: every container node, with its argv (after substitution and rewrites) and attempts.
        rewrites: every change made to what the documents say, with the reason.
        scheduling_only: whitelisted fields without local effect that the documents used.
        peak: DAG node -> most children running at once (bounded by its ``parallelism``).
    """

    phase: str
    message: str
    nodes: dict[str, str]
    pods: list[Pod]
    rewrites: list[str]
    scheduling_only: list[str]
    executor: str
    parameters: dict[str, str]
    peak: dict[str, int]
    parallelism: dict[str, int | None]
    seconds: float

    def pods_of(self, template: str) -> list[Pod]:
        return [p for p in self.pods if p.template == template]

    def shards(self, template: str) -> list[str]:
        """``--shards`` of the succeeded pods of ``template``, sorted."""
        return sorted(p.arg("--shards") for p in self.pods_of(template) if p.phase == "Succeeded")

    def summary(self) -> str:
        lines = [f"{self.phase} in {self.seconds:.1f}s ({len(self.pods)} pods, executor: {self.executor})"]
        for p in self.pods:
            codes = ",".join(str(a.exit_code) for a in p.attempts)
            secs = sum(a.seconds for a in p.attempts)
            lines.append(f"  {p.phase:<9} {secs:5.1f}s {p.node}  exit={codes}  {' '.join(p.rendered[2:])}")
        return "\n".join(lines + [f"  rewrite: {r}" for r in self.rewrites])


class _Failed(Exception):
    pass


# -- the executor ----------------------------------------------------------------------------------
class ArgoExecutor:
    """Runs the rendered documents; see the module docstring for what is implemented.

    Args:
        documents: parsed documents (:func:`load_documents`): one WorkflowTemplate, a Workflow and/or a
            CronWorkflow, and ConfigMaps (the recipe; the semaphore ConfigMaps come from ``k8s/`` unless
            ``configmaps`` is given).
        secrets: Secret name -> its variables (``envFrom``).
        max_pods: pods running at once on this machine (each DAG's ``parallelism`` still caps its own).
        deadline_scale: multiplies every ``activeDeadlineSeconds`` (1 = as rendered).
        backoff_scale: multiplies retry back-off waits and ``maxDuration`` (0 = retry at once, and
            ``maxDuration`` is not applied).
        device_rewrite: replace ``--device cuda...`` by this (recorded); None = run as rendered.
        wrap: test hook ``(pod, attempt, argv) -> argv`` to inject faults into a pod's attempt.
        workdir: where ConfigMaps, pod temp dirs and logs go (default: a new temp dir).
    """

    def __init__(self, documents: list[dict], *, secrets: dict[str, dict[str, str]] | None = None,
                 configmaps: list[dict] | None = None, max_pods: int = 1, deadline_scale: float = 1.0,
                 backoff_scale: float = 0.0, device_rewrite: str | None = None,
                 wrap: Callable[[Pod, int, list[str]], list[str]] | None = None, workdir: str | None = None,
                 log: Callable[[str], None] | None = None):
        self.secrets = secrets or {}
        self.max_pods = max_pods
        self.deadline_scale = deadline_scale
        self.backoff_scale = backoff_scale
        self.device_rewrite = device_rewrite
        self.wrap = wrap
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="argo-exec-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.sched: set[str] = set()
        self.by_kind: dict[str, dict] = {}
        self.configmaps: dict[str, dict] = {}
        for doc in list(documents) + list(cluster_configmaps() if configmaps is None else configmaps):
            kind = doc.get("kind") if isinstance(doc, dict) else None
            if kind not in SCHEMAS:
                raise Unsupported(f"document kind {kind!r} not implemented")
            validate(doc, SCHEMAS[kind], kind, self.sched)
            if kind == "ConfigMap":
                self.configmaps[doc["metadata"]["name"]] = doc
            elif kind in self.by_kind:
                raise Unsupported(f"more than one {kind}")
            else:
                self.by_kind[kind] = doc
        if "WorkflowTemplate" not in self.by_kind:
            raise Unsupported("no WorkflowTemplate")
        self.wt = self.by_kind["WorkflowTemplate"]
        self.templates = {t["name"]: t for t in self.wt["spec"]["templates"]}
        if len(self.templates) != len(self.wt["spec"]["templates"]):
            raise Unsupported("duplicate template names")
        self._check_static()
        self._lock = threading.Lock()          # concurrencyPolicy Forbid: one run at a time
        self._mu = threading.Lock()

    # -- static checks (before anything runs) ---------------------------------------------------------
    def _check_static(self) -> None:
        spec = self.wt["spec"]
        if spec["entrypoint"] not in self.templates:
            raise Unsupported(f"entrypoint {spec['entrypoint']!r} is no template")
        self.volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for v in self.volumes.values():
            if ("configMap" in v) == ("emptyDir" in v):
                raise Unsupported(f"volume {v['name']!r}: exactly one of configMap/emptyDir is implemented")
        for name, cm in self.configmaps.items():
            want = (cm["metadata"].get("annotations") or {}).get("curate/recipe-sha256")
            if want and hashlib.sha256(cm["data"].get("recipe.yaml", "").encode()).hexdigest() != want:
                raise Unsupported(f"ConfigMap {name}: recipe.yaml does not match its curate/recipe-sha256")
            for k in cm["metadata"].get("annotations") or {}:
                if k != "curate/recipe-sha256":
                    raise Unsupported(f"ConfigMap {name}: annotation {k!r} not understood")
        for k, v in (self.wt["metadata"].get("annotations") or {}).items():
            if k == "curate/recipe-configmap":
                if v not in self.configmaps:
                    raise Unsupported(f"WorkflowTemplate names recipe ConfigMap {v!r}, which is not given")
            elif k != "workflows.argoproj.io/description":
                raise Unsupported(f"WorkflowTemplate annotation {k!r} not understood")
        self.sched.add("WorkflowTemplate.metadata.annotations.workflows.argoproj.io/description: text for people")
        for t in self.templates.values():
            where = f"template {t['name']}"
            if ("container" in t) == ("dag" in t):
                raise Unsupported(f"{where}: exactly one of container/dag is implemented")
            if "dag" in t:
                for k in ("retryStrategy", "activeDeadlineSeconds", "synchronization"):
                    if k in t:
                        raise Unsupported(f"{where}: {k} on a DAG template is not implemented")
                names = {x["name"] for x in t["dag"]["tasks"]}
                if len(names) != len(t["dag"]["tasks"]):
                    raise Unsupported(f"{where}: duplicate task names")
                for task in t["dag"]["tasks"]:
                    tw = f"{where} task {task['name']}"
                    if task["template"] not in self.templates:
                        raise Unsupported(f"{tw}: unknown template {task['template']!r}")
                    if "withParam" in task and "withItems" in task:
                        raise Unsupported(f"{tw}: withParam and withItems together")
                    if "depends" in task:
                        parse_depends(task["depends"], names, tw)
                    for s in _strings(task):
                        check_refs(s, tw)
                    if "when" in task:       # the form, before any value is known
                        eval_when(_TPL.sub("x", task["when"]), tw)
                self._check_acyclic(t)
            else:
                if "parallelism" in t:
                    raise Unsupported(f"{where}: parallelism on a container template is not implemented")
                if not re.search(r"/curate-(cpu|gpu):[^/:{}]+$", t["container"]["image"]):
                    raise Unsupported(f"{where}: image {t['container']['image']!r}: only curate-cpu / "
                                      "curate-gpu are emulated")
                cmd = t["container"]["command"]
                if not cmd or cmd[0] != "python":
                    raise Unsupported(f"{where}: command {cmd!r}: only the image's python is implemented")
                for s in _strings(t):
                    check_refs(s, where)
                if not any(m["mountPath"] == "/tmp" and "emptyDir" in self.volumes.get(m["name"], {})
                           for m in t["container"].get("volumeMounts", [])):
                    raise Unsupported(f"{where}: no emptyDir at /tmp (a read-only root filesystem without "
                                      "a writable /tmp is not emulated)")
                for mnt in t["container"].get("volumeMounts", []):
                    vol = self.volumes.get(mnt["name"])
                    if vol is None:
                        raise Unsupported(f"{where}: mount of undefined volume {mnt['name']!r}")
                    if "emptyDir" in vol and (mnt["mountPath"], vol["emptyDir"].get("medium", "")) not in (
                            ("/tmp", ""), ("/dev/shm", "Memory")):
                        raise Unsupported(f"{where}: emptyDir at {mnt['mountPath']} not implemented")
            declared = {p["name"] for p in (t.get("inputs") or {}).get("parameters", [])}
            for s in _strings(t):
                for ref in check_refs(s, where):
                    if ref.startswith("inputs.parameters.") and ref.split(".", 2)[2] not in declared:
                        raise Unsupported(f"{where}: {{{{{ref}}}}} is not a declared input")
        for s in _strings(self.wt["spec"].get("volumes", [])):
            for ref in check_refs(s, "volumes"):
                if not ref.startswith("workflow.parameters."):
                    raise Unsupported(f"volumes: {{{{{ref}}}}} not implemented")

    def _check_acyclic(self, t: dict) -> None:
        tasks = {x["name"]: x for x in t["dag"]["tasks"]}
        state: dict[str, int] = {}

        def visit(n):
            if state.get(n) == 1:
                raise Unsupported(f"template {t['name']}: dependency cycle at {n!r}")
            if state.get(n) == 2:
                return
            state[n] = 1
            for d in self._deps(tasks[n], set(tasks)):
                visit(d)
            state[n] = 2
        for n in tasks:
            visit(n)

    @staticmethod
    def _deps(task: dict, names: set[str]) -> list[str]:
        return parse_depends(task["depends"], names, task["name"]) if "depends" in task else []

    # -- a run ----------------------------------------------------------------------------------------
    def run(self, kind: str = "Workflow", parameters: dict[str, str] | None = None) -> Execution:
        """One run of the Workflow, or one scheduled run of the CronWorkflow's ``workflowSpec``."""
        if kind not in ("Workflow", "CronWorkflow") or kind not in self.by_kind:
            raise Unsupported(f"no {kind} to run")
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("a run is in progress (concurrencyPolicy: Forbid)")
        try:
            return self._run(kind, parameters or {})
        finally:
            self._lock.release()

    def _run(self, kind: str, overrides: dict[str, str]) -> Execution:
        doc = self.by_kind[kind]
        spec = doc["spec"]["workflowSpec"] if kind == "CronWorkflow" else doc["spec"]
        if spec["workflowTemplateRef"]["name"] != self.wt["metadata"]["name"]:
            raise Unsupported(f"{kind} references template {spec['workflowTemplateRef']['name']!r}, "
                              f"not {self.wt['metadata']['name']!r}")
        decls = {p["name"]: p for p in self.wt["spec"].get("arguments", {}).get("parameters", [])}
        params = {n: p["value"] for n, p in decls.items() if "value" in p}
        for src in ((spec.get("arguments") or {}).get("parameters", []), [
                {"name": k, "value": v} for k, v in overrides.items()]):
            for p in src:
                if p["name"] not in decls:
                    raise Unsupported(f"{kind}: argument {p['name']!r} is not a parameter of the template")
                params[p["name"]] = p["value"]
        for n, p in decls.items():
            if n not in params:
                raise Unsupported(f"parameter {n!r} has no value")
            if "enum" in p and params[n] not in p["enum"]:
                raise Unsupported(f"parameter {n}={params[n]!r} not in its enum {p['enum']}")
        self._run_dir = Path(tempfile.mkdtemp(prefix=f"{kind.lower()}-", dir=self.workdir))
        self._params = {f"workflow.parameters.{k}": v for k, v in params.items()}
        self._cm_dirs: dict[str, Path] = {}
        for v in self.volumes.values():
            if "configMap" in v:
                name = substitute(v["configMap"]["name"], self._params, f"volume {v['name']}")
                if name not in self.configmaps:
                    raise Unsupported(f"volume {v['name']}: ConfigMap {name!r} not given")
                d = self._run_dir / "configmaps" / name
                d.mkdir(parents=True, exist_ok=True)
                for key, text in self.configmaps[name]["data"].items():
                    (d / key).write_text(text)
                self._cm_dirs[v["name"]] = d
        self._pods: list[Pod] = []
        self._nodes: dict[str, str] = {}
        self._rewrites: list[str] = []
        self._peak: dict[str, int] = {}
        self._par: dict[str, int | None] = {}
        self._errors: list[str] = []
        self._pod_slots = threading.BoundedSemaphore(self.max_pods)
        self._semaphores: dict[tuple[str, str], threading.BoundedSemaphore] = {}
        wf_deadline = self.wt["spec"].get("activeDeadlineSeconds")
        t0 = time.monotonic()
        self._deadline = t0 + float(wf_deadline) * self.deadline_scale if wf_deadline is not None else None
        entry = self.wt["spec"]["entrypoint"]
        self._rewrite(f"python -> {sys.executable} (the image's /opt/venv python; pods run as local "
                      f"subprocesses in {ROOT}: {podman_probe()})")
        phase, _ = self._run_template(entry, {}, entry)
        failed = [p.node for p in self._pods if p.phase == "Failed"]
        message = "; ".join(self._errors + (["failed pods: " + ", ".join(failed)] if failed else []))
        if phase != "Succeeded" and not message:
            message = f"{entry} {phase}"
        return Execution(phase=phase, message=message, nodes=dict(self._nodes), pods=list(self._pods),
                         rewrites=list(self._rewrites), scheduling_only=sorted(self.sched),
                         executor="subprocess", parameters=params, peak=dict(self._peak),
                         parallelism=dict(self._par), seconds=time.monotonic() - t0)

    def _error(self, msg: str) -> None:
        with self._mu:
            self._errors.append(msg)
        self.log(f"[argo-exec] {msg}")

    def _rewrite(self, msg: str) -> None:
        with self._mu:
            if msg not in self._rewrites:
                self._rewrites.append(msg)
                self.log(f"[argo-exec] rewrite: {msg}")

    def _set(self, node: str, phase: str) -> None:
        with self._mu:
            self._nodes[node] = phase

    def _run_template(self, name: str, args: dict[str, str], node: str) -> tuple[str, str | None]:
        t = self.templates[name]
        inputs: dict[str, str] = {}
        decl = (t.get("inputs") or {}).get("parameters", [])
        for k in args:
            if k not in {p["name"] for p in decl}:
                raise Unsupported(f"{node}: argument {k!r} is not an input of template {name!r}")
        for p in decl:
            if p["name"] in args:
                inputs[f"inputs.parameters.{p['name']}"] = args[p["name"]]
            elif "value" in p:
                inputs[f"inputs.parameters.{p['name']}"] = p["value"]
            else:
                raise Unsupported(f"{node}: input {p['name']!r} of {name!r} not supplied")
        scope = {**self._params, **inputs}
        if "dag" in t:
            phase = self._run_dag(t, scope, node)
            self._set(node, phase)
            return phase, None
        return self._run_pod(t, scope, node)

    def _run_dag(self, t: dict, scope: dict[str, str], node: str) -> str:
        tasks = {x["name"]: x for x in t["dag"]["tasks"]}
        deps = {n: self._deps(x, set(tasks)) for n, x in tasks.items()}
        closure: dict[str, set[str]] = {}

        def upstream(n):
            if n not in closure:
                closure[n] = set(deps[n]).union(*[upstream(d) for d in deps[n]]) if deps[n] else set()
            return closure[n]

        status: dict[str, str] = {}
        results: dict[str, str] = {}
        par = t.get("parallelism")
        self._par[node] = par
        running = 0
        peak = 0
        failed = False
        # children of this DAG node: (task name, item index) -> future
        futures: dict[cf.Future, tuple[str, int]] = {}
        outcome: dict[str, list[str | None]] = {}    # task -> phase per child
        pool = cf.ThreadPoolExecutor(max_workers=par or 64, thread_name_prefix=node[:20])
        gate = threading.Lock()

        def child(tname, targs, cnode):
            nonlocal running, peak
            with gate:
                running += 1
                peak = max(peak, running)
            try:
                return self._run_template(tname, targs, cnode)
            except _Failed as e:             # the pod could not start (e.g. a missing Secret)
                self._error(str(e))
                self._set(cnode, "Failed")
                return "Failed", None
            finally:
                with gate:
                    running -= 1
        try:
            pending = set(tasks)
            while pending or futures:
                ready = [n for n in sorted(pending) if all(d in status for d in deps[n])]
                for n in ready:
                    pending.discard(n)
                    task, tnode = tasks[n], f"{node}.{n}"
                    if failed or any(status[d] in ("Failed", "Omitted") for d in deps[n]):
                        status[n] = "Omitted"
                        self._set(tnode, "Omitted")
                        continue
                    tscope = dict(scope)
                    for d in upstream(n):
                        if status[d] == "Succeeded" and d in results:
                            tscope[f"tasks.{d}.outputs.result"] = results[d]
                    if "when" in task and not eval_when(substitute(task["when"], tscope, f"{tnode} when"),
                                                        tnode):
                        status[n] = "Skipped"
                        self._set(tnode, "Skipped")
                        continue
                    items: list[Any] | None = None
                    try:
                        if "withParam" in task:
                            raw = substitute(task["withParam"], tscope, f"{tnode} withParam")
                            try:
                                items = json.loads(raw)
                            except ValueError as e:
                                raise _Failed(f"{tnode}: withParam is not JSON: {raw[:200]!r}") from e
                            if not isinstance(items, list):
                                raise _Failed(f"{tnode}: withParam is not a JSON list: {raw[:200]!r}")
                        elif "withItems" in task:
                            items = list(task["withItems"])
                    except _Failed as e:
                        self._error(str(e))
                        status[n] = "Failed"
                        self._set(tnode, "Failed")
                        failed = True
                        continue
                    if items is not None and not items:
                        status[n] = "Skipped"          # Argo: an empty withParam skips the task
                        self._set(tnode, "Skipped")
                        continue
                    todo = [(None, None)] if items is None else list(enumerate(items))
                    outcome[n] = [None] * len(todo)
                    for i, item in todo:
                        iscope = dict(tscope)
                        cnode = tnode
                        if i is not None:
                            text = item if isinstance(item, str) else json.dumps(item, separators=(",", ":"))
                            iscope["item"] = text
                            if isinstance(item, dict):
                                for k, v in item.items():
                                    iscope[f"item.{k}"] = v if isinstance(v, str) else json.dumps(v)
                            cnode = f"{tnode}({i}:{text})"
                        targs = {p["name"]: substitute(p["value"], iscope, f"{cnode} argument {p['name']}")
                                 for p in (task.get("arguments") or {}).get("parameters", [])}
                        fut = pool.submit(child, task["template"], targs, cnode)
                        futures[fut] = (n, i or 0)
                if any(n in status for n in ready):
                    continue         # skipped/omitted/failed at once: their dependents may be ready now
                if not futures:
                    if pending:      # nothing runs and nothing can start (cannot happen in an acyclic DAG)
                        raise Unsupported(f"{node}: tasks {sorted(pending)} can never start")
                    break
                done, _ = cf.wait(list(futures), return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    n, i = futures.pop(fut)
                    phase, result = fut.result()       # Unsupported propagates
                    outcome[n][i] = phase
                    if phase == "Failed":
                        failed = True
                    if all(p is not None for p in outcome[n]):
                        status[n] = "Failed" if "Failed" in outcome[n] else "Succeeded"
                        if "withParam" not in tasks[n] and "withItems" not in tasks[n] and result is not None:
                            results[n] = result
                        if "withParam" in tasks[n] or "withItems" in tasks[n]:
                            self._set(f"{node}.{n}", status[n])
        finally:
            pool.shutdown(wait=True)
        with self._mu:
            self._peak[node] = peak
        return "Failed" if failed else "Succeeded"

    # -- a pod ----------------------------------------------------------------------------------------
    def _run_pod(self, t: dict, scope: dict[str, str], node: str) -> tuple[str, str | None]:
        ctr = t["container"]
        where = f"{node} ({t['name']})"
        image = ctr["image"]
        argv = [substitute(x, scope, where) for x in ctr["command"] + ctr.get("args", [])]
        rendered = list(argv)
        argv[0] = sys.executable
        pod_dir = Path(tempfile.mkdtemp(prefix="pod-", dir=self._run_dir))     # logs
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AWS_", "OPENAI_")) and k not in ("CUDA_VISIBLE_DEVICES", "PYTHONPATH")}
        env.update(PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1", LANG="C.UTF-8")
        for mnt in ctr.get("volumeMounts", []):
            vol, path = self.volumes[mnt["name"]], mnt["mountPath"].rstrip("/")
            if "configMap" in vol:
                local = str(self._cm_dirs[mnt["name"]])
                for i, a in enumerate(argv):
                    if a == path or a.startswith(path + "/"):
                        argv[i] = local + a[len(path):]
                        self._rewrite(f"{path} (ConfigMap {vol['configMap']['name']}) -> {local}")
                    elif path in a:
                        raise Unsupported(f"{where}: argument {a!r} uses {path} in a form not rewritten")
            # the /tmp emptyDir: a fresh short-named directory per attempt (_exec), as each retry is a
            # new pod; the /dev/shm one is the host's
        for ref in ctr.get("envFrom", []):
            sec = ref["secretRef"]
            if sec["name"] in self.secrets:
                env.update(self.secrets[sec["name"]])
            elif not sec.get("optional", False):
                raise _Failed(f"{where}: Secret {sec['name']!r} not found (CreateContainerConfigError)")
        gpus = (ctr.get("resources") or {}).get("limits", {}).get("nvidia.com/gpu")
        if not gpus or gpus == "0":
            env["CUDA_VISIBLE_DEVICES"] = ""
        if "/curate-cpu:" in image:
            site = self._cpu_site()
            env["PYTHONPATH"] = str(site)
        if self.device_rewrite is not None:
            for i in range(len(argv) - 1):
                if argv[i] == "--device" and argv[i + 1].startswith("cuda") and argv[i + 1] != self.device_rewrite:
                    self._rewrite(f"{t['name']}: --device {argv[i + 1]} -> {self.device_rewrite} "
                                  "(no GPU on this machine; the stage refuses cuda without one)")
                    argv[i + 1] = self.device_rewrite
        for a in argv:
            if "{{" in a:
                raise Unsupported(f"{where}: unresolved {a!r}")
        pod = Pod(node=node, template=t["name"], argv=argv, rendered=rendered)
        with self._mu:
            self._pods.append(pod)
        rs = t.get("retryStrategy")
        limit = int(rs.get("limit", 0)) if rs else 0
        backoff = (rs or {}).get("backoff") or {}
        deadline = t.get("activeDeadlineSeconds")
        pod_timeout = float(deadline) * self.deadline_scale if deadline is not None else None
        sems = []
        for s in (t.get("synchronization") or {}).get("semaphores", []):
            ref = s["configMapKeyRef"]
            sems.append(self._semaphore(ref["name"], ref["key"], where))
        first_start = time.monotonic()
        for attempt in range(limit + 1):
            if attempt:
                wait = 0.0
                if backoff:      # duration x factor^(n-1) before the n-th retry, scaled
                    wait = duration_s(backoff["duration"]) * float(backoff.get("factor", 1)) ** (attempt - 1)
                    wait *= self.backoff_scale
                    cap = duration_s(backoff["maxDuration"]) * self.backoff_scale if "maxDuration" in backoff else None
                    if cap is not None and self.backoff_scale > 0 and time.monotonic() - first_start + wait > cap:
                        self._error(f"{node}: the next retry would start after the back-off's maxDuration")
                        break
                pod.waits.append(wait)
                time.sleep(wait)
            run_argv = self.wrap(pod, attempt, list(argv)) if self.wrap else argv
            a = self._exec(run_argv, env, pod_dir, f"{attempt}", pod_timeout, sems, node)
            a.wrapped = run_argv != argv
            pod.attempts.append(a)
            if a.exit_code == 0:
                pod.phase = "Succeeded"
                raw = Path(a.log + ".stdout").read_bytes()
                if len(raw) > RESULT_LIMIT:
                    raise Unsupported(f"{where}: {len(raw)} bytes of stdout: outputs.result above "
                                      f"{RESULT_LIMIT} bytes is not implemented (a node status holds it)")
                out = raw.decode("utf-8", "replace")
                pod.result = out[:-1] if out.endswith("\n") else out
                break
            tail = Path(a.log).read_text(errors="replace")[-1500:]
            self.log(f"[argo-exec] {node}: attempt {attempt} exit {a.exit_code}"
                     f"{' (deadline)' if a.killed else ''}\n{tail}")
            if self._deadline is not None and time.monotonic() >= self._deadline:
                self._error(f"{node}: the workflow's activeDeadlineSeconds passed")
                break
            if rs and "expression" in rs and not retry_wanted(rs["expression"], a.exit_code):
                self.log(f"[argo-exec] {node}: exit {a.exit_code}: the retry expression says no retry")
                break
        if pod.phase != "Succeeded":
            pod.phase = "Failed"
        self._set(node, pod.phase)
        return pod.phase, pod.result

    def _semaphore(self, cm: str, key: str, where: str) -> threading.BoundedSemaphore:
        with self._mu:
            if (cm, key) not in self._semaphores:
                if cm not in self.configmaps or key not in self.configmaps[cm]["data"]:
                    raise Unsupported(f"{where}: semaphore ConfigMap {cm}/{key} not given")
                self._semaphores[(cm, key)] = threading.BoundedSemaphore(int(self.configmaps[cm]["data"][key]))
            return self._semaphores[(cm, key)]

    def _cpu_site(self) -> Path:
        site = self.workdir / "cpu-image-site"
        if not (site / "sitecustomize.py").exists():
            site.mkdir(exist_ok=True)
            (site / "sitecustomize.py").write_text(
                "import importlib.abc, sys\n"
                f"BLOCKED = {set(CPU_IMAGE_BLOCKED)!r}\n"
                "class _NotInImage(importlib.abc.MetaPathFinder):\n"
                "    def find_spec(self, name, path=None, target=None):\n"
                "        if name.split('.')[0] in BLOCKED:\n"
                "            raise ModuleNotFoundError(f'No module named {name!r} (not in the curate-cpu image)')\n"
                "sys.meta_path.insert(0, _NotInImage())\n")
        return site

    def _exec(self, argv: list[str], env: dict, pod_dir: Path, tag: str, timeout: float | None,
              sems: list, node: str) -> Attempt:
        log = str(pod_dir / f"attempt-{tag}.log")
        for s in sems:
            s.acquire()
        self._pod_slots.acquire()
        try:
            t0 = time.monotonic()
            if self._deadline is not None:
                left = max(0.0, self._deadline - t0)
                timeout = left if timeout is None else min(timeout, left)
            # the /tmp emptyDir of this attempt's pod; short, as in a pod (multiprocessing puts AF_UNIX
            # sockets there, whose paths are limited to ~107 bytes)
            tmp = tempfile.mkdtemp(prefix="ae-", dir="/tmp" if os.path.isdir("/tmp") else None)
            with open(log + ".stdout", "wb") as out, open(log, "wb") as err:
                proc = subprocess.Popen(argv, cwd=ROOT, env={**env, "TMPDIR": tmp}, stdout=out, stderr=err,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
                killed = False
                try:
                    rc = proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    killed = True
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    rc = -signal.SIGKILL
                try:                     # a pod ends with its main process: nothing it started survives it
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if killed:
                self.log(f"[argo-exec] {node}: killed at its deadline ({timeout:.1f}s)")
            shutil.rmtree(tmp, ignore_errors=True)          # the emptyDir goes with its pod
        finally:
            self._pod_slots.release()
            for s in reversed(sems):
                s.release()
        code = 128 - rc if rc < 0 else rc        # a signal is reported as 128 + signal by the runtime
        return Attempt(exit_code=EXIT_DEADLINE if killed else code, seconds=time.monotonic() - t0,
                       killed=killed, wrapped=False, log=log)


def _strings(x: Any):
    if isinstance(x, str):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _strings(v)
    elif isinstance(x, list):
        for v in x:
            yield from _strings(v)
