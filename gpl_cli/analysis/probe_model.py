"""The scikit-learn estimator behind `gpl compare --probe` (imported only when scikit-learn is there).

standardise -> rotate onto the training rows' span -> multinomial logistic regression (L2), its
C chosen by an inner stratified cross-validation on the training folds only.

The rotation changes nothing but the speed. With an L2 penalty and an unpenalised intercept,
the optimal weight vector lies in the span of the (centred) training rows: any component
orthogonal to it leaves every training logit unchanged and only adds to the penalty. So the
regression on the coordinates of each vector in an orthonormal basis of that span has the
same optimum, the same training and the same test predictions, with n instead of D unknowns
per class (a flattened 1280 x 7 x 7 map: 48 instead of 62 720). The basis comes from the
n x n Gram matrix (an SVD of the wide n x D matrix takes ~500x longer here).
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

# Inverse regularisation strengths the inner cross-validation chooses from (on standardised inputs).
CS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
INNER_FOLDS = 3
MAX_ITER = 5000
SEED = 0
_RANK_TOL = 1e-10  # eigenvalues of the Gram matrix below this share of the largest are its null space


class RowSpace(TransformerMixin, BaseEstimator):
    """Coordinates in an orthonormal basis of the span of the training rows; the identity when D <= n."""

    def fit(self, x, y=None):
        x = np.asarray(x, dtype=np.float64)
        if x.shape[1] <= x.shape[0]:
            self.basis_ = None
            return self
        eig, vec = np.linalg.eigh(x @ x.T)
        keep = eig > _RANK_TOL * max(eig.max(), np.finfo(np.float64).tiny)
        # V = X^T U diag(1/sqrt(lambda)): D x r with orthonormal columns spanning the rows of X.
        self.basis_ = (x.T @ vec[:, keep]) / np.sqrt(eig[keep])
        return self

    def transform(self, x):
        return x if self.basis_ is None else np.asarray(x, dtype=np.float64) @ self.basis_


def pipeline(c: float = 1.0) -> Pipeline:
    return Pipeline([
        ("scale", StandardScaler()),
        ("rows", RowSpace()),
        ("logreg", LogisticRegression(C=c, max_iter=MAX_ITER)),  # lbfgs: multinomial for several classes
    ])


def probe_estimator(inner_folds: int, cs: tuple[float, ...] = CS):
    """The probe: C chosen by `inner_folds`-fold stratified CV (inner_folds < 2 or one C: that C, no search)."""
    if inner_folds < 2 or len(cs) == 1:
        return pipeline(cs[0] if len(cs) == 1 else 1.0)
    return GridSearchCV(pipeline(), {"logreg__C": list(cs)},
                        cv=StratifiedKFold(inner_folds, shuffle=True, random_state=SEED))


def outer_splits(codes: np.ndarray, folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified (train, test) index pairs, shuffled with the fixed seed: the same for every pooling."""
    return list(StratifiedKFold(folds, shuffle=True, random_state=SEED).split(np.zeros(len(codes)), codes))


def chosen_c(model) -> float:
    return float(model.best_params_["logreg__C"]) if hasattr(model, "best_params_") else float(model[-1].C)
