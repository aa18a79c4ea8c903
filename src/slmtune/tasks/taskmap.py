"""The task map: a 2-D picture of the records, one colour per task.

Each plotted record is described by its cosine similarity to every task centroid (a k-dimensional vector, one
axis per task), and those vectors are projected onto their first two principal components. Records of one task
sit near one corner of that space, so tasks show as separate clouds; unassigned records are grey.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp
from sklearn.preprocessing import normalize

from slmtune.plots import pyplot, save_png

MAX_POINTS = 3000


def write_task_map(path: Path, X: sp.csr_matrix, labels: np.ndarray, names: list[str]) -> None:
    """Save the PNG map (deterministic: evenly spaced rows, fixed colours, no timestamp in the file)."""
    plt = pyplot()

    idx = np.arange(X.shape[0])
    if len(idx) > MAX_POINTS:
        idx = np.linspace(0, len(idx) - 1, MAX_POINTS).astype(np.int64)
    xy = _project(X, labels, len(names), idx)
    fig, ax = plt.subplots(figsize=(9, 6.5), dpi=110)
    lab = labels[idx]
    ax.scatter(xy[lab < 0, 0], xy[lab < 0, 1], s=6, c="#bbbbbb", label="unassigned")
    cmap = plt.get_cmap("tab20")
    for t, name in enumerate(names):
        pts = xy[lab == t]
        ax.scatter(pts[:, 0], pts[:, 1], s=8, color=cmap(t % 20), label=name)
    ax.set_title(f"slmtune tasks: {len(names)} tasks, {X.shape[0]:,} records ({len(idx):,} plotted)")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    save_png(fig, path)


def _project(X: sp.csr_matrix, labels: np.ndarray, k: int, idx: np.ndarray) -> np.ndarray:
    if k == 0:
        return np.zeros((len(idx), 2))
    assigned = np.where(labels >= 0)[0]
    member = sp.csr_matrix((np.ones(len(assigned)), (labels[assigned], assigned)), shape=(k, X.shape[0]))
    centroids = normalize(member @ X)
    F = (X[idx] @ centroids.T).toarray()
    F -= F.mean(axis=0)
    _, _, vt = np.linalg.svd(F, full_matrices=False)
    comps = vt[:2]
    comps *= np.where(comps.sum(axis=1, keepdims=True) < 0, -1.0, 1.0)  # fix the SVD's arbitrary sign
    xy = F @ comps.T
    return xy if xy.shape[1] == 2 else np.hstack([xy, np.zeros((len(idx), 1))])
