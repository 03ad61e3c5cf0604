"""lite-train runtime: TF-free episode sampling and loading on converted shards (CLI `lite-train`)."""

__all__: list[str] = []  # the public API lives in the subpackages, e.g. `lite_train.data`
