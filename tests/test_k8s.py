"""k8s/ manifests: strict validation against Kubernetes 1.37's schemas and the least-privilege rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

K8S = Path(__file__).resolve().parents[1] / "k8s"


def _docs():
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path.name, doc


@pytest.mark.parametrize("name,doc", list(_docs()), ids=lambda x: x if isinstance(x, str) else x["kind"])
def test_strict_schema(name, doc):
    import kubernetes_validate

    kubernetes_validate.validate(doc, "1.37.0", strict=True)


def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files
    assert kust["namespace"] == "curate"


def test_least_privilege_and_no_secret_values():
    docs = [d for _, d in _docs()]
    kinds = {d["kind"] for d in docs}
    assert "Secret" not in kinds, "Secret values never live in the repo: reference them by name"
    roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Role"}
    assert roles["curate-executor"]["rules"] == [
        {"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"], "verbs": ["create", "patch"]}]
    for role in roles.values():
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"]
            assert "secrets" not in rule["resources"]
    sem = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "curate-gpu-semaphore")
    assert int(sem["data"]["gpus"]) > 0


def test_workflow_references_resolve():
    """Names the rendered workflows use exist here (service account, semaphore, priority class)."""
    from workflows import tables as T

    names = {(d["kind"], d["metadata"]["name"]) for _, d in _docs()}
    assert ("ServiceAccount", T.SERVICE_ACCOUNT) in names
    assert ("ConfigMap", T.GPU_SEMAPHORE[0]) in names
    for prof in T.PROFILES.values():
        if prof.priority_class:
            assert ("PriorityClass", prof.priority_class) in names
