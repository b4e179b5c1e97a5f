"""Write a recipe's Argo YAML: ``render(recipe_path, out_dir, prefix=None) -> [paths]``."""

from __future__ import annotations

import os

import yaml

from .dag import Bundle, build


def documents(bundle: Bundle) -> dict[str, dict]:
    """File stem -> manifest dict, in the order they should be applied."""
    docs = {"configmap-recipe": bundle.configmap, "workflowtemplate": bundle.template.to_dict(),
            "workflow": bundle.workflow.to_dict()}
    if bundle.cron is not None:
        docs["cronworkflow"] = bundle.cron.to_dict()
    return docs


def dump(doc: dict) -> str:
    """Stable YAML: keys in insertion order, block style, long strings unwrapped."""
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=10_000, allow_unicode=True)


def render(recipe_path: str, out_dir: str, prefix: str | None = None, registry: str | None = None) -> list[str]:
    """Plan ``recipe_path`` and write ``<out_dir>/<recipe>-<kind>.yaml`` files.

    Writes the recipe ConfigMap, the WorkflowTemplate, a Workflow that references it and, when the
    recipe has ``schedule:``, a CronWorkflow. Apply them with ``kubectl apply -n curate -f`` (ConfigMap
    and templates) and ``kubectl create -f`` (the Workflow: it uses ``generateName``).

    Args:
        recipe_path: the recipe YAML.
        out_dir: created if missing.
        prefix: the run's storage prefix (``s3://bucket/run``); default: the recipe's.
        registry: image registry prefix; default ``$CURATE_REGISTRY`` or ``localhost``.

    Returns:
        The written paths.
    """
    bundle = build(recipe_path, prefix=prefix, registry=registry or os.environ.get("CURATE_REGISTRY", "localhost"))
    os.makedirs(out_dir, exist_ok=True)
    name = bundle.configmap["metadata"]["labels"]["curate/recipe"]
    paths = []
    for stem, doc in documents(bundle).items():
        path = os.path.join(out_dir, f"{name}-{stem}.yaml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(dump(doc))
        paths.append(path)
    return paths
