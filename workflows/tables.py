"""The two tables every Argo template reads: stage -> image, profile -> resources (STYLE.md item 7).

DAG code in :mod:`workflows.dag` holds no image names, resource sizes, tolerations or secret names:
change a node pool, a GPU budget or a registry here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from libcurate.quantity import gib

# -- images --------------------------------------------------------------------------------------
# Two families (images/cpu, images/gpu), the template sets `command: python -m jobs <stage>`.
# One image per *family*, not per stage: the stage images would be byte-identical apart from their
# entrypoint (every stage is libcurate + one thin jobs/ module), so per-stage images would multiply
# build and pull time (the GPU image is ~6 GB) for nothing. Stating the command in the template also
# spares Argo's emissary executor a registry look-up of the image's entrypoint.
IMAGE_REPO = {"cpu": "curate-cpu", "gpu": "curate-gpu"}

# Which family a stage runs in is the stage's own declaration (``Stage.image`` / ``Stage.image_for``:
# score_length with a BPE tokenizer needs torch); only the list step, which is not a stage, is named here.
PLAN_BATCHES_IMAGE = "cpu"


def image_family(stage_cls, config: object | None = None) -> str:
    """``cpu`` or ``gpu``: the image a stage runs in (not where it runs; see :data:`PROFILES`)."""
    fam = stage_cls.image_for(config) if config is not None else stage_cls.image
    if fam not in IMAGE_REPO:
        raise ValueError(f"{stage_cls.__name__} declares image {fam!r}; known: {sorted(IMAGE_REPO)}")
    return fam


# -- scratch (/tmp) ------------------------------------------------------------------------------
# Every pod's /tmp is an emptyDir with a sizeLimit: the kubelet evicts a pod that writes more. Sizes
# follow the 10M-sample design of workflows/README.md ("Scaling").
# A per-shard pod (cpu, ingest, gpu profiles; list and budget steps) holds one batch's downloads at a time.
TMP = "8Gi"
# A global pod (the `fit` profile; select, export: SINGLE_POD_*; a train stage's list and collect pods)
# gathers embeddings over every sample into /tmp (libcurate.columns.gather): 10M samples of a two-part
# list [img_emb, txt_emb], 512 fp16 dims each, held twice on S3 (the shards' downloaded .npy files stay
# until the gather ends, next to the joined memmap): 10M x 1024 x 2 B x 2 = 41 GB; a train stage's plan
# adds the fp32 feature matrix over every row (libcurate.train.units): 10M x 1024 x 4 B = 41 GB.
DESIGN_SAMPLES = 10_000_000
DESIGN_EMBEDDING_DIMS = 2 * 512
GLOBAL_TMP = gib(DESIGN_SAMPLES * DESIGN_EMBEDDING_DIMS * (2 + 2 + 4))    # 77Gi


# -- profiles ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Profile:
    """Where and how a stage's pods run.

    Attributes:
        requests / limits: container resources (``nvidia.com/gpu`` only in the GPU profile).
        node_selector / tolerations: the node pool; only the GPU profile tolerates the GPU taint, so
            CPU pods never occupy (or wait for) GPU nodes.
        priority_class: k8s/priorityclasses.yaml.
        shm: size of the memory-backed ``/dev/shm`` (PyTorch DataLoader workers pass batches through it;
            the container default of 64 MiB crashes them); None = no such volume.
        deadline_s: activeDeadlineSeconds of one pod (one batch of shards): a hung GPU or a stuck
            download is killed and retried instead of holding the node for days.
        batch_size: shards per fan-out pod (``plan_batches --batch-size``).
        parallelism: fan-out pods of one stage at once (per workflow).
        semaphore: ConfigMap key of a cluster-wide concurrency budget shared by all workflows.
        workers: ``--workers`` (decode processes / threads in the pod), matching the CPU request.
        device: ``--device`` for the stage.
        tmp: sizeLimit of the pod's ``/tmp`` emptyDir (:data:`TMP`, :data:`GLOBAL_TMP`).
        plan_resources: resources of this stage's own list step, for a stage whose ``plan_batches``
            does more than list done markers (ingest parses the whole annotations file to know its
            shards); None = the shared light ``plan-batches`` template (:data:`PLAN_BATCHES_RESOURCES`).
    """

    requests: dict[str, str]
    limits: dict[str, str]
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict, ...] = ()
    priority_class: str | None = None
    shm: str | None = None
    deadline_s: int = 6 * 3600
    batch_size: int = 256
    parallelism: int = 8
    semaphore: tuple[str, str] | None = None
    workers: int = 2
    device: str = "cpu"
    plan_resources: dict | None = None
    tmp: str = TMP


GPU_SEMAPHORE = ("curate-gpu-semaphore", "gpus")     # k8s/configmap-gpu-semaphore.yaml

PROFILES: dict[str, Profile] = {
    "cpu": Profile(
        requests={"cpu": "2", "memory": "8Gi"},
        limits={"memory": "8Gi"},
        deadline_s=6 * 3600,
        batch_size=256,
        parallelism=8,
        workers=2,
    ),
    # ingest: CPU only (no GPU toleration). Its list step parses the whole annotations file once (memory
    # follows the file: ~2.3 KB per parsed record measured on short LLaVA records, 10M records ~ 23 GB)
    # and leaves each shard's records in raw/_plan/ for its pod, so a pod holds only its batch.
    # 256 shards x ~1,000 samples at ~500 samples/s (4 workers) ~ 9 min of work per pod.
    "ingest": Profile(
        requests={"cpu": "4", "memory": "8Gi"},
        limits={"memory": "8Gi"},
        deadline_s=6 * 3600,
        batch_size=256,
        parallelism=20,
        workers=4,
        plan_resources={"requests": {"cpu": "1", "memory": "32Gi"}, "limits": {"memory": "32Gi"}},
    ),
    # The global fit of a `fit` stage (dedup graph, k-means, spectral clustering over every sample): one
    # pod. 10M x 512 fp16 embeddings are 10 GB, memory-mapped from /tmp (an emptyDir, GLOBAL_TMP: room
    # for a two-part list and its S3 downloads), so memory holds the faiss index and the per-sample
    # columns, not the matrix.
    "fit": Profile(
        requests={"cpu": "8", "memory": "32Gi"},
        limits={"memory": "32Gi"},
        deadline_s=12 * 3600,
        batch_size=256,
        parallelism=8,
        workers=8,
        tmp=GLOBAL_TMP,
    ),
    "gpu": Profile(
        requests={"cpu": "8", "memory": "48Gi", "nvidia.com/gpu": "1"},
        limits={"memory": "48Gi", "nvidia.com/gpu": "1"},
        node_selector={"nvidia.com/gpu.present": "true"},
        tolerations=({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},),
        priority_class="curate-gpu",
        shm="16Gi",
        # 64 shards x ~1,000 samples; ~2 h for a VLM reward model at ~10 samples/s, so 4 h is a hang.
        deadline_s=4 * 3600,
        batch_size=64,
        parallelism=16,
        semaphore=GPU_SEMAPHORE,
        workers=8,
        device="cuda",
    ),
}

# Global stages (select, export) run as one pod; they get the CPU profile with more memory and /tmp
# (select's diversity_greedy and the train stage's list step gather embeddings like a fit).
SINGLE_POD_RESOURCES = {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"memory": "16Gi"}}
SINGLE_POD_TMP = GLOBAL_TMP
SINGLE_POD_DEADLINE_S = 12 * 3600
PLAN_BATCHES_RESOURCES = {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "512Mi"}}
PLAN_BATCHES_DEADLINE_S = 15 * 60
# A list step with its own resources (ingest's) parses the annotations: allow for a 10M-record file.
PLAN_BATCHES_PARSE_DEADLINE_S = 2 * 3600

# The max_cost check before an LLM stage (python -m jobs.check_budget): builds every request the stage
# and the LLM stages after it would send (reading their input shards and image sizes), sends none.
BUDGET_CHECK_IMAGE = "cpu"
BUDGET_CHECK_RESOURCES = {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "4Gi"}}
BUDGET_CHECK_DEADLINE_S = 2 * 3600

# -- credentials (names only; values live in the cluster: k8s/README in workflows/README.md) -------
S3_SECRET = "curate-s3"      # AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, [AWS_ENDPOINT_URL, AWS_DEFAULT_REGION]
LLM_SECRET = "curate-llm"    # OPENAI_API_KEY, OPENAI_BASE_URL (any OpenAI-compatible endpoint)
SERVICE_ACCOUNT = "curate-workflow"   # k8s/rbac.yaml; bind it to a cloud role for workload identity

# -- pod hygiene ---------------------------------------------------------------------------------
RUN_AS_UID = 10001                    # the `curate` user of images/*/Containerfile
RECIPE_MOUNT = "/etc/curate"
RECIPE_KEY = "recipe.yaml"
RETRY_LIMIT = "3"                     # IntOrString fields are strings in Argo's schema
RETRY_BACKOFF = {"duration": "1m", "factor": "2", "max_duration": "1h"}
WORKFLOW_DEADLINE_S = 3 * 24 * 3600
TTL_SUCCESS_S = 24 * 3600
TTL_FAILURE_S = 7 * 24 * 3600         # failed pods (kept by OnPodSuccess GC) and their logs live a week
CRON_STARTING_DEADLINE_S = 3600
