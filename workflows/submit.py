"""Send a recipe to an Argo server through Hera: ``submit(recipe_path, cron=False, ...)``.

Environment: ``ARGO_SERVER`` (e.g. ``https://argo.example.com:2746``), ``ARGO_TOKEN`` (a bearer token,
``Bearer `` prefix optional), ``ARGO_NAMESPACE`` (default ``curate``), ``ARGO_INSECURE=1`` to skip TLS
verification (port-forwarded servers with self-signed certificates), ``CURATE_REGISTRY`` (image prefix).

The recipe ConfigMap is applied with the Kubernetes API (kubeconfig or in-cluster credentials):
Argo's server cannot create ConfigMaps. Pass ``apply_configmap=False`` when it is applied some other way
(``kubectl apply -f`` the file that :func:`workflows.render.render` writes).
"""

from __future__ import annotations

import os
from typing import Any

from hera.workflows import models as m

from .dag import Bundle, build


def service_from_env(host: str | None = None, token: str | None = None):
    """A Hera ``WorkflowsService`` for ``ARGO_SERVER`` / ``ARGO_TOKEN``."""
    from hera.workflows import WorkflowsService

    host = host or os.environ.get("ARGO_SERVER")
    if not host:
        raise RuntimeError("set ARGO_SERVER (e.g. https://localhost:2746) to submit to Argo")
    if "://" not in host:
        host = f"https://{host}"
    token = token if token is not None else os.environ.get("ARGO_TOKEN", "")
    if token and not token.startswith("Bearer "):
        token = f"Bearer {token}"
    verify = os.environ.get("ARGO_INSECURE", "") not in ("1", "true", "yes")
    return WorkflowsService(host=host, token=token or None, verify_ssl=verify)


def apply_configmap(cm: dict, namespace: str) -> None:
    """Create the recipe ConfigMap, or leave it: its name carries the content hash, so an existing one
    with that name already holds this exact recipe."""
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    try:
        client.CoreV1Api().create_namespaced_config_map(namespace, cm)
    except ApiException as e:
        if e.status != 409:
            raise


def _upsert_template(service: Any, bundle: Bundle, namespace: str) -> None:
    body = bundle.template.build()
    try:
        current = service.get_workflow_template(body.metadata.name, namespace=namespace)
    except Exception as e:  # hera raises NotFound; a fake service may raise KeyError
        if type(e).__name__ not in ("NotFound", "KeyError"):
            raise
        service.create_workflow_template(m.WorkflowTemplateCreateRequest(template=body), namespace=namespace)
        return
    body.metadata.resource_version = current.metadata.resource_version
    service.update_workflow_template(body.metadata.name, m.WorkflowTemplateUpdateRequest(template=body),
                                     namespace=namespace)


def submit(recipe_path: str, cron: bool = False, prefix: str | None = None, registry: str | None = None, *,
           namespace: str | None = None, service: Any = None, apply_config: bool = True) -> str:
    """Install the recipe's WorkflowTemplate (create or update) and start a run, or install its cron.

    Args:
        recipe_path: the recipe YAML.
        cron: install/replace the CronWorkflow (the recipe needs ``schedule:``) instead of starting a run.
        prefix: the run's ``s3://`` prefix (default: the recipe's).
        registry: image prefix (default ``$CURATE_REGISTRY`` or ``localhost``).
        namespace: default ``$ARGO_NAMESPACE`` or ``curate``.
        service: a Hera ``WorkflowsService`` (default: :func:`service_from_env`).
        apply_config: create the recipe ConfigMap through the Kubernetes API first.

    Returns:
        ``workflow/<name>`` of the started run, or ``cronworkflow/<name>``.
    """
    namespace = namespace or os.environ.get("ARGO_NAMESPACE", "curate")
    bundle = build(recipe_path, prefix=prefix, registry=registry or os.environ.get("CURATE_REGISTRY", "localhost"))
    if cron and bundle.cron is None:
        raise ValueError(f"{recipe_path}: no 'schedule:' in the recipe, so there is no CronWorkflow to submit")
    service = service or service_from_env()
    if apply_config:
        apply_configmap(bundle.configmap, namespace)
    _upsert_template(service, bundle, namespace)
    if cron:
        body = bundle.cron.build()
        try:
            service.delete_cron_workflow(body.metadata.name, namespace=namespace)
        except Exception as e:
            if type(e).__name__ not in ("NotFound", "KeyError"):
                raise
        service.create_cron_workflow(m.CreateCronWorkflowRequest(cron_workflow=body), namespace=namespace)
        return f"cronworkflow/{body.metadata.name}"
    wf = service.create_workflow(m.WorkflowCreateRequest(workflow=bundle.workflow.build()), namespace=namespace)
    return f"workflow/{wf.metadata.name}"
