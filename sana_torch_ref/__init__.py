"""Thin pure-PyTorch SANA that loads the official NVlabs state_dict unchanged (see model.py)."""

from sana_torch_ref.model import SanaRef, get_2d_sincos_pos_embed, load_official, trigflow_forward

__all__ = ["SanaRef", "get_2d_sincos_pos_embed", "load_official", "trigflow_forward"]
