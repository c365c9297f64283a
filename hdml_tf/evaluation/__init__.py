"""Evaluation: metrics (NMI, F1, Recall@K, MAP@R, R-Precision), embedding, a Keras callback, and plots.

    from hdml_tf.evaluation import evaluate, EvaluationCallback, split_validation_classes
    results = evaluate(embeddings, labels, recall_ks=(1, 2, 4, 8))   # {"nmi", "f1", "recall@1", ..., "map@r", ...}

Plots live in `hdml_tf.evaluation.plots` (imported on demand: matplotlib is only needed there).
"""
from hdml_tf.evaluation.callback import (EvaluationCallback, EvaluationFiles, official_schedule,
                                         split_validation_classes)
from hdml_tf.evaluation.embedding import embed_dataset
from hdml_tf.evaluation.metrics import (DEFAULT_CHUNK_BYTES, OFFICIAL_KMEANS_RESTARTS, OFFICIAL_KMEANS_SEED,
                                        PAPER_RECALL_KS, EvaluationProtocol, clustering_protocol, clustering_scores, cluster,
                                        evaluate, format_results, map_at_r, nearest_neighbors,
                                        nmi_f1, pairwise_f1, r_precision, recall_at_k, retrieval_metrics)

__all__ = [
    "DEFAULT_CHUNK_BYTES", "OFFICIAL_KMEANS_RESTARTS", "OFFICIAL_KMEANS_SEED", "PAPER_RECALL_KS", "EvaluationCallback",
    "EvaluationFiles", "EvaluationProtocol",
    "cluster", "clustering_protocol", "clustering_scores", "embed_dataset",
    "evaluate", "format_results", "map_at_r", "nearest_neighbors",
    "nmi_f1", "official_schedule", "pairwise_f1",
    "plot_retrieval", "plot_retrieval_grid", "plot_training_curves", "plot_tsne", "r_precision", "recall_at_k",
    "retrieval_metrics", "split_validation_classes",
]


def __getattr__(name):
    # Plot functions are re-exported lazily so `import hdml_tf.evaluation` does not import matplotlib.
    if name in ("plot_tsne", "plot_retrieval_grid", "plot_retrieval", "plot_training_curves"):
        from hdml_tf.evaluation import plots
        return getattr(plots, name)
    raise AttributeError(f"module 'hdml_tf.evaluation' has no attribute {name!r}")
