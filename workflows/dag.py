"""Recipe -> Hera objects: a versioned WorkflowTemplate, a Workflow that runs it, a CronWorkflow, and
the recipe ConfigMap. Built from :func:`libcurate.pipeline.plan`, the same plan the local runner runs.

DAG shape (``main``)::

    for each per-shard stage, ingest first:
        <id>-batches (python -m jobs.plan_batches ... -> [{"shards": "0-63"}, ...])
        -> <id>-fanout (a DAG with `parallelism`, one pod per batch via withParam)
      ingest: both steps are skipped when the parameter ingest=false (another producer writes raw/);
              records appended to the annotations since the last run become new shards
      consecutive stages that read only raw/ (their declared ``reads`` names no earlier stage) run
      side by side
    for each `fit` stage (dedup, cluster): <id>-fit (one pod, the stage's profile: CPU or GPU) ->
        <id>-batches -> <id>-fanout (the per-shard sidecar writes of that fit)
    -> global stages (select, export): one pod each, in recipe order
    with ``max_cost``: before each LLM stage's first pod, <id>-budget (python -m jobs.check_budget, CPU
        image): exit 3 over budget, so the stage never starts; each passes the expected cost so far to
        the next LLM stage's check (``spent``), as the local runner does

``plan_batches`` lists only shards without a done marker (for ingest: the shards of the annotations'
record layout, ``raw/_ingest.json``, without one), so a re-run (or the nightly CronWorkflow) starts pods
only for shards added since the last run; an empty list skips the fan-out. Ingest pods are independent:
each parses the annotations itself and writes the same ``raw/_ingest.json`` (identical text, atomic).

Every template: the stage image from :mod:`workflows.tables`, ``command: python -m jobs.<stage>``, the
recipe at ``/etc/curate/recipe.yaml`` (ConfigMap), credentials by ``envFrom`` Secret reference
(optional: workload identity works without it), non-root, read-only root fs, no privilege
escalation, all capabilities dropped, a writable ``/tmp`` (an emptyDir sized by ``tables``: 8Gi per-shard,
``GLOBAL_TMP`` for the global pods, ``trainer.scratch`` for train units), a deadline and a retry strategy that never
retries exit code 3 (permanent input error).
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass
from typing import Any

import yaml
from hera.workflows import DAG, Container, CronWorkflow, Parameter, SecretEnvFrom, Task, Workflow, WorkflowTemplate
from hera.workflows import models as m

from libcurate.llm.cost import is_llm_stage
from libcurate.pipeline import PlannedStage, load_recipe, plan
from libcurate.quantity import quantity_bytes
from libcurate.stage import PermanentInputError

from . import __version__
from . import tables as T

PARAM_PREFIX = "{{workflow.parameters.prefix}}"
RECIPE_PATH = f"{T.RECIPE_MOUNT}/{T.RECIPE_KEY}"


def dns_name(s: str) -> str:
    """A DNS-1123 label fragment: lower case, [a-z0-9-], no leading/trailing dash."""
    out = re.sub(r"[^a-z0-9-]+", "-", s.lower()).strip("-")
    if not out:
        raise ValueError(f"cannot make a Kubernetes name from {s!r}")
    return out[:40].rstrip("-")


def template_name(recipe_name: str) -> str:
    """``curate-<recipe>-v<version>``; dots become dashes (the name also prefixes pod names)."""
    return f"curate-{dns_name(recipe_name)}-v{__version__.replace('.', '-')}"


@dataclass
class Bundle:
    """Everything rendered for one recipe.

    Attributes:
        template: the WorkflowTemplate (the DAG; install once per recipe and version).
        workflow: a Workflow that references the template (one run).
        cron: a CronWorkflow that references it, or None when the recipe has no ``schedule:``.
        configmap: the recipe ConfigMap (a plain dict; its name carries the recipe's content hash).
        stages: the plan the DAG was built from.
    """

    template: WorkflowTemplate
    workflow: Workflow
    cron: CronWorkflow | None
    configmap: dict
    stages: list[PlannedStage]


# -- template pieces -----------------------------------------------------------------------------
def _security() -> tuple[m.PodSecurityContext, m.SecurityContext]:
    pod = m.PodSecurityContext(run_as_non_root=True, run_as_user=T.RUN_AS_UID, run_as_group=T.RUN_AS_UID,
                               fs_group=T.RUN_AS_UID, seccomp_profile=m.SeccompProfile(type="RuntimeDefault"))
    ctr = m.SecurityContext(run_as_non_root=True, read_only_root_filesystem=True,
                            allow_privilege_escalation=False, privileged=False,
                            capabilities=m.Capabilities(drop=["ALL"]))
    return pod, ctr


def _retry() -> m.RetryStrategy:
    # Always: node pre-emption and evictions (spot GPU pools) are errors, not failures, and must retry
    # too; the expression then excludes the one exit code a retry cannot fix.
    return m.RetryStrategy(limit=T.RETRY_LIMIT, retry_policy="Always",
                           expression="asInt(lastRetry.exitCode) != 3",
                           backoff=m.Backoff(**T.RETRY_BACKOFF))


def _resources(requests: dict, limits: dict) -> m.ResourceRequirements:
    return m.ResourceRequirements(requests={k: m.Quantity(root=v) for k, v in requests.items()},
                                  limits={k: m.Quantity(root=v) for k, v in limits.items()})


def tmp_volume(size: str) -> str:
    """The workflow volume of a ``/tmp`` emptyDir of ``size``: ``tmp`` for :data:`T.TMP` (so documents
    with only per-shard pods keep their one volume), ``tmp-<size>`` (``tmp-77gi``) for any other."""
    name = "tmp" if size == T.TMP else f"tmp-{re.sub(r'[^a-z0-9]+', '-', size.lower())}"
    _TMP_SIZES[name] = size
    return name


# tmp_volume's names -> sizes (a quantity has no other characters, so a name stands for one size)
_TMP_SIZES: dict[str, str] = {}


def _larger(a: str, b: str) -> str:
    return a if quantity_bytes(a, "tmp") >= quantity_bytes(b, "tmp") else b


def _mounts(shm: bool, tmp: str = T.TMP) -> list[m.VolumeMount]:
    out = [m.VolumeMount(name="recipe", mount_path=T.RECIPE_MOUNT, read_only=True),
           m.VolumeMount(name=tmp_volume(tmp), mount_path="/tmp")]
    if shm:
        out.append(m.VolumeMount(name="dshm", mount_path="/dev/shm"))
    return out


def _env_from(llm: bool) -> list[SecretEnvFrom]:
    out = [SecretEnvFrom(name=T.S3_SECRET, optional=True)]
    if llm:
        out.append(SecretEnvFrom(name=T.LLM_SECRET, optional=False))
    return out


def _container(name: str, stage: str, image: str, args: list[str], *, profile: T.Profile | None,
               requests: dict, limits: dict, deadline_s: int, inputs: list[Parameter] | None = None,
               labels: dict | None = None, llm: bool = False, command: list[str] | None = None,
               tmp: str = T.TMP) -> Container:
    """One pod template; ``tmp`` is the sizeLimit of its ``/tmp`` emptyDir (:func:`tmp_volume`). A /tmp
    larger than :data:`T.TMP` is also requested as ``ephemeral-storage``: a sizeLimit reserves nothing, so
    without the request a 77Gi gather could land on a node without the disk and evict its neighbours."""
    if tmp != T.TMP:
        requests = {**requests, "ephemeral-storage": tmp}
    pod_sc, ctr_sc = _security()
    gpu = profile is not None and profile.shm is not None
    kw: dict[str, Any] = {}
    if profile is not None and profile.tolerations:
        kw["tolerations"] = [m.Toleration(**t) for t in profile.tolerations]
    if profile is not None and profile.node_selector:
        kw["node_selector"] = dict(profile.node_selector)
    if profile is not None and profile.priority_class:
        kw["priority_class_name"] = profile.priority_class
    if profile is not None and profile.semaphore:
        cm, key = profile.semaphore
        kw["synchronization"] = m.Synchronization(semaphores=[m.SemaphoreRef(
            config_map_key_ref=m.ConfigMapKeySelector(name=cm, key=key))])
    if command is None:
        command = ["python", "-m", "jobs", stage] if stage != "plan_batches" else ["python", "-m", "jobs.plan_batches"]
    return Container(
        name=name, image=image, image_pull_policy="IfNotPresent",
        command=command,
        args=args, inputs=inputs or None,
        resources=_resources(requests, limits), env_from=_env_from(llm),
        volume_mounts=_mounts(gpu, tmp), security_context=ctr_sc, pod_security_context=pod_sc,
        active_deadline_seconds=str(deadline_s), retry_strategy=_retry(),  # IntOrString: a string
        labels={"app.kubernetes.io/name": "curate", "curate/stage": stage, **(labels or {})}, **kw)


def _fans_out(ps: PlannedStage) -> bool:
    """Per-shard stages (ingest included) fan out over batches; global stages, and stages that declare
    ``fans_out = False``, run as one pod."""
    return ps.kind != "global" and ps.cls.fans_out


def _profile(ps: PlannedStage, phase: str | None = None) -> tuple[str, T.Profile]:
    """The stage's declared profile; a ``fit`` stage's per-shard writes are light and run on ``cpu``."""
    name = "cpu" if (ps.kind == "fit" and phase == "write") else ps.profile
    if name not in T.PROFILES:
        raise ValueError(f"stage {ps.id!r}: unknown profile {name!r}; known: {sorted(T.PROFILES)}")
    return name, T.PROFILES[name]


def _image(registry: str, family: str) -> str:
    return f"{registry.rstrip('/')}/{T.IMAGE_REPO[family]}:{__version__}"


def _common_args(sid: str) -> list[str]:
    return ["--recipe", RECIPE_PATH, "--prefix", PARAM_PREFIX, "--stage-id", sid]


# -- the bundle ----------------------------------------------------------------------------------
# Keys that hold a credential's value (not the name of a variable that holds one, like llm.api_key_env).
CREDENTIAL_KEYS = frozenset({"secret_access_key", "access_key_id", "session_token", "aws_secret_access_key",
                             "aws_access_key_id", "aws_session_token", "api_key", "password", "secret", "token"})


def _credential_paths(node: Any, path: str = "") -> list[str]:
    if isinstance(node, dict):
        out = []
        for k, v in node.items():
            p = f"{path}.{k}" if path else str(k)
            if str(k).lower() in CREDENTIAL_KEYS and v not in (None, ""):
                out.append(p)
            out.extend(_credential_paths(v, p))
        return out
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _credential_paths(v, f"{path}[{i}]")]
    return []


def refuse_credentials(raw: dict, recipe_path: str = "recipe") -> None:
    """Raise :class:`PermanentInputError` (exit 3) when the recipe holds a credential: its text becomes a
    ConfigMap, which is neither encrypted nor access-controlled like a Secret. Pods get S3 credentials
    from the ``curate-s3`` Secret (``envFrom``) or workload identity, the LLM key from ``curate-llm``."""
    found = _credential_paths(raw)
    if found:
        raise PermanentInputError(
            f"{recipe_path} holds credentials ({', '.join(found)}); rendering would copy them into the recipe "
            f"ConfigMap. Remove them from the recipe and give pods credentials through the {T.S3_SECRET!r} "
            f"Secret (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY; {T.LLM_SECRET!r} for OPENAI_API_KEY) or "
            "workload identity (k8s/README.md)")


def build(recipe_path: str, prefix: str | None = None, registry: str = "localhost") -> Bundle:
    """Plan ``recipe_path`` and build its Argo objects.

    Args:
        recipe_path: the recipe YAML; its text becomes the ConfigMap, verbatim.
        prefix: the storage prefix the run uses (default: the recipe's ``storage.prefix``); must be an
            ``s3://`` URL on a real cluster (a local path is rendered with a warning).
        registry: image name prefix, e.g. ``ghcr.io/acme`` (images are tagged with the version, never
            ``latest``).

    Raises:
        PermanentInputError: the recipe holds a credential (:func:`refuse_credentials`).
    """
    with open(recipe_path, encoding="utf-8") as f:
        text = f.read()
    raw = yaml.safe_load(text) or {}
    refuse_credentials(raw, recipe_path)
    storage = raw.get("storage") or {}
    raw_prefix = prefix or (storage if isinstance(storage, str) else storage.get("prefix")) or ""
    recipe = load_recipe(recipe_path, prefix=prefix)
    stages = plan(recipe)
    if not str(raw_prefix).startswith("s3://"):
        warnings.warn(f"prefix {raw_prefix!r} is not an s3:// URL: pods cannot reach a local directory; "
                      "pass prefix='s3://bucket/run' for a real cluster", stacklevel=2)
    for ps in stages:
        if ps.cls.produces_raw:
            for k in ("annotations", "images"):
                v = (recipe.stages[0].get("with") or {}).get(k)
                if isinstance(v, str) and not v.startswith("s3://"):
                    warnings.warn(f"{ps.id} {k}={v!r} is a local path; pods need s3:// inputs", stacklevel=2)

    rname = dns_name(recipe.name)
    wt_name = template_name(recipe.name)
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    cm_name = f"curate-recipe-{rname}-{digest}"
    labels = {"app.kubernetes.io/name": "curate", "app.kubernetes.io/version": __version__,
              "curate/recipe": rname}
    configmap = {"apiVersion": "v1", "kind": "ConfigMap",
                 "metadata": {"name": cm_name, "labels": labels,
                              "annotations": {"curate/recipe-sha256": hashlib.sha256(text.encode()).hexdigest()}},
                 "data": {T.RECIPE_KEY: text}}

    pod_sc, _ = _security()
    volumes = [
        # The ConfigMap's name is a parameter so that a run can point at a copy of the same recipe; its
        # default carries the content hash of the rendered recipe, so the DAG and the recipe agree.
        m.Volume(name="recipe", config_map=m.ConfigMapVolumeSource(name="{{workflow.parameters.recipe}}")),
        m.Volume(name="tmp", empty_dir=m.EmptyDirVolumeSource(size_limit=m.Quantity(root="8Gi"))),
    ]
    shm = next((_profile(ps)[1].shm for ps in stages if _fans_out(ps) and _profile(ps)[1].shm), None)
    if shm:
        volumes.append(m.Volume(name="dshm", empty_dir=m.EmptyDirVolumeSource(medium="Memory",
                                                                              size_limit=m.Quantity(root=shm))))

    wt = WorkflowTemplate(
        name=wt_name, labels=labels,
        annotations={"workflows.argoproj.io/description": f"curate recipe {recipe.name!r}, "
                     f"stages: {', '.join(ps.id for ps in stages)}",
                     "curate/recipe-configmap": cm_name},
        entrypoint="main",
        arguments=[Parameter(name="prefix", value=str(raw_prefix),
                             description="run root: s3://bucket/prefix"),
                   Parameter(name="recipe", value=cm_name, description="ConfigMap holding recipe.yaml"),
                   Parameter(name="ingest", value="true", enum=["true", "false"],
                             description="run ingest (false when another producer writes raw/)")],
        service_account_name=T.SERVICE_ACCOUNT,
        security_context=pod_sc,
        volumes=volumes,
        active_deadline_seconds=T.WORKFLOW_DEADLINE_S,
        # Failed pods stay (with their logs) until the workflow's failure TTL removes the workflow.
        pod_gc=m.PodGC(strategy="OnPodSuccess"),
        ttl_strategy=m.TTLStrategy(seconds_after_success=T.TTL_SUCCESS_S, seconds_after_failure=T.TTL_FAILURE_S),
    )
    _add_templates(wt, stages, registry, max_cost=recipe.max_cost)
    # One /tmp emptyDir per other size a template mounts (GLOBAL_TMP, trainer.scratch), after `tmp`.
    used = {mnt.name for t in wt.templates if isinstance(t, Container) for mnt in t.volume_mounts or ()
            if mnt.mount_path == "/tmp"}
    extra = sorted((_TMP_SIZES[n] for n in used if n != tmp_volume(T.TMP)), key=lambda q: quantity_bytes(q, "tmp"))
    wt.volumes[2:2] = [m.Volume(name=tmp_volume(size), empty_dir=m.EmptyDirVolumeSource(
        size_limit=m.Quantity(root=size))) for size in extra]
    wf = Workflow(generate_name=f"curate-{rname}-", labels=labels,
                  workflow_template_ref=m.WorkflowTemplateRef(name=wt_name),
                  arguments=[Parameter(name="prefix", value=str(raw_prefix))])
    cron = None
    if recipe.schedule:
        cron = CronWorkflow(
            name=f"curate-{rname}-recurate", labels=labels, schedules=[str(recipe.schedule)],
            concurrency_policy="Forbid", starting_deadline_seconds=T.CRON_STARTING_DEADLINE_S,
            successful_jobs_history_limit=3, failed_jobs_history_limit=3,
            workflow_template_ref=m.WorkflowTemplateRef(name=wt_name),
            arguments=[Parameter(name="prefix", value=str(raw_prefix)), Parameter(name="ingest", value="true")])
    return Bundle(wt, wf, cron, configmap, stages)


def _plan_batches(name: str, registry: str, resources: dict, deadline_s: int) -> Container:
    """The list step's template: ``python -m jobs.plan_batches`` for a stage id and batch size."""
    return _container(name, "plan_batches", _image(registry, T.PLAN_BATCHES_IMAGE),
                      ["--recipe", RECIPE_PATH, "--prefix", PARAM_PREFIX,
                       "--stage-id", "{{inputs.parameters.stage-id}}",
                       "--batch-size", "{{inputs.parameters.batch-size}}"],
                      profile=None, requests=resources["requests"], limits=resources["limits"],
                      deadline_s=deadline_s, inputs=[Parameter(name="stage-id"), Parameter(name="batch-size")])


def _budget_check(registry: str) -> Container:
    """The ``max_cost`` step's template (``check-budget``): ``python -m jobs.check_budget`` for a stage id
    and the expected cost of the LLM stages checked before it (``spent``, the previous check's output).
    CPU image, no LLM key: it reads the store and sends nothing. Exit 3 (over budget) is never retried."""
    return _container("check-budget", "check_budget", _image(registry, T.BUDGET_CHECK_IMAGE),
                      ["--recipe", RECIPE_PATH, "--prefix", PARAM_PREFIX,
                       "--stage-id", "{{inputs.parameters.stage-id}}", "--spent", "{{inputs.parameters.spent}}"],
                      profile=None, requests=T.BUDGET_CHECK_RESOURCES["requests"],
                      limits=T.BUDGET_CHECK_RESOURCES["limits"], deadline_s=T.BUDGET_CHECK_DEADLINE_S,
                      inputs=[Parameter(name="stage-id"), Parameter(name="spent")],
                      command=["python", "-m", "jobs.check_budget"])


def _train_unit_templates(name: str, ps: PlannedStage, registry: str) -> tuple[Container, DAG]:
    """A train stage's list step (``<name>-units``: the undone units as JSON) and its fan-out
    (``<name>-train``: one pod per unit, ``python -m jobs.train_unit --unit U``). Its ``<name>-fit`` pod
    (``jobs.train_unit --collect``, CPU) then reads the results and fails rather than train a missing unit.

    The unit pod runs the trainer's image (``trainer.image``; default curate's GPU image) on the stage's
    profile, with ``nvidia.com/gpu`` = ``trainer.gpus`` (torchrun's world size), ``trainer.memory`` /
    ``trainer.cpu`` when given, a ``/tmp`` of ``trainer.scratch`` (the unit's staged images, features and
    the trainer's workdir), and ``activeDeadlineSeconds`` = ``trainer.timeout_s`` + the time to stage
    the data (:data:`libcurate.train.contract.POD_SLACK_S`). The retry strategy is every template's: exit 3
    (the trainer's permanent failure) is never retried. ``parallelism`` caps this stage's pods, the GPU
    semaphore the GPU pods of every workflow.
    """
    import dataclasses

    from libcurate.train.contract import POD_SLACK_S

    spec = ps.config.trainer
    pname, prof = _profile(ps)
    requests, limits = dict(prof.requests), dict(prof.limits)
    for d in (requests, limits):
        d.pop("nvidia.com/gpu", None)
        if spec.gpus:
            d["nvidia.com/gpu"] = str(spec.gpus)
        if spec.memory:
            d["memory"] = str(spec.memory)
    if spec.cpu:
        requests["cpu"] = str(spec.cpu)
    prof = dataclasses.replace(prof, requests=requests, limits=limits)
    image = spec.image or _image(registry, "gpu")
    lst = _container(f"{name}-units", ps.stage, _image(registry, T.image_family(ps.cls, ps.config)),
                     _common_args(ps.id) + ["--list"], profile=None,
                     requests=T.SINGLE_POD_RESOURCES["requests"], limits=T.SINGLE_POD_RESOURCES["limits"],
                     deadline_s=T.PLAN_BATCHES_PARSE_DEADLINE_S, command=["python", "-m", "jobs.train_unit"],
                     tmp=T.SINGLE_POD_TMP)
    unit = _container(f"{name}-train-unit", ps.stage, image, _common_args(ps.id) + ["--unit", "{{inputs.parameters.unit}}"],
                      profile=prof, requests=requests, limits=limits, deadline_s=spec.timeout_s + POD_SLACK_S,
                      inputs=[Parameter(name="unit")], labels={"curate/profile": pname},
                      command=["python", "-m", "jobs.train_unit"], tmp=spec.scratch)
    with DAG(name=f"{name}-train", inputs=[Parameter(name="units")], parallelism=prof.parallelism) as fan:
        Task(name=f"{name}-train-unit", template=unit, with_param="{{inputs.parameters.units}}",
             arguments={"unit": "{{item.unit}}"})
    return lst, fan


def _add_templates(wt: WorkflowTemplate, stages: list[PlannedStage], registry: str,
                   max_cost: float | None = None) -> None:
    used: dict[str, str] = {}
    pb = None           # the shared list step (reads done markers only)

    def tname(sid: str) -> str:
        n = dns_name(sid)
        if n in used and used[n] != sid:
            raise ValueError(f"stage ids {used[n]!r} and {sid!r} map to the same template name {n!r}")
        used[n] = sid
        return n

    with wt:
        templates: dict[str, tuple[Container, DAG | None, T.Profile | None, Container | None]] = {}
        unit_templates: dict[str, tuple[Container, DAG]] = {}   # train stages: unit list + fan-out
        for ps in stages:
            name = tname(ps.id)
            image = _image(registry, T.image_family(ps.cls, ps.config))
            llm = ps.cls.llm
            if not _fans_out(ps):
                ctr = _container(name, ps.stage, image, _common_args(ps.id) + ["--workers", "4"], profile=None,
                                 requests=T.SINGLE_POD_RESOURCES["requests"],
                                 limits=T.SINGLE_POD_RESOURCES["limits"], deadline_s=T.SINGLE_POD_DEADLINE_S, llm=llm,
                                 tmp=T.SINGLE_POD_TMP)
                templates[ps.id] = (ctr, None, None, None, None)
                continue
            fit = None
            if getattr(ps.cls, "unit_fanout", False):
                # A train stage: one pod per unit on its profile; its fit pod only collects the results.
                unit_templates[ps.id] = _train_unit_templates(name, ps, registry)
                fit = _container(f"{name}-fit", ps.stage, image, _common_args(ps.id) + ["--collect"],
                                 profile=T.PROFILES["fit"], requests=T.PROFILES["fit"].requests,
                                 limits=T.PROFILES["fit"].limits, deadline_s=T.PROFILES["fit"].deadline_s,
                                 labels={"curate/profile": "fit"}, command=["python", "-m", "jobs.train_unit"],
                                 tmp=T.PROFILES["fit"].tmp)
            elif ps.kind == "fit":
                # The global fit: one pod with the stage's own profile (CPU `fit` or `gpu`).
                fname, fprof = _profile(ps, "fit")
                fit = _container(f"{name}-fit", ps.stage, image,
                                 _common_args(ps.id) + ["--phase", "fit", "--workers", str(fprof.workers),
                                                        "--device", fprof.device],
                                 profile=fprof, requests=fprof.requests, limits=fprof.limits,
                                 deadline_s=fprof.deadline_s, labels={"curate/profile": fname}, llm=llm,
                                 tmp=_larger(fprof.tmp, T.GLOBAL_TMP))   # a GPU fit gathers as a CPU one
            pname, prof = _profile(ps, "write")
            if prof.plan_resources:
                # ingest's list step parses the whole annotations file: its own, larger template
                lst = _plan_batches(f"plan-batches-{name}", registry, prof.plan_resources,
                                    T.PLAN_BATCHES_PARSE_DEADLINE_S)
            else:
                if pb is None:
                    pb = _plan_batches("plan-batches", registry, T.PLAN_BATCHES_RESOURCES, T.PLAN_BATCHES_DEADLINE_S)
                lst = pb
            args = _common_args(ps.id) + ["--shards", "{{inputs.parameters.shards}}",
                                          "--workers", str(prof.workers), "--device", prof.device]
            if fit is not None:
                args += ["--phase", "write"]
                image = _image(registry, T.image_family(ps.cls))  # light writes: the stage's own image
            ctr = _container(name, ps.stage, image, args, profile=prof, requests=prof.requests,
                             limits=prof.limits, deadline_s=prof.deadline_s, inputs=[Parameter(name="shards")],
                             labels={"curate/profile": pname}, llm=llm, tmp=prof.tmp)
            # A DAG per fan-out so that `parallelism` caps this stage's pods; the GPU semaphore on the
            # pod template caps GPUs across every workflow in the namespace.
            with DAG(name=f"{name}-fanout", inputs=[Parameter(name="batches")], parallelism=prof.parallelism) as fan:
                Task(name=name, template=ctr, with_param="{{inputs.parameters.batches}}",
                     arguments={"shards": "{{item.shards}}"})
            templates[ps.id] = (ctr, fan, prof, lst, fit)

        # max_cost: a `<id>-budget` step before each LLM stage's first pod, chained so that each passes
        # the expected cost so far to the next (libcurate.llm.cost.check_before_stage, as the local runner)
        gate = None
        if max_cost is not None and any(is_llm_stage(ps) for ps in stages):
            if "check-budget" in used:
                raise ValueError(f"stage id {used['check-budget']!r} maps to the template name 'check-budget' "
                                 "of the max_cost step")
            gate = _budget_check(registry)
        with DAG(name="main"):
            barrier: list[str] = []      # tasks the next stage waits for
            last_check: str | None = None  # the previous LLM stage's budget step
            side: list[str] = []         # raw-only stages running side by side after `barrier`
            for ps in stages:
                name = tname(ps.id)
                ctr, fan, prof, lst, fit = templates[ps.id]
                # Per-shard stages that read nothing but raw/ run side by side after the last barrier; a
                # generation stage is a barrier (it adds raw/gen-* shards that every later stage reads).
                parallel = (fan is not None and fit is None and not ps.cls.produces_raw and not ps.reads.stages
                            and not ps.cls.generates_raw)
                deps = barrier if parallel else (side or barrier)
                depends = " && ".join(deps) or None
                # Both ingest steps carry the condition: a skipped list step satisfies `depends`, so the
                # fan-out would otherwise start and fail on the list step's missing output.
                when = "{{workflow.parameters.ingest}} == true" if ps.cls.produces_raw else None
                if gate is not None and is_llm_stage(ps):
                    spent = f"{{{{tasks.{last_check}.outputs.result}}}}" if last_check else "0"
                    Task(name=f"{name}-budget", template=gate,
                         depends=" && ".join(d for d in (depends, last_check) if d) or None,
                         arguments={"stage-id": ps.id, "spent": spent})
                    depends = last_check = f"{name}-budget"
                if ps.id in unit_templates:
                    ulist, ufan = unit_templates[ps.id]
                    Task(name=f"{name}-units", template=ulist, depends=depends)
                    Task(name=f"{name}-train", template=ufan, depends=f"{name}-units",
                         arguments={"units": f"{{{{tasks.{name}-units.outputs.result}}}}"})
                    depends = f"{name}-train"
                if fit is not None:
                    Task(name=f"{name}-fit", template=fit, depends=depends)
                    depends = f"{name}-fit"
                if fan is None:
                    Task(name=name, template=ctr, depends=depends, when=when)
                else:
                    Task(name=f"{name}-batches", template=lst, depends=depends, when=when,
                         arguments={"stage-id": ps.id, "batch-size": str(prof.batch_size)})
                    Task(name=name, template=fan, depends=f"{name}-batches", when=when,
                         arguments={"batches": f"{{{{tasks.{name}-batches.outputs.result}}}}"})
                last = name
                if parallel:
                    side.append(last)
                else:
                    barrier, side = [last], []
