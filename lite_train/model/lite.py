"""A LITE model (`ModelConfig` -> `LiteModel`): support images + labels + query images in, query logits out,
with the reference's test path (reference lite.md §1, §3; LITE:src/model.py, LITE:src/run.py `test`).

    z = mean(set_encoder(support))          (1, 64)   task embedding
    film = feature_adaptation_network(z)    18 x (gamma [C], beta [C])
    f = feature_extractor(images, film)     (n, 1280) frozen FiLM EfficientNet-B0
    logits = classifier(f_support, y, f_query)   (M, K), column k = k-th smallest support label

State-dict names equal LITE's `FewShotClassifier` (647 keys: set_encoder 35, feature_extractor 360,
feature_adaptation_network 252), so `load_state_dict(torch.load(path, weights_only=True), strict=True)` loads
LITE's released checkpoints. The head has no parameters.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from lite_train.model.efficientnet import PADDING_IMAGE_SIZE, FilmEfficientNet
from lite_train.model.film import FilmAdapter
from lite_train.model.heads import HEADS, SOLVERS, ClassStats, make_head
from lite_train.model.set_encoder import SetEncoder

FilmParams = list[tuple[torch.Tensor, torch.Tensor]]
REFERENCE_CHUNK_SIZE = 40  # the reference's --batch_size: chunk of every no-grad pass and query chunk


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Model switches. Defaults reproduce LITE exactly; each `*_quirk` = False is the corrected behaviour
    (docs/fidelity.md, "LITE model")."""

    classifier: str = "simple_cnaps"  # a key of heads.HEADS: simple_cnaps (LITE) | protonets
    # 1-shot classes: the reference's covariance helper returns the scalar variance of the D feature values
    # of the single example, broadcast over the D x D matrix; False: zero class covariance.
    one_shot_covariance_quirk: bool = True
    # Test-path set encoding in chunks: the reference's chunk count lacks the "no chunk of size 1" merge, so
    # when N mod chunk == 1 (N > chunk) the last image is encoded a second time, alone, and this duplicate
    # row enters the task-embedding mean; False: chunks as for features/queries, each image counted once.
    set_encoder_size1_chunk_quirk: bool = True
    # Input size the static "same" paddings are computed for; the reference always uses 224.
    padding_image_size: int = PADDING_IMAGE_SIZE
    # How Simple CNAPs applies its class precisions (heads.SOLVERS): "cholesky" = low-rank Cholesky in float64
    # (the same numbers, far fewer operations); "inverse" = the reference's explicit float32 inverse.
    simple_cnaps_solver: str = "cholesky"

    def __post_init__(self):
        if self.classifier not in HEADS:
            raise ValueError(f"unknown classifier {self.classifier!r}; known: {sorted(HEADS)}")
        if self.padding_image_size < 1:
            raise ValueError(f"padding_image_size must be positive, got {self.padding_image_size}")
        if self.simple_cnaps_solver not in SOLVERS:
            raise ValueError(f"unknown simple_cnaps_solver {self.simple_cnaps_solver!r}; known: {SOLVERS}")


def _check_chunk_size(chunk_size: int) -> None:
    # The reference's "avoid a chunk of size 1" rule duplicates rows when chunks hold one image.
    if chunk_size < 2:
        raise ValueError(f"chunk_size must be at least 2, got {chunk_size}")


def _chunk_end(start: int, chunk_size: int, n: int) -> int:
    # LITE:src/run.py `_get_batch_indices`: an end at n - 1 is extended to n (no trailing chunk of size 1).
    end = start + chunk_size
    if end == n - 1:
        end = n
    return min(end, n)


def query_chunks(n: int, chunk_size: int = REFERENCE_CHUNK_SIZE) -> list[tuple[int, int]]:
    """[start, end) chunks of n items as the reference's query, feature and training passes use them:
    ceil(n / chunk_size) chunks, one fewer when n mod chunk_size == 1 (the size-1 tail joins the last)."""
    _check_chunk_size(chunk_size)
    count = math.ceil(n / chunk_size)
    if count > 1 and n % chunk_size == 1:
        count -= 1
    return [(i * chunk_size, _chunk_end(i * chunk_size, chunk_size, n)) for i in range(count)]


def set_encoder_chunks(n: int, chunk_size: int, size1_quirk: bool) -> list[tuple[int, int]]:
    """The set encoder's chunks. With the quirk (LITE:src/model.py `build_task_representation_by_batch`)
    the count is ceil(n / chunk_size) without the merge, so for n mod chunk_size == 1, n > chunk_size, a
    last chunk (n - 1, n) repeats the final image, which the previous chunk already includes."""
    if not size1_quirk:
        return query_chunks(n, chunk_size)
    _check_chunk_size(chunk_size)
    return [(i * chunk_size, _chunk_end(i * chunk_size, chunk_size, n))
            for i in range(math.ceil(n / chunk_size))]


def _check_task(support_images: torch.Tensor, support_labels: torch.Tensor, query_images: torch.Tensor):
    if support_images.ndim != 4 or query_images.ndim != 4:
        raise ValueError(f"images must be (n, 3, S, S), got support {tuple(support_images.shape)} and query "
                         f"{tuple(query_images.shape)}")
    if support_images.shape[1:] != query_images.shape[1:]:
        raise ValueError(f"support {tuple(support_images.shape)} and query {tuple(query_images.shape)} images "
                         "differ in shape")
    if support_labels.shape != support_images.shape[:1] or support_labels.dtype != torch.int64:
        raise ValueError(f"support labels must be int64 of shape ({support_images.shape[0]},), got "
                         f"{support_labels.dtype} {tuple(support_labels.shape)}")
    if support_images.shape[0] < 1 or query_images.shape[0] < 1:
        raise ValueError("support and query sets must be non-empty")


class LiteModel(nn.Module):
    """LITE's FewShotClassifier. Trainable: set encoder + FiLM generator; the backbone is frozen."""

    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = config
        # Registration order = the reference's (and thus its state-dict key order).
        self.set_encoder = SetEncoder()
        self.feature_extractor = FilmEfficientNet(config.padding_image_size)
        self.feature_adaptation_network = FilmAdapter()
        self.classifier = make_head(config.classifier, config.one_shot_covariance_quirk, config.simple_cnaps_solver)
        self.feature_extractor.eval()
        # Set by `use_identity_film`: the test path runs the plain backbone (FiLM gamma 1, beta 0 everywhere).
        self.identity_film = False

    def use_identity_film(self) -> "LiteModel":
        """Zero every FiLM regulariser, so gamma = 1 and beta = 0 at every site whatever the task (reference
        §1.4: gamma = 1 + g(z)·r_gamma, beta = b(z)·r_beta), and let the test path skip the set encoder and the
        FiLM ops, which then change nothing: the same backbone, not adapted, and its numbers."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                if "_regularizers." in name:
                    p.zero_()
        self.identity_film = True
        return self

    def train(self, mode: bool = True) -> LiteModel:
        """Sets the mode, but the backbone stays in eval mode (frozen BN statistics) whatever `mode` is, and
        the set encoder's BN uses batch statistics in either mode (reference lite.md §1.1)."""
        super().train(mode)
        self.feature_extractor.eval()
        return self

    # ---- pieces (used by the test path and by lite_train.train.step) ----

    def set_encoder_embeddings(self, images: torch.Tensor, chunk_size: int) -> torch.Tensor:
        """Per-image embeddings (n or n + 1, 64), encoded chunk by chunk (batch statistics per chunk). Row
        n, present only with the size-1 quirk when n mod chunk_size == 1, repeats the last image."""
        chunks = set_encoder_chunks(images.shape[0], chunk_size, self.config.set_encoder_size1_chunk_quirk)
        return torch.cat([self.set_encoder.pre_pool(images[a:b]) for a, b in chunks])

    def film_params(self, task_embedding: torch.Tensor) -> FilmParams:
        return self.feature_adaptation_network(task_embedding)

    def features(self, images: torch.Tensor, film: FilmParams) -> torch.Tensor:
        """(n, 3, S, S) -> (n, 1280), one batch (channels-last inside: faster convolutions, same values up to
        rounding)."""
        return self.feature_extractor(images.contiguous(memory_format=torch.channels_last), film)

    def features_by_chunks(self, images: torch.Tensor, film: FilmParams, chunk_size: int) -> torch.Tensor:
        """(n, 3, S, S) -> (n, 1280) in the reference's chunks (no effect on values: the backbone is in eval
        mode; it bounds memory)."""
        return torch.cat([self.features(images[a:b], film) for a, b in query_chunks(images.shape[0], chunk_size)])

    def fit_classifier(self, features: torch.Tensor, labels: torch.Tensor) -> ClassStats:
        # Outside autocast: the covariances need full precision (bf16 has none, and LITE runs float32).
        with torch.autocast(features.device.type, enabled=False):
            return self.classifier.fit(features.to(self._dtype()), labels)

    def classify(self, stats: ClassStats, query_features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(query_features.device.type, enabled=False):
            return self.classifier.logits(stats, query_features.to(self._dtype()))  # (M, K)

    def regularization_term(self) -> torch.Tensor:
        """R of the FiLM generator; the training loss adds 0.001·R per query chunk."""
        return self.feature_adaptation_network.regularization_term()

    def _dtype(self) -> torch.dtype:
        return self.feature_adaptation_network.layers[0].gamma_regularizers[0].dtype

    # ---- whole-task passes ----

    def forward(self, support_images: torch.Tensor, support_labels: torch.Tensor,
                query_images: torch.Tensor) -> torch.Tensor:
        """One pass with gradients everywhere, whole sets as single batches (the reference's
        `FewShotClassifier.forward`, used by the small_task / no_lite training methods): logits (M, K)."""
        _check_task(support_images, support_labels, query_images)
        z = self.set_encoder(support_images)  # (1, 64)
        film = self.film_params(z)
        stats = self.fit_classifier(self.features(support_images, film), support_labels)
        return self.classify(stats, self.features(query_images, film))

    def predict_details(self, support_images: torch.Tensor, support_labels: torch.Tensor,
                        query_images: torch.Tensor, chunk_size: int = REFERENCE_CHUNK_SIZE) -> dict:
        """The reference's test path, returning its intermediates: `support_embeddings` (N or N + 1, 64),
        `task_embedding` (1, 64), `film` (all three None with `identity_film`), `support_features` (N, 1280),
        `stats` (ClassStats), `query_features` (M, 1280), `logits` (M, K). Runs without gradients."""
        _check_task(support_images, support_labels, query_images)
        with torch.no_grad():
            if self.identity_film:  # FiLM is the identity whatever z is: no set encoder, no FiLM op (same values)
                embeddings = z = film = None
            else:
                embeddings = self.set_encoder_embeddings(support_images, chunk_size)  # (N[+1], 64)
                z = embeddings.mean(dim=0, keepdim=True)  # (1, 64)
                film = self.film_params(z)
            support_features = self.features_by_chunks(support_images, film, chunk_size)  # (N, 1280)
            stats = self.fit_classifier(support_features, support_labels)
            query_features = self.features_by_chunks(query_images, film, chunk_size)  # (M, 1280)
            logits = self.classify(stats, query_features)  # (M, K)
        return {"support_embeddings": embeddings, "task_embedding": z, "film": film,
                "support_features": support_features, "stats": stats, "query_features": query_features,
                "logits": logits}

    def predict(self, support_images: torch.Tensor, support_labels: torch.Tensor, query_images: torch.Tensor,
                chunk_size: int = REFERENCE_CHUNK_SIZE) -> torch.Tensor:
        """Query logits (M, K) by the reference's test path, in chunks of `chunk_size`; column k = the k-th
        smallest support label. Images NCHW in [-1, 1], labels int64. No gradients."""
        return self.predict_details(support_images, support_labels, query_images, chunk_size)["logits"]
