"""VTAB evaluation (`lite-train eval-vtab`): converted VTAB tasks + a LITE model in, per-task accuracies and
the natural / specialized / structured / overall means out (table, JSON, CSV, PNG)."""

from lite_train.evaluate.vtab.config import GROUPS, TaskResult, VtabEvalConfig
from lite_train.evaluate.vtab.tasks import evaluate_task, find_tasks, run_eval_vtab, scored_query_count
from lite_train.evaluate.vtab.report import group_means, read_task_result, write_report

__all__ = [
    "GROUPS",
    "TaskResult",
    "VtabEvalConfig",
    "evaluate_task",
    "find_tasks",
    "group_means",
    "read_task_result",
    "run_eval_vtab",
    "scored_query_count",
    "write_report",
]
