"""Argo backend: Hera code that turns a recipe's :func:`libcurate.pipeline.plan` into Argo YAML.

``workflows.render.render`` writes the WorkflowTemplate / Workflow / CronWorkflow / recipe ConfigMap;
``workflows.submit.submit`` sends them to an Argo server. The DAG is built from the same ``plan()`` the
local runner executes, and every pod runs ``python -m jobs <stage>``, so the two backends cannot drift.
"""

# The workflow template is named ``curate-<recipe>-v<version>``; tests/test_workflows.py checks that this
# equals pyproject.toml's version, so a release bump renames the template (old runs keep theirs).
__version__ = "0.1.0"
