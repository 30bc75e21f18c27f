"""Offline weighted kNN evaluation (k sweep) on frozen features of the full train and val splits."""
from __future__ import annotations

import time

from ssl_lightning.eval.features import extract_features, load_method
from ssl_lightning.eval.transfer import evaluation_data
from ssl_lightning.methods import SSLMethod
from ssl_lightning.metrics import knn_accuracy


def knn_eval(ckpt: str, *, data_options: dict | None = None, **kwargs) -> dict[str, float]:
    """knn_eval_method on a checkpoint; ``data_options``: another dataset (transfer.evaluation_data)."""
    method, data = load_method(ckpt)
    return knn_eval_method(method, evaluation_data(method, data, **(data_options or {})), **kwargs)


def knn_eval_method(method: SSLMethod, data: dict, *, ks: tuple[int, ...] = (10, 20, 100, 200),
                    temperature: float = 0.07, num_workers: int = 0,
                    train_samples: int | None = None) -> dict[str, float]:
    """{"knn/top1_k<k>": accuracy for each k, "knn/seconds"}: cosine similarity, votes exp(sim / T)."""
    start = time.time()
    bank, bank_y = extract_features(method, data, "train", num_workers=num_workers, max_samples=train_samples)
    queries, query_y = extract_features(method, data, "val", num_workers=num_workers)
    num_classes = int(max(bank_y.max(), query_y.max())) + 1
    results = {f"knn/top1_k{k}": knn_accuracy(queries, query_y, bank, bank_y, num_classes=num_classes, k=k,
                                               temperature=temperature) for k in ks}
    return {**results, "knn/seconds": time.time() - start}
