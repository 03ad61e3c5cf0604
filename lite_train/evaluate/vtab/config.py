"""`lite-train eval-vtab`'s settings (`VtabEvalConfig`, the CLI options) and its per-task result record."""

from __future__ import annotations

import dataclasses

from lite_train.data.engine import PREPROCESSING
from lite_train.options import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, check_bounds, option
from lite_train.runtime import THREADS_HELP
from manifests.sources import VTAB_GROUPS

GROUPS = VTAB_GROUPS  # VTAB's task groups (source.json extra["group"])


@dataclasses.dataclass(frozen=True)
class VtabEvalConfig:
    """`lite-train eval-vtab` settings (the CLI options are these fields)."""

    data: str = option(..., "Root of converted sources (lite-convert vtab --out); tasks are the ordered "
                            "sources under it.")
    checkpoint: str = option(..., "Model file: checkpoint.pt, fully_trained.pt, best_validation.pt, a LITE .pt "
                                  "or backbone weights (identity FiLM).")
    out: str = option("vtab-results", "Folder for vtab_results.{json,csv,png} and tasks/ (what --resume keeps).")
    tasks: tuple[str, ...] = option((), "Comma-separated task ids [default: every converted task].")
    protocol: str | None = option(None, "Only tasks converted with this protocol: vtab1k | lite.")
    image_size: int | None = option(None, "Side S of the model's input [default: the size the model was "
                                          "trained at; 224 for files that do not say].", min=MIN_IMAGE_SIZE,
                                    max=MAX_IMAGE_SIZE)
    chunk_size: int = option(40, "Images per no-grad pass and per query batch.", min=2)
    preprocess: str = option("md", "md (TF1 bilinear) | lite (LITE's PIL LANCZOS resize).")
    num_workers: int = option(2, "Decode worker processes.", min=0)
    device: str = option("cpu", "Resolved torch device.", cli=False)
    tf32: bool = option(False, "CUDA: TF32 float32 convolutions/matmuls (docs/fidelity.md M10).")
    threads: int = option(0, THREADS_HELP, min=0)
    resume: bool = option(False, "Keep the tasks already scored in --out (same settings), score the rest.")
    label_misalignment_quirk: bool = option(False, "Reference quirk: argmax column taken as the label (wrong "
                                                   "when a class is missing from the support set).")
    drop_last_query_quirk: bool = option(False, "Reference quirk: skip the last query example when the query "
                                                "size mod --chunk-size is 1.")

    def __post_init__(self):
        check_bounds(self)
        if self.preprocess not in PREPROCESSING:
            raise ValueError(f"--preprocess {self.preprocess!r}: one of {', '.join(PREPROCESSING)}")


@dataclasses.dataclass(frozen=True)
class TaskResult:
    """One task's score (a row of the output table)."""

    task: str  # task id (source name)
    group: str  # natural | specialized | structured
    accuracy: float  # % of scored query examples whose predicted label equals their label
    correct: int
    scored: int  # query examples scored
    query_size: int  # query examples in the source
    support_size: int
    missing_classes: tuple[int, ...]  # label ids with no support example (never predicted when aligned)
    seconds: float  # wall time of the task (read, embed, score)
    images_per_s: float  # (support + scored query images) / seconds
