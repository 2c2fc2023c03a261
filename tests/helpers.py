"""One comparison helper for every parity test."""

from __future__ import annotations

import numpy as np

from tests.tolerances import TOLERANCES


def to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float64)


def relative_error(ref, out) -> float:
    """max|out - ref| / max|ref| (the DESIGN.md parity measure); inf on NaN/Inf or shape mismatch."""
    ref, out = to_numpy(ref), to_numpy(out)
    if ref.shape != out.shape:
        raise AssertionError(f"shape mismatch: ref {ref.shape} vs out {out.shape}")
    if not (np.isfinite(ref).all() and np.isfinite(out).all()):
        return float("inf")
    scale = np.abs(ref).max()
    diff = np.abs(out - ref).max()
    return float(diff / scale) if scale > 0 else float(diff)


def assert_close(name: str, ref, out, link: str) -> float:
    """Assert relative_error(ref, out) <= TOLERANCES[link]; prints one line per tensor for the log."""
    tol = TOLERANCES[link]
    err = relative_error(ref, out)
    print(f"{name:<60} rel {err:.3e}  (tol {tol:.0e}, {link})")
    if not err <= tol:
        raise AssertionError(f"{name}: max|diff|/max|ref| = {err:.3e} > {tol:.0e} ({link})")
    return err



def save_tiny_tokenizer(path, corpus) -> str:
    """A WordLevel tokenizer over `corpus` with Gemma's special ids (pad 0, eos 1, bos 2, unk 3), BOS prepended by
    its post processor, saved to `path` as a tokenizers-backed folder that AutoTokenizer loads offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(list(corpus), trainers.WordLevelTrainer(special_tokens=["<pad>", "<eos>", "<bos>",
                                                                                     "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", 2)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(path)
    return str(path)
