"""Fidelity metrics between a KV policy's logits and the full-KV reference (numpy, float64).

All functions take logits rows of shape [n_steps, n_vocab] (or one row [n_vocab]); the
softmax is computed here in float64 so a tiny KL is not lost to float32 rounding.
"""
from typing import Dict

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - np.max(x, axis=-1, keepdims=True)
    return x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))


def kl_divergence(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(P_ref || P) per row, in nats: sum_v p_ref(v) (log p_ref(v) - log p(v)).

    Example:
        >>> kl_divergence(np.array([[0.0, 0.0]]), np.array([[0.0, 0.0]]))
        array([0.])
    """
    log_p = log_softmax(ref_logits)
    log_q = log_softmax(logits)
    return np.maximum(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1), 0.0)


def top1_agreement(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    """Share of rows whose argmax token is the same in both."""
    ref = np.atleast_2d(ref_logits)
    other = np.atleast_2d(logits)
    return float(np.mean(np.argmax(ref, axis=-1) == np.argmax(other, axis=-1)))


def nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood (nats) of targets[i] under row i."""
    log_p = log_softmax(np.atleast_2d(logits))
    targets = np.asarray(targets, dtype=np.int64)
    return -log_p[np.arange(len(targets)), targets]


def perplexity(logits: np.ndarray, targets: np.ndarray) -> float:
    """exp(mean NLL) of the targets."""
    return float(np.exp(np.mean(nll(logits, targets))))


def summarize_kl(kl: np.ndarray) -> Dict[str, float]:
    """Mean and 99th percentile (linear interpolation, numpy's default) of per-row KL."""
    kl = np.asarray(kl, dtype=np.float64)
    return {"kl_mean": float(np.mean(kl)), "kl_p99": float(np.percentile(kl, 99))}


class StepFidelity:
    """Accumulates per-step comparisons against reference rows without keeping policy logits."""

    def __init__(self):
        self.kl = []
        self.agree = []
        self.nll = []
        self.nll_ref = []

    def add(self, ref_row: np.ndarray, row: np.ndarray, target: int) -> None:
        self.kl.append(float(kl_divergence(ref_row[None], row[None])[0]))
        self.agree.append(bool(np.argmax(ref_row) == np.argmax(row)))
        self.nll.append(float(nll(row[None], np.array([target]))[0]))
        self.nll_ref.append(float(nll(ref_row[None], np.array([target]))[0]))

    def summary(self) -> Dict[str, float]:
        if not self.kl:
            return {}
        out = {"n_positions": len(self.kl), "top1_agreement": float(np.mean(self.agree))}
        out.update(summarize_kl(np.array(self.kl)))
        out["ppl"] = float(np.exp(np.mean(self.nll)))
        out["ppl_full"] = float(np.exp(np.mean(self.nll_ref)))
        return out
